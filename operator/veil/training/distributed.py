"""Distributed DP-SGD across a PyTorchJob's replicas (`spec.training.workers` > 1).

The training operator gives every pod MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK; with
WORLD_SIZE > 1, `veil train` (families `mlp`, `cnn`) joins a torch.distributed group (gloo
on CPU, NCCL on GPUs) and trains one model with Opacus's distributed pieces: the network
wrapped in `DifferentiallyPrivateDistributedDataParallel` (rank 0's initial weights
broadcast) and the optimizer Opacus's `make_private` picks for such a module
(`DistributedDPOptimizer`, or its ghost-clipping twin).

**The same DP-SGD event as one process.** Opacus's distributed sampler splits the rows into
disjoint per-replica chunks and has each replica keep each row of its chunk with probability
q; Veil does the same with its own chunks and sampler:

- every replica reads the table and splits it with rank 0's salt (broadcast), so all agree
  on the training rows; each keeps the rows whose keyed hash (`data.tree_of`) names its
  rank: disjoint chunks that cover the training rows, decided row by row;
- each replica draws each of its rows into each step's batch with probability q
  (independent generators), so the union of the local batches is a Poisson(q) batch over the
  training rows, as in one process; every replica takes all T steps, empty local batches
  included (Opacus's sampler skips those, which would leave the all-reduces unmatched);
- clipped gradients are summed locally; rank 0 alone adds N(0, σ²C²) (Opacus's
  `DistributedDPOptimizer.add_noise`); each replica divides by B / W (Opacus's per-worker
  expected batch), the sum is all-reduced and divided by W: (Σ clip(g) + noise) / B, one
  noise draw for the global batch.

So the claim (q, σ, T) is unchanged; only rank 0 evaluates, exports, seals and writes.
Opacus's `make_private` is not called (as in one process): it would take q from the data
loader's length and the divisor from the true row count.

torch is imported inside functions only: the operator imports nothing from here at runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from veil.training.errors import TrainingError, TrainingRefusedError

if TYPE_CHECKING:
    import torch

# How long a replica waits on the others (the rendezvous, a collective) before failing.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the job's replicas."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, environ: Any = None) -> World:
        """WORLD_SIZE and RANK as the training operator sets them (absent: one process)."""
        env = os.environ if environ is None else environ
        try:
            size, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        except ValueError:
            raise TrainingRefusedError("WORLD_SIZE and RANK must be integers") from None
        if size < 1 or not 0 <= rank < size:
            raise TrainingRefusedError(f"rank {rank} is not in a world of {size}")
        return cls(rank, size)


SINGLE = World()


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join(world: World, device: torch.device) -> None:
    """Join the group (MASTER_ADDR/MASTER_PORT rendezvous); a GPU replica takes its
    LOCAL_RANK's device (one per pod in a PyTorchJob: 0)."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(
            backend(device),
            init_method="env://",
            rank=world.rank,
            world_size=world.size,
            timeout=TIMEOUT,
        )
    except (RuntimeError, ValueError) as failed:
        raise TrainingError(f"could not join the other replicas ({failed})") from None


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(payload: bytes) -> bytes:
    """Rank 0's `payload` (same length on every rank), on every rank."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(list(payload), dtype=torch.uint8, device=_device())
    dist.broadcast(tensor, src=0)
    return bytes(tensor.cpu().tolist())


def all_ok(ok: bool) -> bool:
    """Whether every replica is ok: so that one failing does not leave the others waiting
    in a collective it will never join."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def same_parameters(module: torch.nn.Module) -> bool:
    """Whether every replica holds rank 0's parameters, bit for bit (DDP's invariant: they
    apply the same all-reduced update)."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        mine = torch.cat([p.detach().flatten() for p in module.parameters()])
        reference = mine.clone()
        dist.broadcast(reference, src=0)
        return all_ok(bool(torch.equal(mine, reference)))
