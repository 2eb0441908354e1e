"""Supervised language-model training: toy pretraining and the context-distillation baseline.

Implements: next-token cross-entropy on (prompt, response) examples with the loss on the response tokens only
(and the EOS that ends them). Pretraining is the special case of an empty prompt: the loss covers the whole
document. Paper: context distillation (RLCD Sec. 4, "Baselines") = SFT of the base LM on (p, o+) from RLCD's
simulated data; AlpacaFarm trains it with loss on the response only, 3 epochs, lr 2e-5, 128 examples per step,
cosine schedule. Training: AdamW, linear warmup then cosine decay, gradient clipping, gradient accumulation,
validation loss, DDP through dist.py, JSONL log, tqdm bar, checkpoint in the Hugging Face layout.
Simplified: examples are packed whole into rows of `seq_len` tokens (never split; an example longer than a row
keeps its last tokens), and rows may hold several examples that attend to each other (each starts with BOS),
as in nanoGPT-style pretraining. The loss is the mean over the loss tokens of the whole global batch, so one
process and N processes compute the same gradient for the same global batch.
Run: `python train.py --stage pretrain` (toy) or `--stage sft`; in code `train_lm(SFTConfig(), model, tok,
train_examples, val_examples, out_dir, log_path)`.
"""
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanorlcd import dist


@dataclass
class SFTConfig:
    max_steps: int = 0  # optimizer steps; 0 = derive from `epochs`
    epochs: float = 3.0  # passes over the training rows when max_steps is 0 (paper's CD: 3)
    batch_size: int = 16  # global batch in packed rows per optimizer step (all ranks and micro-steps together)
    micro_batch_size: int = 0  # rows per forward/backward on one rank (0 = batch_size / ranks: no accumulation);
    # gradient accumulation steps = batch_size / (micro_batch_size * ranks)
    seq_len: int = 256  # tokens per packed row (an example never spans two rows)
    lr: float = 1e-3  # peak AdamW learning rate (toy pretraining 5e-3; the paper's 7B context distillation: 2e-5)
    min_lr_ratio: float = 0.1  # the cosine schedule decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup from 0 to lr (the paper: 3 % of the steps)
    weight_decay: float = 0.1  # AdamW decay on matrices and embeddings; none on norm weights
    beta1: float = 0.9  # AdamW β1
    beta2: float = 0.95  # AdamW β2
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    eval_every: int = 100  # validation loss every this many steps (and at the end)
    log_every: int = 10  # JSONL line and printed line every this many steps
    bf16: bool = False  # bf16 autocast on CUDA (ignored on CPU, which trains in fp32)
    seed: int = 0  # data-order seed (initial weights are the caller's)


def tokenize_example(tokenizer, prompt, response, seq_len):
    """Token ids of BOS + prompt + " " + response + EOS (an empty prompt adds no space) and the loss mask
    (1 on the tokens that are predicted and trained: the response and EOS). The seam is exactly one space, as in
    sampling and PM scoring: a response's own leading whitespace (raw HH replies start with " ") is dropped, since
    a doubled space would train a piece the policy never emits after "Assistant:"."""
    text = prompt + " " + response.lstrip() if prompt else response
    full = tokenizer.encode(text, bos=True, eos=True)
    head = tokenizer.encode(prompt, bos=True, eos=False)
    # the response starts where the prompt's tokens stop matching (a merge across the seam moves it left)
    start = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), len(head))
    mask = [0] * start + [1] * (len(full) - start)
    # a row holds seq_len + 1 tokens (inputs and shifted targets); keep the end of an over-long example
    return full[-(seq_len + 1):], mask[-(seq_len + 1):]


def pack_rows(examples, seq_len, seed):
    """Shuffle tokenized examples and pack them, whole, into rows of at most seq_len + 1 tokens (next fit)."""
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


