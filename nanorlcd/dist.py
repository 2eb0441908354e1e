"""torch.distributed glue: one process by default; DDP, FSDP2 or hybrid FSDP2 under torchrun.

Implements: process-group setup from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA, gloo
on CPU) with a collective timeout, rank-0 printing, strided sharding of work with an
order-preserving gather, metric all-reduce, and the wrappers of a model: DDP (every rank holds
everything), FSDP2 `fully_shard` (each decoder block, then the root: parameters, gradients and AdamW
states split over ranks, as the paper's 7B runs did with FSDP on 8 GPUs), or hybrid sharding on a
2-D mesh (replicate across nodes, shard within one). Also: bf16 mixed precision (fp32 master weights
and reductions), per-block activation checkpointing, a context that keeps policies unsharded for a
whole rollout, and full-state-dict gathering / broadcast loading for checkpoints.
Simplified: no tensor or pipeline parallelism, no CPU offload of parameters or optimizer states.
Run: `torchrun --nproc_per_node=2 train.py ...`; plain `python train.py ...` is world size 1.
"""
import contextlib
import datetime
import functools
import os

import torch
import torch.distributed as torch_dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from nanorlcd.model import Block, KVCache, load_config

# Collective timeout: how long a rank waits for the others before it fails (gloo's own default is 30
# minutes, so one stopped rank used to hang the whole job that long). Override with
# init(timeout_s=...) or this variable.
TIMEOUT_ENV = "NANORLCD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


def is_distributed():
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s=None):
    """Join the process group if launched by torchrun; returns (rank, world_size, device).
    Idempotent. timeout_s: seconds any collective may wait for the other ranks (default:
    $NANORLCD_DIST_TIMEOUT or 600)."""
    if is_distributed() and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        limit = datetime.timedelta(seconds=timeout(timeout_s))
        torch_dist.init_process_group(backend=backend, timeout=limit)
    return rank(), world_size(), device()


def timeout(timeout_s=None):
    """The collective timeout in seconds: the argument, else $NANORLCD_DIST_TIMEOUT, else 600."""
    value = timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        value = float(value)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} / timeout_s: {value!r}, expected a positive number of "
                         "seconds")
    return value


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


def barrier(what="barrier", timeout_s=None):
    """Wait for every rank. On gloo a rank that does not arrive within the timeout fails the others
    with an error naming this rank, `what` it waited for and the missing rank(s)
    (monitored_barrier); NCCL's watchdog aborts a stuck collective after the process group's
    timeout."""
    if not torch_dist.is_initialized():
        return
    if torch_dist.get_backend() != "gloo":
        torch_dist.barrier()
        return
    try:
        torch_dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout(timeout_s)),
                                     wait_all_ranks=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RuntimeError(f"rank {rank()}: timed out after {timeout(timeout_s):g} s waiting for "
                           f"the other ranks at '{what}': {first}") from None


def broadcast_str(text):
    """Rank 0's string (e.g. a path only rank 0 knows) on every rank, sent as UTF-8 bytes in a
    tensor; identity on one process. Also a synchronisation point: no rank returns before rank 0
    sent it."""
    if not torch_dist.is_initialized():
        return text
    data = torch.tensor(list(text.encode("utf-8")) if is_main() else [], dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device())   # nccl: CUDA tensors
    torch_dist.broadcast(size, src=0)
    data = data.to(device()) if is_main() else torch.zeros(int(size), dtype=torch.uint8,
                                                            device=device())
    torch_dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).decode("utf-8")


def shard(items):
    """This rank's share of a list: items[rank::world_size] (balanced; `gather` restores order)."""
    return items[rank()::world_size()]


