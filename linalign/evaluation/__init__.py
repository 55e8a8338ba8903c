"""Does Linear Alignment make a model follow a principle? A judge-free evaluation.

Every principle here comes with a program that decides whether an answer follows it
(``scorers``: ``PRINCIPLES``), so the evaluation needs no judge model. ``harness`` runs the
grid (``run_eval``: every prompt of ``linalign/data/eval_prompts.txt`` under every
principle, with no principle, the principle in the prompt only, Linear Alignment at fixed
ratios and in kl mode, greedy and sampled) and summarises it (``summarise``); ``metrics``
holds the numbers besides adherence (repetition, Wilson intervals, the answers'
perplexity under the model without the principle, ``response_nll``); ``report`` writes the
CSV, JSON, answers and plot (``write_outputs``) and prints the tables
(``markdown_report``); ``command`` is ``linalign eval`` and
``benchmarks/eval_principles.py``. See docs/eval.md.
"""
from .command import add_eval_parser, build_eval_parser, eval_command
from .harness import (DECODINGS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_RATIO, DEFAULT_SEED,
                      DEFAULT_SETTINGS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Setting,
                      check_grid, is_clean, load_prompts, paired_tests, parse_setting,
                      prompt_seeds, run_eval, summarise)
from .metrics import (CLEAN_REP3, distinct_n, mcnemar_exact, mean, median, ngrams,
                      repeated_ngram_rate, response_nll, wilson_interval)
from .report import (CSV_FIELDS, candidate_default, combine, markdown_report, plot_summary,
                     read_samples, resummarise, write_outputs)
from .scorers import (BRIEF_WORDS, CONTRACTIONS, ENGLISH_WORDS, FRENCH_WORDS, PIRATE_MARKERS,
                      PRINCIPLES, SHAKESPEARE_MARKERS, Principle, contractions, emoji_count,
                      ends_with_question, first_word, has_digit, has_letters, has_word,
                      is_capitals, is_french, language_counts, list_items, pirate_markers,
                      shakespeare_markers, uppercase_ratio, word_count, words)

__all__ = [
    # the command
    "add_eval_parser", "build_eval_parser", "eval_command",
    # the grid and its run
    "DECODINGS", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_MAX_RATIO", "DEFAULT_SEED",
    "DEFAULT_SETTINGS", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "Setting", "check_grid",
    "is_clean", "load_prompts", "paired_tests", "parse_setting", "prompt_seeds", "run_eval",
    "summarise",
    # metrics
    "CLEAN_REP3", "distinct_n", "mcnemar_exact", "mean", "median", "ngrams",
    "repeated_ngram_rate",
    "response_nll", "wilson_interval",
    # outputs
    "CSV_FIELDS", "candidate_default", "combine", "markdown_report", "plot_summary",
    "read_samples", "resummarise", "write_outputs",
    # principles and their scorers
    "BRIEF_WORDS", "CONTRACTIONS", "ENGLISH_WORDS", "FRENCH_WORDS", "PIRATE_MARKERS",
    "PRINCIPLES", "SHAKESPEARE_MARKERS", "Principle", "contractions", "emoji_count",
    "ends_with_question", "first_word", "has_digit", "has_letters", "has_word", "is_capitals",
    "is_french", "language_counts", "list_items", "pirate_markers", "shakespeare_markers",
    "uppercase_ratio", "word_count", "words",
]
