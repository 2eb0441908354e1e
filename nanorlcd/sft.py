"""Supervised LM training: the toy world's pretraining and the context-distillation baseline.

What: next-token cross-entropy on (prompt, response) examples, the loss on the response tokens
only (and what ends them); an empty prompt is a pretraining document, the loss on every token.
Context distillation (paper Sec. 4, "Baselines") is SFT of the base model on (p, o+): the plain
prompt and RLCD's o+. The reference (facebookresearch/RLCD running AlpacaFarm's supervised.py)
trains on prompt + " " + o+ + "\\n\\nHuman:" + EOS, one example per row, 128 examples per step,
AdamW (weight decay 0, betas 0.9 / 0.999), lr 2e-5, 3 % warmup, cosine decay to 0, 3 epochs, the
loss a mean over examples of each one's mean token loss: SFTConfig expresses all of it.
Simplified: `packing=True` (toy pretraining, as nanoGPT) packs whole examples into rows where they
attend to each other; an over-long example keeps its last tokens (the reference keeps its first).
Under torchrun, SFTConfig.strategy replicates the model (DDP) or shards it (FSDP2, dist.wrap).
Run: `python train.py --stage sft`; in code `train_lm(SFTConfig(), model, tok, train, val, out)`.
"""
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanorlcd import checkpoint, dist
from nanorlcd.dialogue import HUMAN, join
from nanorlcd.optim import autocast, lr_at, micro_steps, optimizer_step, set_lr


@dataclass
class SFTConfig:
    max_steps: int = 0              # optimizer steps; 0 = derive from `epochs`
    epochs: float = 3.0             # passes over the training rows if max_steps is 0 (reference: 3)
    batch_size: int = 16            # rows per optimizer step, all ranks and micro-steps (ref.: 128)
    micro_batch_size: int = 0       # rows per forward/backward on one rank; 0 = batch_size / ranks
    seq_len: int = 256              # input tokens per row (an over-long example keeps its end)
    packing: bool = True            # pack whole examples into rows; False: one per row (ref.)
    append_end_marker: bool = False  # target = response + "\n\nHuman:" + EOS (reference)
    per_example_loss: bool = False  # mean of each example's mean token loss (ref.; no packing);
    #                                 False: the mean over all loss tokens of the global batch
    lr: float = 1e-3                # peak AdamW learning rate (reference distillation: 2e-5)
    warmup_steps: int = 30          # linear warmup steps; 0 = ceil(warmup_ratio * steps)
    warmup_ratio: float = 0.0       # warmup fraction, used when warmup_steps is 0 (reference: 0.03)
    min_lr_ratio: float = 0.1       # the cosine decays to lr * min_lr_ratio (reference: 0)
    weight_decay: float = 0.1       # AdamW decay on matrices / embeddings, not norms (reference: 0)
    beta1: float = 0.9              # AdamW β1 (reference: 0.9)
    beta2: float = 0.95             # AdamW β2 (reference: 0.999, the HF Trainer's default)
    grad_clip: float = 1.0          # max global gradient norm, 0 = none (reference: 1.0)
    eval_every: int = 100           # validation loss every this many steps (and at the end)
    save_every: int = 0             # resumable checkpoint in out_dir every N steps (0: none)
    log_every: int = 10             # JSONL line and printed line every this many steps
    bf16: bool = False              # bf16 autocast on CUDA (ignored on CPU, which trains in fp32)
    seed: int = 0                   # data-order seed (initial weights are the caller's)
    strategy: str = "ddp"           # under torchrun: "ddp" replicas, "fsdp" / "hsdp" FSDP2 shards
    activation_checkpointing: bool = False  # recompute each block in backward (less memory)


def tokenize_example(tokenizer, prompt, response, seq_len, end_marker=False):
    """Ids of BOS + dialogue.join(prompt, response) [+ "\\n\\nHuman:"] + EOS and the loss mask (1 on
    the tokens trained: the response, the end marker, EOS). The seam is one space, as in sampling
    and PM scoring. With end_marker the model learns to end its turn where sampling stops a reply
    (the reference's context-distillation target: o+.rstrip() + "\\n\\nHuman:" + EOS)."""
    if end_marker:
        response = response.rstrip() + HUMAN
    full = tokenizer.encode(join(prompt, response), bos=True, eos=True)
    head = tokenizer.encode(prompt, bos=True, eos=False)
    # the response starts where the prompt's tokens stop matching (a merge across the seam)
    start = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), len(head))
    mask = [0] * start + [1] * (len(full) - start)
    # a row holds seq_len + 1 tokens (inputs and shifted targets); keep an over-long example's end
    return full[-(seq_len + 1):], mask[-(seq_len + 1):]


