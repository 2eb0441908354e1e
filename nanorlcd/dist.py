"""torch.distributed glue: one process by default, DDP under torchrun.

Implements: process-group setup from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA, gloo on CPU),
rank-0 printing, strided sharding of work with an order-preserving gather, metric all-reduce and the DDP wrap
of a trained module (shared/DESIGN.md, "Distributed design"; nanochat `common.py` compute_init/compute_cleanup).
Simplified: no FSDP yet (the toy and CI models fit one device).
Run: `torchrun --nproc_per_node=2 train.py ...`; plain `python train.py ...` is world size 1.
"""
import os

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel


def is_distributed():
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init():
    """Join the process group if launched by torchrun; returns (rank, world_size, device). Idempotent."""
    if is_distributed() and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch_dist.init_process_group(backend=backend)
    return rank(), world_size(), device()


def cleanup():
    """Leave the process group (call once at the end of a torchrun job)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def rank():
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size():
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main():
    """Rank 0 prints, logs and writes files (nanoGPT's master_process)."""
    return rank() == 0


def device():
    """This rank's device: cuda:LOCAL_RANK when CUDA is present, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


def shard(items):
    """This rank's share of a list: items[rank::world_size] (balanced; `gather` restores the order)."""
    return items[rank()::world_size()]


def gather(local_items):
    """Inverse of `shard`: every rank gets the full list in the original order."""
    if not torch_dist.is_initialized():
        return list(local_items)
    parts = [None] * world_size()
    torch_dist.all_gather_object(parts, list(local_items))  # parts[r] = items[r::world]
    out = []
    # item i of rank r was items[i * world + r]: interleave back
    for i in range(max(len(p) for p in parts)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op on one process) and return it."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(metrics):
    """Mean of a dict of float metrics over ranks (every rank gets the result)."""
    if not torch_dist.is_initialized():
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device())
    all_reduce_sum(values)
    return {k: v / world_size() for k, v in zip(keys, values.tolist())}


def wrap(model):
    """Wrap a trained module in DDP under torchrun (identity on one process). All ranks must have built the
    same initial weights; DDP also broadcasts rank 0's at construction. Unwrap with `unwrap` to save."""
    if not torch_dist.is_initialized():
        return model
    ids = [device().index] if device().type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model):
    """The plain module inside a DDP wrapper (what gets saved)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
