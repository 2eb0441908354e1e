"""The preference model (PM): a LLaMA backbone with a scalar head, trained on simulated preference pairs.

Implements RLCD's step 2 (paper Sec. 3; PAPER.md "Settings"; AlpacaFarm's reward model as RLCD ran it):
  - `PreferenceModel`: the backbone of model.py plus `score`, a bias-free Linear(D, 1) read at the last real token
    of each sequence, saved in Hugging Face's `LlamaForSequenceClassification` layout (`score.weight`,
    num_labels 1), so other tools load it too;
  - the reward text prompt + " " + response + "\\n\\nHuman:" (`reward_inputs`), shared with ppo.py's scoring;
  - the Bradley-Terry loss -log σ(r_chosen − r_rejected), and with a soft label p = label_prob (RLAIF,
    RLCD-Rescore) the cross-entropy −[p log σ(Δ) + (1 − p) log σ(−Δ)];
  - `train_pm`: AdamW, warmup + cosine, grad clipping and accumulation, one epoch, a held-out split, DDP;
  - evaluation: accuracy on held-out pairs, agreement with human labels on HH-RLHF (paper Table 5: accuracy and
    mean σ(r_chosen − r_rejected)), and in the toy world accuracy against the oracle.
Simplified: no resumable optimizer state (a run restarts from the base), no FSDP; a global batch that does not
fill up at the end of an epoch is dropped; the held-out split is the *last* eval_frac of the prefs file.
Run: `python train.py --stage pm --method rlcd`; in code `train_pm(PMConfig(), "out/toy/base",
"out/toy/prefs-rlcd.jsonl", "out/toy/pm-rlcd")`; 2 processes: `torchrun --nproc_per_node=2 train.py --stage pm`.
"""
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanorlcd import dist
from nanorlcd.data import _parse_lines, load_hh_pairs
from nanorlcd.model import Transformer, init_weights, load_config, load_weights, read_config_json, save_weights
from nanorlcd.sample import HUMAN_TURN
from nanorlcd.sft import get_lr
from nanorlcd.tokenizer import Tokenizer, left_pad


