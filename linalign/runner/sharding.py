"""``linalign run`` under ``torchrun``: which rank decodes which id (``shard_of``), the
per-row sampling seeds (``row_seed``, the same hash), the process group
(``Distributed``), and the gather of the parts to rank 0 with the merge
(``gather_and_merge``). Rules: docs/run.md, "Several processes and machines".
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ..cli_args import CommandError
from .results import (merge_results, missing_ids, part_path, part_paths, read_results,
                      write_atomic)

#: torch.distributed timeout for the final gather: ranks finish their shards at different
#: times and wait there for the slowest one, which may take hours on a long job.
DIST_TIMEOUT_HOURS = 7 * 24
#: The store key through which ranks 1.. tell rank 0 they have left the process group,
#: and how long rank 0 waits for them before leaving anyway.
LEFT_KEY = "linalign/left"
LEAVE_TIMEOUT_SECONDS = 60


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
        self.store = None
        # torchrun restarts a failed job in the same store: a key of its own per attempt
        self.left_key = f"{LEFT_KEY}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def init(self):
        """Join the process group (nothing for a world of one). The store it is built on
        is kept (``self.store``): the ordered teardown (``leave``) still needs it once the
        group is gone."""
        if not self.on:
            return
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(hours=DIST_TIMEOUT_HOURS)
        # the env:// rendezvous of init_process_group itself (torchrun's agent store, or
        # one hosted by rank 0 without torchrun), kept as our own reference
        self.store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        # gloo on every device: the ranks only exchange a few small objects (the parts, a
        # flag), never tensors of the model, and gloo needs no GPU set-up and works across
        # nodes over TCP; each rank decodes on its own device.
        dist.init_process_group("gloo", store=self.store, rank=self.rank,
                                world_size=self.world, timeout=timeout)

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

    def leave(self):
        """Tear the process group down in order, at the end of a run that went through:
        a barrier (no rank is still inside a collective), then every rank but 0 destroys
        its end and says so through the store, then rank 0, the root of every collective
        (and the store's host when torchrun's agent does not host it), destroys its own
        once all others are gone. An early leaver made the others abort at exit
        ("terminate called without an active exception"), however complete the output."""
        import torch.distributed as dist

        if not self.on or not dist.is_initialized():
            return
        dist.barrier()
        if self.rank != 0:
            dist.destroy_process_group()
            self.store.add(self.left_key, 1)
            return
        deadline = time.monotonic() + LEAVE_TIMEOUT_SECONDS
        while self.store.add(self.left_key, 0) < self.world - 1 and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        dist.destroy_process_group()

    def close(self):
        """Whatever is left of the process group, at once (error paths: torchrun stops the
        other ranks)."""
        if self.on:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def merge_on_rank0(output: Path, got: list, rows, files, log) -> bool:
    """Rank 0: the gathered parts' lines merged with OUTPUT and the parts it sees into
    OUTPUT, in input order; the parts it saw are removed. Parts of another world size that
    a live run holds (locked) are left alone. False (logged) when that fails."""
    try:
        mine = {part_path(output, r, len(got)) for r in range(len(got))}
        seen = [p for p in part_paths(output) if p in mine or claim(files, p, log)]
        merged, extra = merge_results([r.key for r in rows],
                                      [read_results(output)] + [g[1] for g in got] +
                                      [read_results(p) for p in seen])
        files.adopt(output, write_atomic(output, merged, keep_locked=True))
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


def claim(files, part: Path, log) -> bool:
    """Lock a leftover part (another world size) before folding it in; False, logged, when
    a live run holds it."""
    try:
        files.open_results(part, "part file", repair=False)
        return True
    except CommandError as e:
        log(f"{e}; not merged")
        return False


def gather_and_merge(dist: Distributed, output: Path, own: Path, rows, files, log) -> int:
    """Every rank sends its part's lines to rank 0 (no shared filesystem needed); rank 0
    merges them with OUTPUT and the parts it sees, then every rank removes its own part.
    Returns the exit code (1: the merge failed, the parts are kept)."""
    got = dist.gather((str(own), read_results(own)))
    ok = merge_on_rank0(output, got, rows, files, log) if dist.rank == 0 else True
    ok = dist.broadcast(ok)
    if ok:
        own.unlink(missing_ok=True)
    dist.leave()
    return 0 if ok else 1