def pack_rows(examples, seq_len, seed):
    """Shuffle tokenized examples; pack them whole into rows of <= seq_len + 1 tokens (next fit)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows, ids, mask = [], [], []
    for i in order:
        e_ids, e_mask = examples[i]
        if len(ids) + len(e_ids) > seq_len + 1:
            rows.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + e_ids, mask + e_mask
    if ids:
        rows.append((ids, mask))
    return rows


def epoch_rows(examples, seq_len, packing, seed):
    """One epoch of rows: packed (pack_rows), or the examples shuffled, one per row."""
    if packing:
        return pack_rows(examples, seq_len, seed)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order]


def collate(rows, pad_id=0):
    """Right-pad rows to the longest one: inputs, targets (B, T) and target loss mask (B, T).

    Right padding needs no attention mask: under causal attention no real token sees a later pad.
    """
    T = max(len(ids) for ids, _ in rows) - 1
    ids = torch.full((len(rows), T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T + 1)
    for b, (r_ids, r_mask) in enumerate(rows):
        ids[b, :len(r_ids)] = torch.tensor(r_ids)
        mask[b, :len(r_mask)] = torch.tensor(r_mask, dtype=torch.float)
    # position t predicts token t + 1: (B, T) inputs, (B, T) targets, and the mask of those targets
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def row_losses(model, rows, device, bf16=False):
    """Per row: the summed cross-entropy over its loss tokens (B,) and their count (B,)."""
    inputs, targets, mask = (x.to(device) for x in collate(rows))
    with autocast(device, bf16):
        logits = model(inputs)                                              # (B, T, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (nll.view_as(mask) * mask).sum(1), mask.sum(1)                   # (B,), (B,)


def weighted_loss(sums, counts, per_example):
    """(numerator, weight) of some rows: the token sum and token count, or the sum of per-row means
    and the row count. A batch's loss is the numerators' sum over the weights' sum."""
    if per_example:
        return (sums / counts.clamp(min=1)).sum(), torch.tensor(float(len(sums)))
    return sums.sum(), counts.sum()


@torch.no_grad()
def evaluate_loss(model, rows, cfg, device):
    """Validation loss, weighted as in training, over all rows (sharded over ranks, summed back).
    Every rank runs the same number of forwards (dist.shard_padded: an FSDP2 forward is collective);
    the padding rows past this rank's n_real are computed and dropped."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)             # [numerator, weight]
    mine, n_real = dist.shard_padded(rows)
    for i in range(0, len(mine), cfg.micro_batch_size):
        sums, counts = row_losses(model, mine[i:i + cfg.micro_batch_size], device, cfg.bf16)
        real = max(0, n_real - i)                                # real rows in this batch
        num, weight = weighted_loss(sums[:real], counts[:real], cfg.per_example_loss)
        total += torch.stack([num.double(), weight.double().to(device)])
    model.train()
    dist.all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def stop_if_not_finite(stage, step, **values):
    """A NaN or inf loss / gradient norm stops training before anything is saved (one line)."""
    bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"{stage}: step {step}: non-finite {', '.join(bad)}; stopped, "
                                 "nothing saved (lower the learning rate, check weights and data)")


def _carried(name):
    """Files of an old checkpoint directory that a new one keeps (logs, tokenizer, notes), but no
    weights or training state: a save rewrites those, and no stale shard or state may survive."""
    return not (name.endswith((".safetensors", ".safetensors.index.json"))
                or name.startswith("training_state"))


def save_checkpoint(out_dir, write, optimizer=None, step=0, resume_state=None):
    """Rank 0 calls write(tmp) to put the model files into a fresh directory, adds the training
    state (optimizer, step, RNG, `resume_state`) for a periodic checkpoint, and swaps it in for
    out_dir as a whole (checkpoint.atomic_dir: a kill leaves the old one). Every rank waits."""
    if dist.is_main():
        with checkpoint.atomic_dir(out_dir, keep=_carried) as tmp:
            write(tmp)
            if resume_state is not None:
                checkpoint.save_training_state(tmp, optimizer, step, checkpoint.rng_states(),
                                               extra=resume_state)
    dist.barrier()


def resume_from(out_dir, optimizer, identity):
    """Load out_dir's training state into `optimizer` and the RNGs -> the step to continue from.
    The run must be the same (`identity`: data digest, config), else a one-line error naming it."""
    state = checkpoint.load_training_state(out_dir, optimizer)
    for key, value in identity.items():
        if state["extra"].get(key) != value:
            raise ValueError(f"{out_dir}: cannot resume: its checkpoint has {key}="
                             f"{state['extra'].get(key)!r}, this run {value!r}")
    checkpoint.set_rng_states(state["rng_states"])
    return state["step"]


def run_identity(cfg, data):
    """What a resumed run must share with the run it continues: the data and the settings."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    # how a run is split over ranks or recomputed changes no number it trains to
    skip = ("save_every", "log_every", "eval_every", "strategy", "activation_checkpointing")
    return {"data": digest, "config": {k: v for k, v in asdict(cfg).items() if k not in skip}}


