"""``linalign run``: Linear Alignment over a file of prompts, resumable, on one process or
sharded across ``torchrun`` ranks.

    linalign run --input prompts.jsonl --output results.jsonl
    torchrun --nproc-per-node 4 -m linalign run --input prompts.jsonl --output results.jsonl

The modules:

- ``lines``: the input lines (``Row``, ``parse_line``, ``read_input``), checked with the
  rules of ``linalign.options``.
- ``jobs``: the command's ``Settings`` (a ``SamplingParams`` and ``RunOptions``), a row's
  resolved ``Job`` (``resolve``) and the batches (``plan``).
- ``batches``: ``decode_jobs``, one ``generate`` call per batch, each row written through
  ``on_finished`` the moment the decoding loop sees it end; out-of-memory retries.
- ``results``: the output (what a results file is: ``parse_results``; ``read_results``,
  ``ResultWriter``), part files and the merge (``merge_results``, ``merge_outputs``).
- ``outputs``: the files a run writes, checked before anything is written
  (``check_output``) and locked for the whole run (``RunFiles``).
- ``sharding``: ``torchrun`` (``Distributed``, ``shard_of``, ``row_seed``,
  ``gather_and_merge``).
- ``progress``: the progress bar. ``command``: the options and ``run_command``.

Format, restart and sharding rules: docs/run.md.
"""
from .batches import FinishedRows, decode_jobs, generate_batch, result_line
from .command import (DESCRIPTION, add_run_arguments, add_run_parser, main, run_command,
                      settings_of)
from .jobs import Job, RunOptions, Settings, batch_params, default_ratios, plan, resolve
from .lines import FIELDS, Row, parse_line, read_input
from .outputs import RunFiles, check_output
from .progress import Progress
from .results import (MergeSummary, ResultWriter, merge_outputs, merge_results, parse_results,
                      part_path, part_paths, read_results, write_atomic)
from .sharding import Distributed, gather_and_merge, row_seed, shard_of

__all__ = [
    "DESCRIPTION", "Distributed", "FIELDS", "FinishedRows", "Job", "MergeSummary", "Progress",
    "ResultWriter", "Row", "RunFiles", "RunOptions", "Settings", "add_run_arguments",
    "add_run_parser", "batch_params", "check_output", "decode_jobs", "default_ratios",
    "gather_and_merge", "generate_batch", "main", "merge_outputs", "merge_results",
    "parse_line", "parse_results", "part_path", "part_paths", "plan", "read_input",
    "read_results", "resolve", "result_line", "row_seed", "run_command", "settings_of",
    "shard_of", "write_atomic",
]
