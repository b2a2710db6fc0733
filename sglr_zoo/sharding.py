"""Sharded evaluation: N processes split an evaluation's batches and gather the per-example flags after each attack.

Every attack cuts its points into batches as a single process does; batch k goes to process k mod N, and the flags
each process wrote for its batches are gathered (a gloo all-reduce of n integers), so every process goes on with the
flags a single process would hold. Launch with `accelerate launch --multi_gpu --num_processes N -m sglr_zoo eval ...`
or `torchrun --nproc_per_node N -m sglr_zoo -- eval ...`; `process_group()` joins the group that the launcher's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) describes, and a single process never starts one.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sglr_zoo.errors import UserError

# Seconds a process waits in an evaluation's collective: its own variable, so that a training run's shorter timeout
# (training.TIMEOUT_ENV) never reaches its end-of-run evaluation.
TIMEOUT_ENV = "SGLR_ZOO_EVAL_GROUP_TIMEOUT"
# A process waits in a collective while the others finish their batch of a round: one AutoAttack batch of a large
# model on a slow device takes hours, so the evaluation's default is a day, not torch's 30 minutes.
DEFAULT_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Shards:
    """This process's place among the evaluating processes (rank 0 of 1: a single process, no collectives)."""

    rank: int = 0
    count: int = 1
    group: Any = None  # the process group the collectives run in (None: the default group)

    @property
    def main(self) -> bool:
        """Whether this process writes the files and shows progress."""
        return self.rank == 0

    def owns(self, k: int) -> bool:
        """Whether batch k (counted over all batches of an attack) is this process's."""
        return k % self.count == self.rank

    def rounds(self, batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The batches in rounds of one per process, in order (a single process: one batch a round)."""
        return [batches[i:i + self.count] for i in range(0, len(batches), self.count)]

    def gather(self, values: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        """Per example, the bool flag of the process that `owned` it; unowned examples keep `values`, which every
        process holds alike."""
        if self.count == 1:
            return values
        counts = torch.stack([(values & owned).int(), owned.int()])
        dist.all_reduce(counts, group=self.group)
        return torch.where(counts[1] > 0, counts[0] > 0, values)

    def share(self, value: Any) -> Any:
        """The main process's `value` (a picklable object), on every process."""
        if self.count == 1:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0, group=self.group)
        return shared[0]


def timeout_from_env(variable: str) -> timedelta | None:
    """A process group's timeout from $variable (seconds; None when unset); a user error names the variable."""
    value = os.environ.get(variable)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise UserError(f"{variable}={value!r}: give the process group's timeout as a positive number of seconds")
    return timedelta(seconds=seconds)


def group_timeout() -> timedelta:
    """The collectives' timeout: $SGLR_ZOO_EVAL_GROUP_TIMEOUT seconds when set, else `DEFAULT_TIMEOUT`."""
    return timeout_from_env(TIMEOUT_ENV) or DEFAULT_TIMEOUT


@contextlib.contextmanager
def process_group() -> Iterator[Shards]:
    """The launcher's processes as `Shards`, in a gloo process group for the block (the collectives carry per-example
    flags on the CPU, also when the model is on a GPU: then each process's current CUDA device is cuda:LOCAL_RANK).
    Without a launcher (WORLD_SIZE unset or 1): `Shards()` and no process group. Inside a trainer's process group:
    a new gloo group of the same processes, with the evaluation's timeout (a group cannot be started again once
    destroyed: gloo would meet the first one's keys in the launcher's store)."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    if count == 1:
        yield Shards()
        return
    if dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=group_timeout())
        try:
            yield Shards(dist.get_rank(), dist.get_world_size(), group)
        finally:
            dist.destroy_process_group(group)
        return
    dist.init_process_group("gloo", timeout=group_timeout())
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        yield Shards(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()
