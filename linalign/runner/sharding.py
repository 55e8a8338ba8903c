"""``linalign run`` under ``torchrun``: which rank decodes which id (``shard_of``), the
per-row sampling seeds (``row_seed``, the same hash), the process group
(``Distributed``), and the gather of the parts to rank 0 with the merge
(``gather_and_merge``). Rules: docs/run.md, "Several processes and machines".
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .results import (merge_results, missing_ids, part_paths, read_results,
                      write_atomic)

#: torch.distributed timeout for the final gather: ranks finish their shards at different
#: times and wait there for the slowest one, which may take hours on a long job.
DIST_TIMEOUT_HOURS = 7 * 24


def digest(text: str) -> int:
    """A stable 64-bit hash of ``text`` (blake2b; Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def shard_of(key: str, world: int) -> int:
    """The rank that decodes id ``key``: a stable hash, the same on every rank, every run
    and every machine, independent of which rows are already done."""
    return digest(key) % world


def row_seed(base: int, key: str) -> int:
    """A row's sampling seed from the command's ``--seed`` and its id: independent of the
    batch, the shard and the order the rows run in."""
    return digest(f"{base}\x00{key}") % 2**63


class Distributed:
    """torch.distributed under torchrun (``WORLD_SIZE > 1`` in the environment), else a
    world of one: ``world``, ``rank``, ``local_rank``, ``on``."""

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        self.world = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.on = self.world > 1

    def init(self):
        """Join the process group (nothing for a world of one)."""
        if not self.on:
            return
        import datetime

        import torch.distributed as dist

        # gloo on every device: the ranks only exchange a few small objects (the parts, a
        # flag), never tensors of the model, and gloo needs no GPU set-up and works across
        # nodes over TCP; each rank decodes on its own device.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=DIST_TIMEOUT_HOURS))

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (a list by rank), None elsewhere."""
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        """Wait until every rank is here."""
        import torch.distributed as dist

        dist.barrier()

    def close(self):
        if self.on:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def merge_on_rank0(output, got: list, rows, log) -> bool:
    """Rank 0: the gathered parts' lines merged with OUTPUT and the parts it sees into
    OUTPUT, in input order; the parts it saw are removed. False (logged) when that fails."""
    try:
        seen = part_paths(output)
        merged, extra = merge_results([r.key for r in rows],
                                      [read_results(output)] + [g[1] for g in got] +
                                      [read_results(p) for p in seen])
        write_atomic(Path(output), merged)
        for p in seen:
            p.unlink(missing_ok=True)
        missing = missing_ids(rows, merged)
        log(f"{len(got)} ranks: {sum(len(g[1]) for g in got)} rows from the parts; "
            f"{len(merged)} rows in {output}" +
            (f"; {len(missing)} input ids have no result" if missing else "") +
            (f"; {len(extra)} ids not in the input (kept last)" if extra else ""))
        return True
    except Exception as e:  # noqa: BLE001 - reported; the parts stay for a rerun
        log(f"error: merging the parts into {output} failed: {e}; the parts are kept: "
            "rerun, or merge them with `linalign run --merge`")
        return False


def gather_and_merge(dist: Distributed, output, own: Path, rows, log) -> int:
    """Every rank sends its part's lines to rank 0 (no shared filesystem needed); rank 0
    merges them with OUTPUT and the parts it sees, then every rank removes its own part.
    Returns the exit code (1: the merge failed, the parts are kept)."""
    got = dist.gather((str(own), read_results(own)))
    ok = merge_on_rank0(output, got, rows, log) if dist.rank == 0 else True
    ok = dist.broadcast(ok)
    if ok:
        own.unlink(missing_ok=True)
    # Tear down in order: no rank leaves (and destroys its end of the process group) while
    # another is still inside a collective; an early leaver made rank 0 abort at exit
    # ("terminate called without an active exception") after a complete merge.
    dist.barrier()
    return 0 if ok else 1