class PreferenceModel(nn.Module):
    """r(x) = w · h_last(x): backbone hidden state at the last real token, times the head `score` (no bias)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.model.apply(lambda m: init_weights(m, cfg.initializer_range))
        init_score_(self.score)

    def forward(self, input_ids, attention_mask=None):
        """(B, T) ids and 1/0 mask, left OR right padded -> rewards (B,) in float32."""
        B, T = input_ids.shape
        h = self.model(input_ids, attention_mask)                               # (B, T, D)
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=input_ids.device)
        else:
            if not attention_mask.bool().any(-1).all():
                raise ValueError("attention_mask: a row has no real token (expected at least one 1 per row)")
            # the position of the last 1 in each row: T - 1 under left padding, the row's length - 1 under right
            pos = torch.arange(T, device=input_ids.device)                      # (T,)
            last = (pos * attention_mask.long()).argmax(-1)                     # (B,)
        h_last = h[torch.arange(B, device=h.device), last]                     # (B, D)
        return self.score(h_last).squeeze(-1).float()                          # (B,)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A saved PM dir (architectures LlamaForSequenceClassification), or a base LLaMA dir: its lm_head is
        ignored and `score` is freshly drawn by `init_score_` (seed torch first for a reproducible head)."""
        cfg, raw = load_config(path), read_config_json(path)
        is_pm = "LlamaForSequenceClassification" in (raw.get("architectures") or [])
        n_labels = raw.get("num_labels", len(raw.get("id2label") or {"0": 0}))
        if is_pm and n_labels != 1:
            raise ValueError(f"{os.path.join(path, 'config.json')}: num_labels {n_labels}, expected 1 (a scalar PM)")
        with torch.device("meta"):                   # no memory for the random init: weights come from disk
            pm = cls(cfg)
        if is_pm:
            load_weights(pm, path, dtype=dtype, device=device)
        else:
            load_weights(pm, path, dtype=dtype, device=device, missing_ok=("score.weight",),
                         unexpected_ok=("lm_head.weight",))
            pm.score.to_empty(device=device).to(dtype)                          # materialise the meta head
            init_score_(pm.score)
        return pm.eval()

    def save_pretrained(self, path, tokenizer=None, max_shard_size=5 * 2**30):
        """config.json + safetensors in the LlamaForSequenceClassification layout (+ tokenizer.model if given).
        HF finds the last real token through pad_token_id, so a known pad id is written into the config."""
        config = self.config.to_dict()
        config.update(architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
                      label2id={"LABEL_0": 0}, torch_dtype=str(self.score.weight.dtype).removeprefix("torch."))
        if config["pad_token_id"] is None and tokenizer is not None:
            config["pad_token_id"] = tokenizer.pad_id
        save_weights(self, path, config, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save(path)


def init_score_(score):
    """A fresh head: N(0, 1/(D + 1)) as in Ziegler et al. 2019 (lm-human-preferences `reward_model.py`). We do not
    zero it: with w = 0 the backbone's gradient w·∂h/∂θ vanishes and the first steps train only the head, while
    with this scale Var(r) = |h|²/(D + 1) ≈ the mean square of the RMS-normed h (about 1 when the norm gains are),
    so backbone and head learn from step one. The reference (AlpacaFarm) keeps torch's default Linear init and
    zeroes a bias; we have no bias at all (HF's `score` has none, and a constant cancels in r_chosen − r_rejected).
    ppo.py's value model, by contrast, zeroes its copy of this head."""
    with torch.no_grad():
        score.weight.normal_(0.0, 1.0 / math.sqrt(score.in_features + 1))
    return score


# ----------------------------------------------------------------------------- reward inputs and the loss

def reward_text(prompt, response):
    """What the PM reads: the reference appends the next human turn, so the score sits on a fixed 'end' token."""
    return prompt + " " + response + HUMAN_TURN


def reward_inputs(tokenizer, prompts, responses, max_len=512):
    """Tokenize the reward texts of (prompt, response) rows -> (ids, mask, n_truncated), (B, T) left-padded.

    A text longer than max_len keeps BOS and its last max_len - 1 tokens: the cut removes the prompt's oldest
    tokens, never the end, so the reward is still read at the final "\\n\\nHuman:" token (only when the response
    alone is longer than max_len - 1 does its beginning go too). n_truncated counts the rows cut.
    Used by the PM trainer and evaluation, and by ppo.py to score rollouts."""
    if max_len < 2:
        raise ValueError(f"max_len: {max_len}, expected at least 2 (BOS + one token)")
    if len(prompts) != len(responses):
        raise ValueError(f"reward_inputs: {len(prompts)} prompts but {len(responses)} responses")
    rows, n_truncated = [], 0
    for prompt, response in zip(prompts, responses):
        ids = tokenizer.encode(reward_text(prompt, response), bos=True)
        if len(ids) > max_len:
            ids = ids[:1] + ids[len(ids) - (max_len - 1):]                      # BOS + the last max_len - 1
            n_truncated += 1
        rows.append(ids)
    ids, mask = left_pad(rows, tokenizer.pad_id)
    return ids, mask, n_truncated


def preference_loss(r_chosen, r_rejected, label_prob=None):
    """Mean over pairs of -log σ(Δ), Δ = r_chosen − r_rejected (Bradley-Terry); with soft labels p (B,) the
    cross-entropy −[p log σ(Δ) + (1 − p) log σ(−Δ)], which is BT at p = 1 and log 2 at Δ = 0 for any p."""
    delta = r_chosen - r_rejected                                              # (B,)
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))         # bf16 rewards -> fp32 loss
    if label_prob is None:
        return -F.logsigmoid(delta).mean()
    p = label_prob.to(delta)
    return -(p * F.logsigmoid(delta) + (1 - p) * F.logsigmoid(-delta)).mean()


