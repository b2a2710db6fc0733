"""What each training process holds: the checks that the processes and the run fit together, the alignment of
the buffers each process updates on its own, and the checksums that show the replicas agree at the end."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.recipe import RunConfig


def check_processes(run: RunConfig, accelerator: Accelerator) -> None:
    """Refuses what the device or the number of processes cannot run: fp16 or SyncBatchNorm on CPUs, a global
    batch that the processes cannot share equally."""
    if accelerator.device.type == "cpu":
        if accelerator.mixed_precision == "fp16":
            raise UserError("run.mixed_precision: fp16 needs a GPU; on a CPU use bf16 or no")
        if run.sync_batchnorm and accelerator.num_processes > 1:
            raise UserError("run.sync_batchnorm: SyncBatchNorm needs GPUs; set it to false on CPU")
    if run.batch_size % accelerator.num_processes:
        raise UserError(f"run.batch_size: {run.batch_size} is not divisible by the "
                        f"{accelerator.num_processes} processes")


@torch.no_grad()
def sync_buffers(accelerator: Accelerator, how: str, *modules: nn.Module) -> None:
    """Gives every process the same floating buffers (BatchNorm running statistics, which each process updates
    from its own batches): rank 0's (`broadcast`, as DDP does before each forward) or their mean (`average`)."""
    for module in modules:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.copy_(broadcast(buffer) if how == "broadcast" else accelerator.reduce(buffer, reduction="mean"))


def replica_checksums(accelerator: Accelerator, *modules: nn.Module) -> list[float]:
    """A checksum of each module's parameters and buffers (the SGLR bank included) from every process."""
    local = torch.stack([sum((t.double().sum() for t in m.state_dict().values() if t.is_floating_point()),
                             torch.zeros((), dtype=torch.float64)).to(accelerator.device) for m in modules])
    return accelerator.gather(local[None]).view(-1, len(modules)).tolist()
