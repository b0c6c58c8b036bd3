"""Distributed helpers (torchrun + DDP): the only place that talks to torch.distributed.

Every helper is a no-op in a single process, so the rest of the code calls them unconditionally.
Launch: `torchrun --nproc-per-node N -m edgedistill train RECIPE` (see docs/scaling.md). The
process group is NCCL when the run uses CUDA, gloo on CPU; collectives move their tensors to the
backend's device and back, so callers may pass CPU tensors either way.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _comm_device() -> torch.device:
    """Where the backend's collectives need their tensors (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (no gradient), e.g. MoCo keys for the queue.

    Every rank must pass the same shape; the result is on `x`'s device."""
    if not is_distributed():
        return x
    comm = _comm_device()
    y = x.to(comm).contiguous()
    parts = [torch.empty_like(y) for _ in range(world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, dim=0).to(x.device)


def same_on_all_ranks(value: int, what: str) -> None:
    """Raise on every rank when an integer (e.g. the number of usable images) differs."""
    if not is_distributed():
        return
    values = all_gather_cat(torch.tensor([int(value)], dtype=torch.long)).tolist()
    if len(set(values)) > 1:
        from edgedistill.errors import UserError

        raise UserError(f"{what} differs between ranks ({values}): every rank must see the same files "
                        "(a shared or identical copy of the data folder)")


def ranks_with(flag: bool) -> list[int]:
    """The ranks where `flag` is true, known on every rank (a collective: every rank must call
    it at the same point). One process: [0] or []."""
    if not is_distributed():
        return [0] if flag else []
    flags = all_gather_cat(torch.tensor([int(bool(flag))], dtype=torch.long)).tolist()
    return [r for r, f in enumerate(flags) if f]


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. writes the embedded dataset or a cache), then the rest:
    avoids several ranks writing the same files at once."""
    if is_distributed() and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main():
            dist.barrier()


def init_from_env(device_spec: str) -> bool:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); False if not launched so."""
    if is_distributed():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return False
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    # One group per process, reused by every command it runs (train then eval in one script);
    # left at exit. Re-creating a group after destroying it is avoided on purpose (flaky with gloo).
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Leave the process group (registered at exit by `init_from_env`)."""
    if is_distributed():
        dist.destroy_process_group()


def device_for_rank(device_spec: str) -> torch.device:
    if torch.cuda.is_available() and device_spec != "cpu":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (queue, BN statistics, momentum encoder) are kept in step by the methods themselves:
    # they are synced once at construction (identical anyway: same seed on every rank), never per
    # forward. torch >= 2.14 spells that `forward_sync_buffers=False`; older torch `broadcast_buffers`.
    import inspect

    kwargs = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(module, **kwargs)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_shards(feats: torch.Tensor, labels: torch.Tensor, per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather contiguous per-rank shards in rank order. Shards shorter than `per_rank` (the
    last ones) are padded for the collective and the padding is cut off again, so every
    sample appears exactly once."""
    n = feats.shape[0]
    if not is_distributed():
        return feats, labels
    pad_f = torch.zeros(per_rank, *feats.shape[1:], dtype=feats.dtype)
    pad_y = torch.full((per_rank,), -1, dtype=labels.dtype)
    if n:
        pad_f[:n], pad_y[:n] = feats, labels
    counts = all_gather_cat(torch.tensor([n]))
    all_f, all_y = all_gather_cat(pad_f), all_gather_cat(pad_y)
    keep = torch.cat([torch.arange(r * per_rank, r * per_rank + int(c)) for r, c in enumerate(counts)])
    return all_f[keep], all_y[keep]
