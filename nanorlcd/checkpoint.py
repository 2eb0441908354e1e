"""Checkpoint I/O in one place: Hugging Face safetensors directories, atomic saves, training state.

What: reading and writing the HF layout (config.json + model.safetensors, or shards + an index)
for any module with HF's parameter names (model.py's LLaMA, pm.py's preference and value models);
checking every tensor at load time; `atomic_dir`, which switches a whole directory (one model, or a
set such as PPO's policy/ + value/) from old to new in one step; and the optimizer, step, RNG and
data position a run needs to resume, as safetensors + JSON. Nothing is ever unpickled.
Atomicity: a save writes a fresh sibling `.NAME.tmp-PID` and renames it into place. A save killed at
any point leaves the old directory (or, between its two renames, `.NAME.old-PID`, which the next
save or load renames back) and at most a temporary directory that the next save or load removes.
Simplified: no fsync, so the guarantee covers a killed process, not a power cut.
Run: `with atomic_dir("run/ppo") as tmp: policy.save_pretrained(f"{tmp}/policy")`.
"""
import contextlib
import json
import os
import random
import re
import shutil
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"
_ACTIVE = set()   # temporary directories of saves in progress in this process


# ----------------------------------------------------------------------------- atomic directories

def _is_weight_file(name):
    """A file of the weight set (model.safetensors, shards, index): not carried into a new save."""
    return name.startswith("model") and (name.endswith(".safetensors") or name == INDEX)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


def _leftovers(path):
    """[(kind 'tmp'|'old', pid, full path)] of the temporary siblings a save of `path` may leave."""
    parent, name = os.path.split(os.path.normpath(os.path.abspath(path)))
    pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)")
    if not os.path.isdir(parent):
        return []
    return [(m[1], int(m[2]), os.path.join(parent, e)) for e in sorted(os.listdir(parent))
            if (m := pattern.fullmatch(e))]


def recover(path):
    """Finishes or undoes a killed save of `path`: removes stale `.NAME.tmp-PID` directories and
    puts back a `.NAME.old-PID` left between the two renames of the swap (or removes it when the
    new one is in place). Leftovers of live processes are left alone. Parents are recovered
    first, so loading run/ppo/policy also repairs a killed save of run/ppo."""
    path = os.path.normpath(os.path.abspath(path))
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        recover(parent)
    for kind, pid, leftover in _leftovers(path):
        if pid == os.getpid() and leftover in _ACTIVE or pid != os.getpid() and _pid_alive(pid):
            continue                                  # a save in progress
        if kind == "old" and not os.path.exists(path):
            os.rename(leftover, path)       # killed between the two renames: keep the old one
        else:
            shutil.rmtree(leftover)


def _link_or_copy(src, dst):
    """Hard link (an open log file keeps writing to the same file), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_dir(path, keep=()):
    """Yields a fresh empty sibling directory `.NAME.tmp-PID`. When the block succeeds it replaces
    `path` as a whole (old renamed aside, new renamed in, old deleted); when it raises, it is
    deleted and `path` is untouched. `keep`: names (or a predicate on names) of entries of the
    old `path` to carry into the new one when the block did not write them, e.g. ("log.jsonl",
    "tokenizer.model"); files are hard-linked, so a log still open for appending keeps writing
    into the new directory."""
    path = os.path.normpath(os.path.abspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a directory (expected a checkpoint directory)")
    recover(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    os.mkdir(tmp)
    _ACTIVE.add(tmp)
    try:
        yield tmp
        keeps = keep if callable(keep) else set(keep).__contains__
        if os.path.isdir(path):
            for entry in sorted(os.listdir(path)):
                src, dst = os.path.join(path, entry), os.path.join(tmp, entry)
                if keeps(entry) and not os.path.lexists(dst):
                    if os.path.isdir(src):
                        shutil.copytree(src, dst, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(src, dst)
            os.rename(path, old)
            os.rename(tmp, path)       # a kill between these two renames is undone by recover()
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(path):
            os.rename(old, path)       # the swap itself failed: put the old directory back
        raise
    finally:
        _ACTIVE.discard(tmp)


def _atomic(final, write):
    """write(tmp_name) then rename over `final`: a reader never sees a half-written file."""
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(p, obj):
    with open(p, "w") as f:
        json.dump(obj, f, indent=2)


# ------------------------------------------------------------------- HF safetensors directories

def read_config_json(path):
    """The raw dict of `path/config.json`, with one-line errors naming the file."""
    recover(path)
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not found (expected a Hugging Face LLaMA directory)")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: malformed JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(d).__name__}")
    return d


def _tied_names(module):
    """Names of parameters that alias another (lm_head.weight when tied): HF omits them."""
    seen, tied = {}, set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


def _weight_files(path):
    """{tensor name: file} for model.safetensors or a sharded set; refuses pickled checkpoints and
    index entries that point outside `path` (an absolute path or a `..`)."""
    recover(path)
    single, index = os.path.join(path, WEIGHTS), os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed shard index (expected JSON with 'weight_map': "
                             f"{e})") from None
        if not isinstance(weight_map, dict) or any(not isinstance(v, str)
                                                    for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            if os.path.isabs(shard) or ".." in re.split(r"[/\\]", shard):
                raise ValueError(f"{index}: shard '{shard}' is outside the checkpoint directory "
                                 "(expected a file name inside it)")
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{os.path.join(path, shard)}: shard listed in {index} is "
                                        "missing")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        with _open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    pickles = [n for n in sorted(os.listdir(path)) if n.endswith((".bin", ".pth", ".pt", ".ckpt"))]
    if pickles:
        raise ValueError(f"{os.path.join(path, pickles[0])}: pickled checkpoints are refused "
                         "(never unpickled); convert to model.safetensors")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


@contextlib.contextmanager
def _open_safetensors(file):
    """safe_open with a damaged or truncated file reported as a one-line ValueError naming it."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{file}: damaged safetensors file ({str(e).splitlines()[0]})") from None