def check_strategy(name, cfg, world):
    """cfg.strategy is one of dist.STRATEGIES; sharded runs write no resumable checkpoints (the
    optimizer state is split over ranks, and the training-state file holds one rank's tensors)."""
    if cfg.strategy not in dist.STRATEGIES:
        raise ValueError(f"{name}.strategy={cfg.strategy!r}: expected one of {dist.STRATEGIES}")
    if cfg.strategy != "ddp" and world > 1 and cfg.save_every:
        raise ValueError(f"{name}.save_every={cfg.save_every}: resumable checkpoints need "
                         f"strategy='ddp' (got {cfg.strategy!r}); use save_every=0")


def check_config(cfg, world):
    """Validate an SFTConfig for `world` ranks -> (micro-batch size, accumulation steps)."""
    micro_batch_size = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    accum, rem = divmod(cfg.batch_size, micro_batch_size * world)
    if rem or accum == 0:
        raise ValueError(f"SFTConfig.batch_size={cfg.batch_size} must be a multiple of "
                         f"micro_batch_size ({micro_batch_size}) x world size ({world})")
    if cfg.per_example_loss and cfg.packing:
        raise ValueError("SFTConfig.per_example_loss=True needs packing=False (one example a row)")
    check_strategy("SFTConfig", cfg, world)
    if cfg.warmup_steps < 0 or not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"SFTConfig.warmup_steps={cfg.warmup_steps}, warmup_ratio="
                         f"{cfg.warmup_ratio}: expected warmup_steps >= 0, 0 <= warmup_ratio < 1")
    return micro_batch_size, accum


