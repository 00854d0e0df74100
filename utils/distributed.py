"""Several processes: `accelerate launch` / `torchrun` shards a script's prompts over processes (one device each);
the main process merges into exactly the files one process writes.

A launcher sets WORLD_SIZE, RANK and LOCAL_RANK; without them a script is one process and nothing here does
anything. Work is split into the batches one process would make (so every batch holds the same prompts as in a
single-process run and the numbers are the same bit for bit), dealt out round-robin: rank r computes batches
r, r + W, r + 2W, ... Each process appends to its own progress log (<log>.<rank>.jsonl beside the single-process
<log>.jsonl); every process reads all of them, so a run resumes with any number of processes. Processes check
that they agree on their arguments, and the merged files are written only when every prompt is done.
"""
import dataclasses
import datetime
import glob
import os

import torch

from .cli import UserError, warn
from .io import ProgressLog, read_run_log

TIMEOUT = datetime.timedelta(minutes=30)  # a process that waits longer at a barrier for a dead peer gives up


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place among the launched processes."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0


def current_shard():
    """The Shard of this process from the launcher's environment (one process without a launcher)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by accelerate launch or torchrun)")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f"inconsistent launcher environment: RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local}")
    return Shard(rank, world, local)


def start(shard, device):
    """Join the process group (gloo on CPU, NCCL on CUDA) when there are several processes."""
    if shard.world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            torch.distributed.init_process_group(backend, timeout=TIMEOUT)
        except Exception as e:  # a launcher that sets WORLD_SIZE without a rendezvous address, a busy port ...
            raise UserError(f"could not join the {shard.world} launched processes ({backend}): "
                            f"{' '.join(str(e).split())[:200]}") from None


def join(device, arguments):
    """This process's Shard and device under a launcher (one process without one): joins the process group and
    stops with an error unless every process got the same `arguments` (JSON-able, e.g. the parsed flags)."""
    shard = current_shard()
    device = shard_device(shard, device)
    start(shard, device)
    agree(shard, "the arguments", arguments)
    return shard, device


def finish(shard):
    if shard.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard_device(shard, device):
    """Every process on its own GPU: 'cuda' becomes cuda:<local rank> when several processes run."""
    if shard.world > 1 and device.type == "cuda" and device.index is None:
        if shard.local_rank >= torch.cuda.device_count():
            raise UserError(f"process {shard.rank} has local rank {shard.local_rank} but only "
                            f"{torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", shard.local_rank)
    return device


def my_batches(todo, batch_size, shard):
    """This process's batches of `todo` (indices): the single-process chunks of batch_size, round-robin."""
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    return chunks[shard.rank::shard.world]


def agree(shard, what, value):
    """Stop with an error unless every process has the same `value` (JSON-able), e.g. the parsed arguments."""
    if shard.world == 1:
        return
    got = [None] * shard.world
    _collective(torch.distributed.all_gather_object, got, value)
    bad = [r for r, v in enumerate(got) if v != got[0]]
    if bad:
        raise UserError(f"the launched processes disagree on {what} (process {bad[0]} differs from process 0); "
                        "launch every process with the same command")


def gather(shard, value):
    """The list of every process's value (JSON-able), in rank order; [value] for one process."""
    if shard.world == 1:
        return [value]
    got = [None] * shard.world
    _collective(torch.distributed.all_gather_object, got, value)
    return got


def barrier(shard):
    """Wait for every process; a peer that died or failed is an error here, never a silent partial merge."""
    if shard.world > 1:
        _collective(torch.distributed.barrier)


def all_ok(shard, ok):
    """True when every process reports ok (used before the main process merges)."""
    if shard.world == 1:
        return ok
    got = [None] * shard.world
    _collective(torch.distributed.all_gather_object, got, bool(ok))
    return all(got)


def _collective(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        raise UserError(f"another launched process stopped or failed ({' '.join(str(e).split())[:160]}); every "
                        "finished prompt is saved: run the same command again to resume") from None


class ShardLog:
    """The progress log of this process plus what every other log of the same run holds (earlier runs with
    another number of processes included): `done` is the union, `add` appends to this process's own file.

    base: the single-process log path without '.jsonl' (e.g. out/x_gen4.progress); this process writes
    base.jsonl when alone, else base.<rank>.jsonl. Logs of another identity in the same folder are refused.
    """

    def __init__(self, base, identity, shard, fields=None):
        self.base, self.identity, self.fields = base, identity, fields
        own = base + (".jsonl" if shard.world == 1 else f".{shard.rank}.jsonl")
        self.log = ProgressLog(own, identity, fields)
        self.done = dict(self.log.done)
        self.refresh()
        # Every process reads the logs before any process writes to them: what each then leaves to do (and so the
        # batches it deals out) is computed from the same state. Without this, a fast process that had already
        # finished a prompt changed a slower one's list, and prompts were computed twice or never.
        barrier(shard)

    def paths(self):
        """Every log file of this run: base.jsonl and base.<k>.jsonl."""
        return sorted({*glob.glob(glob.escape(self.base) + ".jsonl"),
                       *(p for p in glob.glob(glob.escape(self.base) + ".*.jsonl")
                         if p[len(self.base) + 1:-len(".jsonl")].isdigit())})

    def refresh(self):
        """Re-read the other logs (after a barrier, the main process sees everything the others finished)."""
        for path in self.paths():
            if os.path.abspath(path) == os.path.abspath(self.log.path):
                continue
            header, records, _ = read_run_log(path, "progress log", self.fields)
            if header != self.identity:
                raise UserError(f"{path} belongs to a run with different settings; use another output folder, or "
                                "delete it to start afresh")
            for index, rec in records.items():
                self.done.setdefault(index, rec)
        return self.done

    def add(self, record):
        self.log.add(record)
        self.done[record["index"]] = record

    def close(self):
        self.log.close()


def merged_records(log, count, shard, what="prompts"):
    """Records 0..count-1 from every process's log (main process only), once all are there; else an error."""
    barrier(shard)
    done = log.refresh()
    missing = [i for i in range(count) if i not in done]
    if not all_ok(shard, not missing):
        if missing:
            warn(f"{len(missing)} of {count} {what} are not done (e.g. {missing[0]})")
        raise UserError(f"not every {what[:-1]} is done; the merged outputs were not written: run the same "
                        "command again to finish")
    return [done[i] for i in range(count)]