def _check_tensor(file, name, t, want):
    """A tensor read from disk against the parameter it fills: shape, float dtype, finite values."""
    where = f"{file}: tensor '{name}'"
    if t.shape != want.shape:
        raise ValueError(f"{where} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
    if want.is_floating_point() and not t.is_floating_point():
        raise ValueError(f"{where} has dtype {t.dtype}, expected a floating-point dtype")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
        raise ValueError(f"{where} has {n_nan} NaN and {n_inf} inf values as {t.dtype}, expected "
                         "finite weights")


def load_weights(module, path, dtype=torch.float32, device="cpu", missing_ok=(), unexpected_ok=()):
    """Strictly loads an HF safetensors checkpoint into `module` (may live on the meta device),
    tensor by tensor, so peak memory is one copy of the model. Every missing, unexpected,
    misshapen, non-float or non-finite tensor is an error, except names the caller lists as
    missing_ok / unexpected_ok (pm.py: a base LLaMA dir has `lm_head.weight` and no
    `score.weight`)."""
    files = _weight_files(path)
    tied = _tied_names(module) | set(unexpected_ok)
    named = list(module.named_parameters()) + list(module.named_buffers())
    expected = {n: p for n, p in named if n not in tied}
    missing = sorted(set(expected) - set(files) - set(missing_ok))
    if missing:
        raise ValueError(f"{path}: tensor '{missing[0]}' is missing from the checkpoint "
                         f"({len(missing)} missing)")
    unexpected = sorted(set(files) - set(expected) - tied)   # a tied one may carry lm_head.weight
    if unexpected:
        raise ValueError(f"{files[unexpected[0]]}: unexpected tensor '{unexpected[0]}' "
                         f"({len(unexpected)} unexpected)")
    by_file = {}
    for name in sorted(set(files) & set(expected)):
        by_file.setdefault(files[name], []).append(name)
    state = {}
    for file, names in sorted(by_file.items()):
        with _open_safetensors(file) as f:
            absent = sorted(set(names) - set(f.keys()))
            if absent:
                raise ValueError(f"{file}: tensor '{absent[0]}' listed in the shard index is "
                                 "not in this file")
            for name in names:
                t = f.get_tensor(name)
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                _check_tensor(file, name, t, expected[name])
                state[name] = t
    module.load_state_dict(state, strict=False, assign=True)   # strictness was checked above
    if getattr(module.config, "tie_word_embeddings", False) and hasattr(module, "lm_head"):
        module.lm_head.weight = module.model.embed_tokens.weight    # re-tie: assign replaced it
    return module


def write_weights(module, path, config_dict, max_shard_size=5 * 2**30):
    """Writes config.json + model.safetensors (or model-0000k-of-0000n.safetensors + index above
    max_shard_size) into `path`, which should be empty (e.g. a directory from `atomic_dir`)."""
    os.makedirs(path, exist_ok=True)
    tied = _tied_names(module)
    state = {n: t.detach().contiguous().cpu() for n, t in module.state_dict().items()
             if n not in tied}
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map, n = {}, len(shards)
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(os.path.join(path, INDEX), index)
    _write_json(os.path.join(path, CONFIG), config_dict)


def save_weights(module, path, config_dict, max_shard_size=5 * 2**30):
    """`write_weights` into `path` as one atomic step: the old weight files and config.json are
    replaced as a set; every other file already in `path` (tokenizer.model, log.jsonl, ...) is
    kept."""
    with atomic_dir(path, keep=lambda name: not _is_weight_file(name) and name != CONFIG) as tmp:
        write_weights(module, tmp, config_dict, max_shard_size)


# ------------------------------------------------------------------- training state (resume)

def rng_states():
    """Every random generator a run draws from: torch CPU, all CUDA devices, Python's `random`."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def set_rng_states(states):
    """Restores what `rng_states` returned (also after a save/load round trip)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def _encode(obj, name, tensors):
    """obj -> JSON-able value; tensors go to `tensors` under their dotted path `name`. Tuples and
    dicts with int keys (optimizer state) are tagged so that they decode to exactly what was
    saved."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):
            items = {str(k): _encode(v, f"{name}.{k}", tensors) for k, v in obj.items()}
            return {"__int_keys__": items}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state '{name}': cannot save a {type(obj).__name__} (expected "
                    "tensors, numbers, strings, lists, tuples or dicts)")


def _decode(obj, tensors, source):
    if isinstance(obj, list):
        return [_decode(v, tensors, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise ValueError(f"{source}: tensor '{obj['__tensor__']}' is missing")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, source) for v in obj["__tuple__"])
    if "__int_keys__" in obj:
        return {int(k): _decode(v, tensors, source) for k, v in obj["__int_keys__"].items()}
    return {k: _decode(v, tensors, source) for k, v in obj.items()}


def save_training_state(path, optimizer, step, rng_states, extra=None):
    """Writes path/training_state.safetensors (every tensor: optimizer moments, RNG states) and
    path/training_state.json (the rest: step, param groups, `extra` such as the data position).
    The optimizer must hold full tensors (under FSDP2 gather them first). Write it inside the
    same `atomic_dir` as the weights so that model and optimizer always come from the same step."""
    tensors = {}
    payload = _encode({"step": step, "optimizer": optimizer.state_dict(), "rng_states": rng_states,
                       "extra": extra or {}}, "state", tensors)
    # both files carry one save id, so a pair from two different saves is refused at load time
    save_id = f"{time.time_ns()}-{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    _atomic(os.path.join(path, STATE_TENSORS),
            lambda p: save_file(tensors, p, metadata={"format": "pt", "save_id": save_id}))
    payload["save_id"] = save_id
    _atomic(os.path.join(path, STATE_JSON), lambda p: _write_json(p, payload))


def load_training_state(path, optimizer):
    """Loads the optimizer state saved by `save_training_state` into `optimizer` (built over the
    same parameters in the same order) and returns {"step", "rng_states", "extra"}; pass
    rng_states to `set_rng_states`. Every mismatch is a one-line ValueError naming the file."""
    recover(path)
    json_path, tensor_path = os.path.join(path, STATE_JSON), os.path.join(path, STATE_TENSORS)
    for p in (json_path, tensor_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: not found (expected a checkpoint saved with its "
                                    "training state)")
    try:
        with open(json_path) as f:
            payload = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: malformed JSON ({e})") from None
    with _open_safetensors(tensor_path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_id = (f.metadata() or {}).get("save_id")
    if not isinstance(payload, dict) or payload.get("save_id") != save_id:
        raise ValueError(f"{json_path}: save id {payload.get('save_id')!r} does not match "
                         f"{STATE_TENSORS}'s {save_id!r} (the two files come from different saves)")
    state = _decode(payload, tensors, tensor_path)
    saved = state["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"{json_path}: optimizer parameter groups of sizes {sizes}, expected "
                         f"{[len(g['params']) for g in optimizer.param_groups]}")
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    for i, param in zip(ids, params):
        for key, t in saved["state"].get(i, {}).items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != param.shape:
                raise ValueError(f"{tensor_path}: optimizer state '{key}' of parameter {i} has "
                                 f"shape {tuple(t.shape)}, expected {tuple(param.shape)}")
    optimizer.load_state_dict(saved)
    return {"step": state["step"], "rng_states": state["rng_states"], "extra": state["extra"]}