def train_lm(cfg, model, tokenizer, train_examples, val_examples, out_dir=None, log_path=None,
             resume=False):
    """Train `model` (on this rank's device, the same initial weights on every rank) on
    (prompt, response) pairs; an empty prompt means a pretraining document. Rank 0 saves model
    + tokenizer to out_dir. resume=True continues from out_dir's last periodic checkpoint
    (`save_every`) where it stopped. Returns a summary dict (last losses, steps, seconds)."""
    _, world, device = dist.init()
    micro_batch_size, accum = check_config(cfg, world)
    if not train_examples:
        raise ValueError("train_lm: train_examples is empty")

    # 1. tokenize once; every rank builds the same rows from the seed and takes its slice of a batch
    def tokenize(pairs):
        return [tokenize_example(tokenizer, p, r, cfg.seq_len, cfg.append_end_marker)
                for p, r in pairs]

    train_tok = tokenize(train_examples)
    val_rows = epoch_rows(tokenize(val_examples), cfg.seq_len, cfg.packing, seed=0)
    rows_per_epoch = len(epoch_rows(train_tok, cfg.seq_len, cfg.packing, cfg.seed))
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * rows_per_epoch / cfg.batch_size)
    cfg = replace(cfg, micro_batch_size=micro_batch_size,    # resolved, as logged and saved
                  warmup_steps=cfg.warmup_steps or math.ceil(cfg.warmup_ratio * max_steps))

    def row_stream():  # endless stream of rows, re-shuffled (and re-packed) every epoch
        epoch = 0
        while True:
            yield from epoch_rows(train_tok, cfg.seq_len, cfg.packing, cfg.seed + epoch)
            epoch += 1

    # 2. wrap (DDP replica, or FSDP2: `model` itself becomes the sharded root), then the optimizer
    #    over the wrapped parameters (FSDP2 replaces them by DTensor shards: an optimizer built
    #    before would never move the weights): decay on matrices / embeddings (dim >= 2), none on
    #    RMSNorm weights. A resumed run first loads its weights (the loader may replace tensors).
    identity, start = run_identity(cfg, [train_examples, val_examples]), 0
    if resume:
        if dist.is_sharded(model) or (cfg.strategy != "ddp" and world > 1):
            raise ValueError(f"train_lm: resume needs strategy='ddp' (got {cfg.strategy!r})")
        dtype = next(model.parameters()).dtype
        checkpoint.load_weights(model, out_dir, dtype=dtype, device=device)
    ddp_model = model if dist.is_sharded(model) else dist.wrap(
        model, cfg.strategy, activation_checkpointing=cfg.activation_checkpointing)
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if resume:
        start = resume_from(out_dir, optimizer, identity)
    model.train()
    log = open(log_path, "a") if (log_path and dist.is_main()) else None
    if log:
        log.write(json.dumps({"config": asdict(cfg), "max_steps": max_steps, "world_size": world,
                              "start_step": start}) + "\n")
    dist.print0(f"sft: {len(train_examples)} examples, {rows_per_epoch} rows/epoch, {max_steps} "
                f"steps, accumulation {accum}, world {world}, config {asdict(cfg)}")

    # 3. the loop: one optimizer step per global batch of cfg.batch_size rows
    stream, t0, summary = row_stream(), time.time(), {}
    for _ in range(start * cfg.batch_size):            # a resumed run skips the rows already used
        next(stream)
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, disable=not dist.is_main(),
               desc="sft", dynamic_ncols=True)
    for step in bar:
        t_step = time.time()
        batch = [next(stream) for _ in range(cfg.batch_size)]
        n_tokens = sum(sum(m) for _, m in batch)
        # one global normaliser on every rank, so DDP's mean of gradients is the global batch's
        denominator = cfg.batch_size if cfg.per_example_loss else max(n_tokens, 1)
        lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, "cosine", cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for micro, sync_context in micro_steps(ddp_model, accum):
            # this rank's rows: the (micro * world + rank)-th block of micro_batch_size rows
            first = (micro * world + dist.rank()) * micro_batch_size
            with sync_context:
                sums, counts = row_losses(ddp_model, batch[first:first + micro_batch_size], device,
                                          cfg.bf16)
                num, _ = weighted_loss(sums, counts, cfg.per_example_loss)
                (num * world / denominator).backward()
            total += num.detach().double()
        loss = dist.all_reduce_sum(total).item() / denominator
        stop_if_not_finite("sft", step + 1, loss=loss)          # before the step: weights intact
        grad_norm = optimizer_step(optimizer, params, cfg.grad_clip).item()
        stop_if_not_finite("sft", step + 1, grad_norm=grad_norm)
        # 4. logging and validation (rank 0 writes; every rank joins the validation all-reduce)
        record = {"step": step + 1, "train/loss": loss, "train/lr": lr,
                  "train/grad_norm": grad_norm, "train/tokens": n_tokens,
                  "train/ms": 1000 * (time.time() - t_step)}
        last = step + 1 == max_steps
        if val_rows and ((step + 1) % cfg.eval_every == 0 or last):
            record["val/loss"] = evaluate_loss(model, val_rows, cfg, device)
            stop_if_not_finite("sft", step + 1, val_loss=record["val/loss"])
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        if (step + 1) % cfg.log_every == 0 or last or "val/loss" in record:
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if "val/loss" in record and dist.is_main():
                bar.write(f"step {step + 1}: loss {loss:.4f} val {record['val/loss']:.4f} "
                          f"lr {lr:.2e} {record['train/ms']:.0f} ms")
        summary.update(record)

        # 5. checkpoints (HF layout) + tokenizer + resolved config, swapped in whole; the periodic
        #    ones add the training state, the last one is the result. `dist.gathered` is collective:
        #    a sharded model is all-gathered unit by unit into a plain CPU copy on rank 0 (None on
        #    the others, which only wait)
        def write(tmp):
            plain.save_pretrained(tmp)
            tokenizer.save(tmp)
            with open(os.path.join(tmp, "sft_config.json"), "w") as f:
                json.dump({**asdict(cfg), "step": step + 1}, f, indent=1)

        periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
        plain = dist.gathered(model) if out_dir and (last or periodic) else None
        if out_dir and last:
            save_checkpoint(out_dir, write)
        elif out_dir and periodic:
            save_checkpoint(out_dir, write, optimizer, step + 1, resume_state=identity)
    bar.close()
    summary["train/seconds"] = time.time() - t0
    if log:
        log.close()
    return summary