def _parse_pref(line):
    """One prefs JSONL line -> (record, None) or (None, reason). Only what the PM reads is checked."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
        return None, "no 'prompt'/'chosen'/'rejected' strings"
    # label_prob: the probability that `chosen` is better; null (or absent) means a hard label, 1.0
    p = rec.get("label_prob")
    p = 1.0 if p is None else p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        return None, "label_prob is not a number in [0, 1]"
    return {**rec, "label_prob": float(p)}, None


def read_prefs(path, skip_bad=False):
    """Preference records for PM training -> (records, summary). A malformed line or missing field is a ValueError
    naming the file and the first bad line, unless skip_bad, which skips and counts them in the summary."""
    records, summary = _parse_lines(path, _parse_pref)
    if summary["bad"] and not skip_bad:
        raise ValueError(f"{path}:{summary['first_bad_line']}: bad preference record ({summary['bad']} bad lines: "
                         f"{summary['reasons']}); expected JSON with 'prompt', 'chosen', 'rejected' strings and "
                         "'label_prob' in [0, 1] or null (pass skip_bad / --skip-bad to skip them)")
    return records, summary


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def _pair_stats(pm, tokenizer, pairs, max_len, batch_size):
    """Sums over pairs [n, correct, σ(Δ), loss, truncated] (float64), Δ = r_chosen − r_rejected. A pair is correct
    when the PM agrees with the label's direction (chosen wins if label_prob >= 0.5)."""
    was_training, device = pm.training, next(pm.parameters()).device
    pm.eval()
    stats = torch.zeros(5, dtype=torch.float64)
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        # chosen and rejected in one forward: rows [0, n) chosen, [n, 2n) rejected
        ids, mask, n_cut = reward_inputs(tokenizer, [b["prompt"] for b in batch] * 2,
                                         [b["chosen"] for b in batch] + [b["rejected"] for b in batch], max_len)
        r = pm(ids.to(device), mask.to(device)).cpu().double()                # (2n,)
        r_c, r_r = r[:len(batch)], r[len(batch):]
        p = torch.tensor([1.0 if b.get("label_prob") is None else b["label_prob"] for b in batch],
                         dtype=torch.float64)                                  # no label = chosen is better
        correct = ((r_c > r_r) == (p >= 0.5)).sum()
        loss = preference_loss(r_c, r_r, p) * len(batch)
        stats += torch.stack([torch.tensor(float(len(batch))), correct.double(),
                              torch.sigmoid(r_c - r_r).sum(), loss.double(), torch.tensor(float(n_cut))])
    pm.train(was_training)
    return stats


def _as_metrics(stats):
    n, correct, prob, loss, cut = stats.tolist()
    return {"acc": correct / max(n, 1), "mean_prob": prob / max(n, 1), "loss": loss / max(n, 1), "n": int(n),
            "truncated": int(cut)}


def pairwise_accuracy(pm, tokenizer, pairs, max_len=512, batch_size=16):
    """Held-out simulated pairs (dicts with prompt/chosen/rejected[/label_prob]) -> {acc, mean_prob, loss, n,
    truncated}: acc = the fraction of pairs on which the PM agrees with the label's direction."""
    return _as_metrics(_pair_stats(pm, tokenizer, pairs, max_len, batch_size))


def human_agreement(pm, tokenizer, hh_path, limit=None, max_len=512, batch_size=16):
    """Agreement with HH-RLHF's human labels (paper Table 5): each line's `chosen` and `rejected` dialogues are cut
    at the last "Assistant:" into prompt + response (data.load_hh_pairs), both scored; acc = P(r_chosen > r_rejected)
    and mean_prob = mean σ(r_chosen − r_rejected). `limit` = first N pairs (the paper uses 2000)."""
    pairs, summary = load_hh_pairs(hh_path)
    pairs = pairs[:limit] if limit else pairs
    return {**_as_metrics(_pair_stats(pm, tokenizer, pairs, max_len, batch_size)), "skipped_lines": summary["bad"]}


def oracle_accuracy(pm, tokenizer, pairs, judge, max_len=512, batch_size=16):
    """Toy world: among pairs whose two responses the oracle `judge(prompt, response)` (nanorlcd.toy.judge) labels
    one harmless and one harmful, the fraction where the PM scores the harmless one higher. Pairs in any other
    case (both alike, or an invalid reply) are skipped and counted; the record's own label is ignored."""
    kept = []
    for rec in pairs:
        labels = (judge(rec["prompt"], rec["chosen"]), judge(rec["prompt"], rec["rejected"]))
        if labels == ("harmless", "harmful"):
            kept.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]})
        elif labels == ("harmful", "harmless"):
            kept.append({"prompt": rec["prompt"], "chosen": rec["rejected"], "rejected": rec["chosen"]})
    if not kept:
        return {"acc": float("nan"), "n": 0, "skipped": len(pairs)}
    return {**pairwise_accuracy(pm, tokenizer, kept, max_len, batch_size), "skipped": len(pairs) - len(kept)}