def shard_padded(items):
    """This rank's share padded to the same length on every rank -> (share, n_real): FSDP2 needs
    every rank to run the same number of forwards (a rank that stops early leaves the others waiting
    in an all-gather), so evaluation loops over `share` and ignores results past n_real. The padding
    repeats items[0]; an empty list stays empty everywhere."""
    mine = shard(items)
    longest = -(-len(items) // world_size())                         # ceil(n / world)
    return mine + items[:1] * (longest - len(mine)), len(mine)


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


# ----------------------------------------------------------------------------- wrapping a model

STRATEGIES = ("ddp", "fsdp", "hsdp")


def mesh():
    """The flat 1-D device mesh over all ranks (FSDP2 shards every parameter over all of them)."""
    return init_device_mesh(device().type, (world_size(),), mesh_dim_names=("shard",))


def mesh_2d(nodes, per_node):
    """A (nodes, per_node) mesh for hybrid sharding: FSDP2 replicates over dim 0 and shards over dim
    1, so the per-step all-gathers and reduce-scatters stay inside a node (fast NVLink) and only one
    gradient all-reduce per step crosses nodes. Rank r sits at (r // per_node, r % per_node),
    torchrun's node-major order."""
    if nodes * per_node != world_size():
        raise ValueError(f"mesh_2d: {nodes} nodes x {per_node} ranks per node != world size "
                         f"{world_size()}")
    return init_device_mesh(device().type, (nodes, per_node), mesh_dim_names=("replicate", "shard"))


def node_mesh():
    """mesh_2d for this torchrun job: LOCAL_WORLD_SIZE ranks per node, the rest across nodes."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    return mesh_2d(world_size() // per_node, per_node)


def checkpoint_blocks(model):
    """Activation checkpointing per decoder block (non-reentrant): in training, each Block keeps
    only its input and recomputes its activations in backward (at 7B about 183 KiB -> 8 KiB saved
    per token and layer in bf16). Decoding (a KVCache argument), eval mode and no-grad forwards run
    the block as usual. The Block's `forward` is replaced on the instance, so parameter names and
    checkpoints do not change."""
    for block in model.modules():
        if isinstance(block, Block) and not hasattr(block, "_plain_forward"):
            block._plain_forward = block.forward
            block.forward = functools.partial(_checkpointed_forward, block)
    return model


def _checkpointed_forward(block, *args, **kwargs):
    decoding = any(isinstance(a, KVCache) for a in list(args) + list(kwargs.values()))
    if not (block.training and torch.is_grad_enabled()) or decoding:
        return block._plain_forward(*args, **kwargs)
    # use_reentrant=False: works with FSDP2's hooks and inputs that need no grad; no dropout, so no
    # RNG state to preserve
    return checkpoint(block._plain_forward, *args, use_reentrant=False, preserve_rng_state=False,
                      **kwargs)


def mixed_precision_policy(mixed_precision):
    """None: fp32 throughout (the CPU reference); "bf16": bf16 weights in forward/backward, fp32
    master weights (the sharded parameters AdamW updates) and fp32 gradient reduction (bf16 sums
    would lose low bits)."""
    if mixed_precision is None:
        return MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ValueError(f"mixed_precision: {mixed_precision!r}, expected None or 'bf16'")


def shard_model(model, mesh=None, mixed_precision=None, activation_checkpointing=False,
                reshard_after_forward=True):
    """FSDP2 in place: `fully_shard` each decoder Block (one all-gather / reduce-scatter unit per
    block), then the root (embeddings, final norm, lm_head or score; a tied embedding stays one
    parameter). Works for LLaMA, pm.PreferenceModel and any module holding Blocks, trained or frozen
    (a frozen model just never reduce-scatters). Build the optimizer AFTER this call: the parameters
    become DTensor shards, and an optimizer holding the old tensors would never move the weights.
    `copy.deepcopy` of the result is impossible: copy (reference, value model) first. On one process
    (no process group) only activation checkpointing applies. reshard_after_forward=True also
    reshards the root after each forward, so no forward (e.g. a no-grad eval) leaves unsharded
    tensors registered as the root's parameters. Returns the model."""
    if activation_checkpointing:
        checkpoint_blocks(model)
    if not torch_dist.is_initialized():
        return model
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"shard_model: {type(model).__name__} has no decoder Block to shard")
    mesh = mesh if mesh is not None else globals()["mesh"]()
    kwargs = dict(mesh=mesh, mp_policy=mixed_precision_policy(mixed_precision),
                  reshard_after_forward=reshard_after_forward)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    model._reshard_after_forward = reshard_after_forward   # what `unsharded` restores
    return model


def wrap(model, strategy="ddp", mixed_precision="auto", activation_checkpointing=False):
    """The one switch between 1 process, DDP, FSDP2 and hybrid FSDP2 (identity on one process, apart
    from activation checkpointing). strategy: "ddp" (a trained model is replicated and its gradients
    all-reduced; a frozen one is returned as is), "fsdp" (`shard_model` on the flat mesh), "hsdp"
    (`shard_model` on `node_mesh()`, for torchrun --nnodes > 1). mixed_precision: "auto" = bf16
    under FSDP on CUDA, else fp32 (DDP trains with optim.autocast instead). Build the optimizer
    after wrap for "fsdp" and "hsdp". Unwrap DDP with `unwrap`; gather an FSDP model with
    `full_state_dict` / `gathered` / `save_pretrained`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r}, expected one of {STRATEGIES}")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if device().type == "cuda" else None
    if strategy == "ddp":
        if activation_checkpointing:
            checkpoint_blocks(model)
        if not torch_dist.is_initialized() or not any(p.requires_grad for p in model.parameters()):
            return model
        ids = [device().index] if device().type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    mesh_ = node_mesh() if strategy == "hsdp" and torch_dist.is_initialized() else None
    return shard_model(model, mesh_, mixed_precision, activation_checkpointing)


def unwrap(model):
    """The plain module inside a DDP wrapper (what gets saved); an FSDP model is returned as is."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model):
    return isinstance(model, FSDPModule)