def collate(rows, pad_id=0):
    """Right-pad rows to the longest one: inputs, targets (B, T) and target loss mask (B, T).

    Right padding needs no attention mask: with causal attention, real tokens never see the pads after them.
    """
    T = max(len(ids) for ids, _ in rows) - 1
    ids = torch.full((len(rows), T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T + 1)
    for b, (r_ids, r_mask) in enumerate(rows):
        ids[b, :len(r_ids)] = torch.tensor(r_ids)
        mask[b, :len(r_mask)] = torch.tensor(r_mask, dtype=torch.float)
    # position t predicts token t + 1: (B, T) inputs, (B, T) targets, and the mask of those targets
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def loss_sum(model, rows, device, bf16=False):
    """Summed cross-entropy over the loss tokens of `rows`, and their count."""
    inputs, targets, mask = (x.to(device) for x in collate(rows))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        logits = model(inputs)  # (B, T, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B * T,)
    return (nll * mask.flatten()).sum(), mask.sum()


@torch.no_grad()
def evaluate_loss(model, rows, cfg, device):
    """Mean loss per loss token over all validation rows (sharded over ranks, summed back)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, token count]
    mine = dist.shard(rows)
    for i in range(0, len(mine), cfg.micro_batch_size):
        s, n = loss_sum(model, mine[i:i + cfg.micro_batch_size], device, cfg.bf16)
        total += torch.stack([s.double(), n.double()])
    model.train()
    dist.all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def get_lr(step, max_steps, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps (nanoGPT)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # 1 -> 0
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * coeff)


def train_lm(cfg, model, tokenizer, train_examples, val_examples, out_dir=None, log_path=None):
    """Train `model` (already on this rank's device, same initial weights on every rank) on (prompt, response)
    pairs; an empty prompt means a pretraining document. Saves model + tokenizer to out_dir on rank 0.
    Returns a summary dict (final train and validation loss, steps, seconds)."""
    _, world, device = dist.init()
    micro_batch_size = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    accum, rem = divmod(cfg.batch_size, micro_batch_size * world)
    if rem or accum == 0:
        raise ValueError(f"SFTConfig.batch_size={cfg.batch_size} must be a multiple of micro_batch_size "
                         f"({micro_batch_size}) x world size ({world})")
    cfg = replace(cfg, micro_batch_size=micro_batch_size)  # resolved, as logged and saved
    if not train_examples:
        raise ValueError("train_lm: train_examples is empty")
    # 1. tokenize once; every rank packs the same rows from the seed and takes its slice of each batch
    train_tok = [tokenize_example(tokenizer, p, r, cfg.seq_len) for p, r in train_examples]
    val_rows = pack_rows([tokenize_example(tokenizer, p, r, cfg.seq_len) for p, r in val_examples],
                         cfg.seq_len, seed=0)
    rows_per_epoch = len(pack_rows(train_tok, cfg.seq_len, cfg.seed))
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * rows_per_epoch / cfg.batch_size)

    def row_stream():  # endless stream of rows, re-shuffled and re-packed every epoch
        epoch = 0
        while True:
            yield from pack_rows(train_tok, cfg.seq_len, cfg.seed + epoch)
            epoch += 1

    # 2. optimizer: decay on matrices / embeddings (dim >= 2), none on RMSNorm weights
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    ddp_model = dist.wrap(model)
    model.train()
    log = open(log_path, "a") if (log_path and dist.is_main()) else None
    if log:
        log.write(json.dumps({"config": asdict(cfg), "max_steps": max_steps, "world_size": world}) + "\n")
    dist.print0(f"sft: {len(train_examples)} examples, {rows_per_epoch} rows/epoch, {max_steps} steps, "
                f"accumulation {accum}, world {world}, config {asdict(cfg)}")

    # 3. the loop: one optimizer step per global batch of cfg.batch_size rows
    stream, t0, summary = row_stream(), time.time(), {}
    bar = tqdm(range(max_steps), disable=not dist.is_main(), desc="sft", dynamic_ncols=True)
    for step in bar:
        t_step = time.time()
        batch = [next(stream) for _ in range(cfg.batch_size)]
        # the global token count normalises every rank's loss, so DDP's gradient mean = the global mean
        n_global = sum(sum(m) for _, m in batch)
        lr = get_lr(step, max_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(accum):
            # rows of this rank's micro-step: (micro * world + rank)-th block of micro_batch_size rows
            first = (micro * world + dist.rank()) * cfg.micro_batch_size
            rows = batch[first:first + cfg.micro_batch_size]
            sync = micro == accum - 1 or world == 1  # all-reduce gradients only on the last micro-step
            with contextlib.nullcontext() if sync else ddp_model.no_sync():
                s, _ = loss_sum(ddp_model, rows, device, cfg.bf16)
                (s * world / max(n_global, 1)).backward()
            total += s.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = dist.all_reduce_sum(total).item() / max(n_global, 1)
        # 4. logging and validation (rank 0 writes; every rank takes part in the validation all-reduce)
        record = {"step": step + 1, "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm.item(),
                  "train/tokens": n_global, "train/ms": 1000 * (time.time() - t_step)}
        last = step + 1 == max_steps
        if val_rows and ((step + 1) % cfg.eval_every == 0 or last):
            record["val/loss"] = evaluate_loss(model, val_rows, cfg, device)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        if (step + 1) % cfg.log_every == 0 or last or "val/loss" in record:
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if "val/loss" in record and dist.is_main():
                bar.write(f"step {step + 1}: loss {loss:.4f} val {record['val/loss']:.4f} lr {lr:.2e} "
                          f"{record['train/ms']:.0f} ms")
        summary.update(record)
    bar.close()
    # 5. checkpoint: the unwrapped module in the HF layout, the tokenizer and the resolved config beside it
    if out_dir and dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save(out_dir)  # no-op when out_dir already holds this tokenizer.model
        with open(os.path.join(out_dir, "sft_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    dist.barrier()
    summary["train/seconds"] = time.time() - t0
    if log:
        log.close()
    return summary