# ----------------------------------------------------------------------------- training

@dataclass
class PMConfig:
    batch_size: int = 16         # pairs per optimizer step, all ranks and micro-steps together (paper: 16)
    micro_batch_size: int = 4    # pairs per forward/backward on one rank (2x rows: chosen + rejected)
    epochs: int = 1              # passes over the training pairs (paper/AlpacaFarm: 1; more overfits)
    lr: float = 3e-6             # peak AdamW learning rate (paper at 7B: 3e-6; the tiny toy PM needs ~1e-3)
    warmup_steps: int = -1       # linear warmup steps; -1 = 3 % of all steps (paper)
    min_lr_ratio: float = 0.0    # the cosine decays to lr * min_lr_ratio (AlpacaFarm: 0)
    weight_decay: float = 0.0    # AdamW decoupled weight decay on every parameter (AlpacaFarm: 0)
    grad_clip: float = 1.0       # max global gradient norm (0 = no clipping)
    max_len: int = 512           # tokens per reward text; longer ones lose the prompt's oldest tokens (paper: 512)
    eval_frac: float = 0.05      # the last eval_frac of the prefs file is held out (at least one pair)
    eval_every: int = 100        # held-out evaluation every this many steps (and at the end)
    save_every: int = 0          # checkpoint into out_dir every this many steps (0 = only at the end)
    log_every: int = 10          # JSONL line every this many steps
    skip_bad: bool = False       # skip (and count) malformed prefs lines instead of raising
    bf16: bool = False           # bf16 autocast on CUDA (weights and AdamW state stay fp32; ignored on CPU)
    seed: int = 0                # data order and head init; the same on every rank


def _save(pm, tokenizer, cfg, out_dir, step):
    """Rank 0 writes the HF dir + the resolved training config; every rank waits for it."""
    if dist.is_main():
        pm.save_pretrained(out_dir, tokenizer=tokenizer)
        with open(os.path.join(out_dir, "pm_config.json"), "w") as f:
            json.dump({**asdict(cfg), "step": step}, f, indent=1)
    dist.barrier()


