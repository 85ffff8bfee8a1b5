"""Process groups under torchrun: which rank this is, its device, and the reductions training needs.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every worker; a
process started without them is the whole job (world size 1).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError
from ..runtime import resolve_device

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# A collective waiting this long on a dead or stuck peer fails instead of hanging the job.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("GPT2LAB_DIST_TIMEOUT", "120")))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 0, 1, resolve_device(device_name))
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE is {world_size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "start distributed runs with `torchrun --nproc_per_node=N -m gpt2lab train ...` or "
            "`gpt2lab train --nproc N ...`, or unset WORLD_SIZE to train in one process"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(rank, local_rank, world_size, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# Kept until the interpreter exits: see finish_together.
_final_barrier: dist.Work | None = None


def finish_together(device: torch.device) -> None:
    """Wait until every rank has finished its collectives, before any of them exits.

    A gloo worker thread takes the GIL to let go of a collective's tensors after the collective
    has completed. A rank that has nothing left to do (rank 1 writes no checkpoint) reaches
    interpreter exit a fraction of a millisecond after its last collective, sooner than that
    thread gets the GIL; Python then ends the thread inside a destructor that may not unwind and
    the process aborts ("terminate called without an active exception"). destroy_process_group
    does not help under FSDP2: DTensor's caches keep the device mesh, and with it the process
    group and its threads, alive until exit.

    The barrier waits with the GIL released, while the ranks still writing catch up, and it
    references whatever collective is still in flight when it starts, so that collective is
    freed with the barrier: by the main thread, since the barrier lives until exit.
    """
    global _final_barrier
    if not (dist.is_available() and dist.is_initialized()):
        return
    _final_barrier = dist.barrier(async_op=True, device_ids=[device.index] if device.type == "cuda" else None)
    _final_barrier.wait()


def all_reduce_max(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
    """FSDP2: each transformer block, then the rest, sharded across ranks in place. With a 16-bit
    compute dtype, weights are gathered in it and gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    options = {"mp_policy": policy} if policy else {}
    for block in model.transformer.h:
        fully_shard(block, **options)
    fully_shard(model, **options)