def _fsdp_modules(models):
    return [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]


def reshard_all(*models):
    """Free every unsharded parameter of these FSDP models (reshard() itself is not recursive)."""
    for m in _fsdp_modules(models):
        m.reshard()


@contextlib.contextmanager
def unsharded(*models):
    """Keep sharded models whole for a block of no-grad work, e.g. a whole rollout: each FSDP unit
    is all-gathered once on entry (collective: every rank enters together) and stays gathered, so
    the per-token forwards of `sample.generate` run no collective at all (ranks may then decode
    different numbers of steps) and calls that reach into submodules (`model.model`,
    `model.lm_head`) see plain tensors. Under bf16 mixed precision the gathered weights are bf16, so
    a KV cache sized by `lm_head.weight.dtype` is bf16 too. On exit everything is resharded. Pass
    the FSDP roots (e.g. the actor-critic, not its policy); others are ignored. Costs one full bf16
    copy of each model per GPU while inside."""
    roots = [m for m in models if isinstance(m, FSDPModule)]
    for r in roots:
        # make `r` the FSDP root now: otherwise the first block called directly (sample.py calls
        # model.model) would become a root and the later root forward would fail
        r._get_fsdp_state()._lazy_init()
        r.set_reshard_after_forward(False)
    for m in _fsdp_modules(roots):
        m.unshard()
    try:
        yield
    finally:
        for r in roots:
            r.set_reshard_after_forward(getattr(r, "_reshard_after_forward", True))
        reshard_all(*roots)


# ----------------------------------------------------------------------------- checkpoints

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model):
    """{name: CPU tensor} of the whole model on rank 0 ({} on the others), for the safetensors
    writer. Collective for FSDP models (every rank must call it): each unit is all-gathered and
    copied to CPU in turn, so no GPU ever holds the whole model."""
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=FULL)
    if not is_main():
        return {}
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def _plain_class(model):
    """LLaMA for FSDPLLaMA (fully_shard swaps in a subclass)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def gathered(model):
    """A plain (unsharded, CPU) copy of the model on rank 0 built from `full_state_dict` (None
    elsewhere): call its `save_pretrained`. Collective. The model class must be constructible from
    `model.config`."""
    model = unwrap(model)
    state = full_state_dict(model)
    if not is_main():
        return None
    with torch.device("meta"):
        plain = _plain_class(model)(model.config)
    plain.load_state_dict(state, strict=False, assign=True)   # a tied lm_head may be absent: re-tie
    if getattr(plain.config, "tie_word_embeddings", False) and hasattr(plain, "lm_head"):
        plain.lm_head.weight = plain.model.embed_tokens.weight
    leftover = [n for n, p in plain.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"gathered: tensor '{leftover[0]}' missing from the gathered state dict")
    return plain.train(model.training)


def save_pretrained(model, path, *args, **kwargs):
    """`save_pretrained(path, ...)` of the whole model, written by rank 0 (collective for FSDP)."""
    plain = gathered(model)
    if plain is not None:
        plain.save_pretrained(path, *args, **kwargs)
    barrier(f"save {path}")


def load_sharded(model, state_dict):
    """Fill a sharded model (built on the meta device, then `shard_model`/`wrap`) with rank 0's full
    `state_dict` ({} on the other ranks): each rank receives only its shards by broadcast, so no
    rank but 0 ever holds a full copy. Meta parameters are first materialised on this rank's device
    in their own dtype; the broadcast then copies and casts into them (a bf16 file into an fp32
    model stays fp32). Collective."""
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device())
    if not isinstance(model, FSDPModule):
        raise ValueError(f"load_sharded: {type(model).__name__} is not sharded (call shard_model "
                         "first)")
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=True))
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_pretrained(cls, path, strategy="ddp", dtype=torch.float32, mixed_precision="auto",
                    activation_checkpointing=False, **from_pretrained_kwargs):
    """`cls.from_pretrained(path)` (LLaMA or PreferenceModel) wrapped by `wrap(strategy)`. Under
    FSDP only rank 0 reads the files; the others build on the meta device and receive their shards
    by broadcast."""
    if strategy == "ddp" or not torch_dist.is_initialized():
        model = cls.from_pretrained(path, dtype=dtype, device=device(), **from_pretrained_kwargs)
        return wrap(model, "ddp", mixed_precision, activation_checkpointing)
    full = cls.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs) if is_main() else None
    with torch.device("meta"):
        model = cls(load_config(path)).to(dtype)
    model = wrap(model, strategy, mixed_precision, activation_checkpointing)
    return load_sharded(model, full.state_dict() if full is not None else {}).eval()