def train_pm(cfg, base_dir, prefs_path, out_dir, log_path=None):
    """Train a PM from `base_dir` (a base LLaMA dir, or a PM dir to continue) on the pairs of `prefs_path`; writes
    the PM to `out_dir` and JSONL metrics to log_path (default out_dir/log.jsonl). Returns the summary dict."""
    _, world, device = dist.init()
    tokenizer = Tokenizer(base_dir)
    # 1. data: the last eval_frac of the file is held out; the rest is shuffled each epoch
    records, data_summary = read_prefs(prefs_path, cfg.skip_bad)
    n_eval = max(1, round(cfg.eval_frac * len(records))) if cfg.eval_frac > 0 else 0
    train, held = records[:len(records) - n_eval], records[len(records) - n_eval:]
    accum, rem = divmod(cfg.batch_size, cfg.micro_batch_size * world)
    if rem or accum == 0:
        raise ValueError(f"PMConfig.batch_size={cfg.batch_size} must be a multiple of micro_batch_size "
                         f"({cfg.micro_batch_size}) x world size ({world})")
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{prefs_path}: {len(train)} training pairs, fewer than one batch ({cfg.batch_size})")
    max_steps = steps_per_epoch * cfg.epochs
    if cfg.warmup_steps < 0:
        cfg = replace(cfg, warmup_steps=math.ceil(0.03 * max_steps))
    # 2. model: the same seed on every rank gives the same fresh head (DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    pm = PreferenceModel.from_pretrained(base_dir, dtype=torch.float32, device=device).train()
    # texts never exceed the context the base was trained for (the header logs the resolved max_len)
    cfg = replace(cfg, max_len=min(cfg.max_len, pm.config.max_position_embeddings))
    optimizer = torch.optim.AdamW(pm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ddp_pm = dist.wrap(pm)
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
    log = open(log_path or os.path.join(out_dir, "log.jsonl"), "a") if dist.is_main() else None
    header = {"config": asdict(cfg), "train_pairs": len(train), "eval_pairs": len(held), "max_steps": max_steps,
              "accumulation": accum, "world_size": world, "skipped_lines": data_summary["bad"]}
    if log:
        log.write(json.dumps(header) + "\n")
    dist.print0(f"pm: {header}")

    # 3. the loop: one optimizer step per global batch of cfg.batch_size pairs
    t0, step, summary, truncated = time.time(), 0, {}, 0
    bar = tqdm(total=max_steps, disable=not dist.is_main(), desc="pm", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        random.Random(cfg.seed + epoch).shuffle(order)
        for s in range(steps_per_epoch):
            t_step = time.time()
            batch = [train[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            lr = get_lr(step, max_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            totals = torch.zeros(4, dtype=torch.float64)                      # [loss, correct, Δ, truncated]
            for micro in range(accum):
                # this rank's micro-step: the (micro * world + rank)-th block of micro_batch_size pairs
                first = (micro * world + dist.rank()) * cfg.micro_batch_size
                pairs = batch[first:first + cfg.micro_batch_size]
                m = len(pairs)
                # chosen and rejected in one forward: rows [0, m) chosen, [m, 2m) rejected
                ids, mask, n_cut = reward_inputs(tokenizer, [p["prompt"] for p in pairs] * 2,
                                                 [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                                 cfg.max_len)
                label_prob = torch.tensor([p["label_prob"] for p in pairs], device=device)
                sync = micro == accum - 1 or world == 1     # all-reduce gradients only on the last micro-step
                with contextlib.nullcontext() if sync else ddp_pm.no_sync():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"):
                        r = ddp_pm(ids.to(device), mask.to(device))           # (2m,)
                    loss = preference_loss(r[:m], r[m:], label_prob)
                    # sum over this micro-batch / global batch size, times world (DDP averages over ranks)
                    (loss * m * world / cfg.batch_size).backward()
                delta = (r[:m] - r[m:]).detach().double().cpu()               # (m,)
                totals += torch.tensor([loss.item() * m, ((delta > 0) == (label_prob.cpu() >= 0.5)).sum().item(),
                                        delta.sum().item(), n_cut], dtype=torch.float64)
            grad_norm = torch.nn.utils.clip_grad_norm_(pm.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # 4. metrics over the global batch; held-out evaluation on every rank's shard, summed
            totals = dist.all_reduce_sum(totals.to(device)).cpu() / torch.tensor([cfg.batch_size] * 3 + [1])
            truncated += int(totals[3])
            record = {"step": step, "pm/loss": totals[0].item(), "pm/acc": totals[1].item(),
                      "pm/margin": totals[2].item(), "pm/lr": lr, "pm/grad_norm": grad_norm.item(),
                      "pm/truncated": truncated, "pm/ms": 1000 * (time.time() - t_step)}
            last = step == max_steps
            if held and (step % cfg.eval_every == 0 or last):
                stats = _pair_stats(pm, tokenizer, dist.shard(held), cfg.max_len, cfg.micro_batch_size * 2)
                ev = _as_metrics(dist.all_reduce_sum(stats.to(device)).cpu())
                record.update({f"eval/{k}": v for k, v in ev.items() if k in ("acc", "mean_prob", "loss")})
                dist.print0(f"step {step}: loss {record['pm/loss']:.4f} acc {record['pm/acc']:.3f} "
                            f"eval acc {ev['acc']:.3f} lr {lr:.2e} {record['pm/ms']:.0f} ms")
            if log and (step % cfg.log_every == 0 or last or "eval/acc" in record):
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['pm/loss']:.3f}", acc=f"{record['pm/acc']:.2f}")
            summary.update(record)
            # 5. checkpoints: every save_every steps and at the end, from the unwrapped module
            if last or (cfg.save_every and step % cfg.save_every == 0):
                _save(pm, tokenizer, cfg, out_dir, step)
    bar.close()
    summary.update({"pm/seconds": time.time() - t0, "pm/skipped_lines": data_summary["bad"]})
    if log:
        log.write(json.dumps({"summary": summary}) + "\n")
        log.close()
    dist.print0(f"pm: done {json.dumps(summary)}")
    return summary
