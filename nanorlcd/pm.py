"""The preference model (PM): a LLaMA backbone with a scalar head, trained on simulated pairs.

What (RLCD's step 2, paper Sec. 3; AlpacaFarm's reward model, as the RLCD reference runs it):
`PreferenceModel`, model.py's backbone plus a bias-free head `score` read at the last real
token, saved in Hugging Face's LlamaForSequenceClassification layout; the reward text prompt +
" " + response + "\\n\\nHuman:" (dialogue.reward_text); the Bradley-Terry loss
-log σ(r_chosen − r_rejected) and, with a soft label p (RLAIF, RLCD-Rescore),
−[p log σ(Δ) + (1 − p) log σ(−Δ)]; `train_pm` (AdamW, 3 % warmup, cosine to 0, one epoch, 16 pairs
a step, as the reference); evaluation: held-out accuracy, agreement with HH-RLHF's human labels
(paper Table 5, `human_agreement`), the toy oracle's accuracy.
Under torchrun, PMConfig.strategy replicates the PM (DDP) or shards it (FSDP2, dist.wrap).
Simplified: a global batch that does not fill up at an epoch's end is dropped; the held-out
split is the last eval_frac of the prefs file.
Run: `python train.py --stage pm --method rlcd [--hh-eval FILE]` (or under `torchrun`); in code
`train_pm(PMConfig(), base_dir, prefs_path, out_dir)`.
"""
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
from nanorlcd.data import load_hh_pairs
from nanorlcd.dialogue import reward_text
from nanorlcd.model import (Transformer, init_weights, load_config, load_weights, read_config_json,
                            save_weights)
from nanorlcd.optim import autocast, lr_at, micro_steps, optimizer_step, set_lr
from nanorlcd.sft import (check_strategy, resume_from, run_identity, save_checkpoint,
                          stop_if_not_finite)
from nanorlcd.tokenizer import Tokenizer, left_pad


class PreferenceModel(nn.Module):
    """r(x) = w · h_last(x): the backbone's hidden state at the last real token times the head
    `score` (no bias)."""

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
                raise ValueError("attention_mask: a row has no real token (expected at least one 1 "
                                 "per row)")
            # the last 1 of each row: T - 1 under left padding, length - 1 under right padding
            pos = torch.arange(T, device=input_ids.device)                      # (T,)
            last = (pos * attention_mask.long()).argmax(-1)                     # (B,)
        h_last = h[torch.arange(B, device=h.device), last]                     # (B, D)
        return self.score(h_last).squeeze(-1).float()                          # (B,)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A saved PM dir (architectures LlamaForSequenceClassification), or a base LLaMA dir: its
        lm_head is ignored and `score` is drawn by `init_score_` (seed torch to reproduce it)."""
        cfg, raw = load_config(path), read_config_json(path)
        is_pm = "LlamaForSequenceClassification" in (raw.get("architectures") or [])
        n_labels = raw.get("num_labels", len(raw.get("id2label") or {"0": 0}))
        if is_pm and n_labels != 1:
            raise ValueError(f"{os.path.join(path, 'config.json')}: num_labels {n_labels}, "
                             "expected 1 (a scalar PM)")
        with torch.device("meta"):      # no memory for the random init: the weights come from disk
            pm = cls(cfg)
        if is_pm:
            load_weights(pm, path, dtype=dtype, device=device)
        else:
            load_weights(pm, path, dtype=dtype, device=device, missing_ok=("score.weight",),
                         unexpected_ok=("lm_head.weight",))
            pm.score.to_empty(device=device).to(dtype)                 # materialise the meta head
            init_score_(pm.score)
        return pm.eval()

    def save_pretrained(self, path, tokenizer=None, max_shard_size=5 * 2**30):
        """config.json + safetensors in the LlamaForSequenceClassification layout (+ tokenizer.model
        if given). HF finds the last real token through pad_token_id, so a pad id is written."""
        config = self.config.to_dict()
        config.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                      id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                      torch_dtype=str(self.score.weight.dtype).removeprefix("torch."))
        if config["pad_token_id"] is None and tokenizer is not None:
            config["pad_token_id"] = tokenizer.pad_id
        save_weights(self, path, config, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save(path)


def init_score_(score):
    """A fresh head: N(0, 1/(D + 1)) as in Ziegler et al. 2019 (lm-human-preferences
    `reward_model.py`). Not zero: with w = 0 the backbone's gradient w·∂h/∂θ vanishes and the first
    steps train only the head, while at this scale Var(r) = |h|²/(D + 1) ≈ the mean square of the
    RMS-normed h (about 1 when the norm gains are), so backbone and head learn from step one. The
    reference (AlpacaFarm) keeps torch's default Linear init and zeroes a bias; we have no bias
    (HF's `score` has none, and a constant cancels in r_chosen − r_rejected). ppo.py's value model,
    by contrast, zeroes its copy of this head."""
    with torch.no_grad():
        score.weight.normal_(0.0, 1.0 / math.sqrt(score.in_features + 1))
    return score


# ------------------------------------------------------------------ reward inputs and the loss

# reward_text(prompt, response): dialogue.reward_text, imported above and re-exported from here


def reward_inputs(tokenizer, prompts, responses, max_len=512):
    """Tokenize the reward texts of (prompt, response) rows -> (ids, mask, n_truncated), (B, T)
    left-padded.

    A text longer than max_len keeps BOS and its last max_len - 1 tokens: the cut removes the
    prompt's oldest tokens, never the end, so the reward is still read at the final "\\n\\nHuman:"
    token (only a response longer than max_len - 1 loses its beginning too). n_truncated counts the
    rows cut. Used by the PM trainer and evaluation, and by ppo.py to score rollouts."""
    if max_len < 2:
        raise ValueError(f"max_len: {max_len}, expected at least 2 (BOS + one token)")
    if len(prompts) != len(responses):
        raise ValueError(f"reward_inputs: {len(prompts)} prompts but {len(responses)} responses")
    rows, n_truncated = [], 0
    for prompt, response in zip(prompts, responses):
        ids = tokenizer.encode(reward_text(prompt, response), bos=True)
        if len(ids) > max_len:
            ids = ids[:1] + ids[len(ids) - (max_len - 1):]           # BOS + the last max_len - 1
            n_truncated += 1
        rows.append(ids)
    ids, mask = left_pad(rows, tokenizer.pad_id)
    return ids, mask, n_truncated


def preference_loss(r_chosen, r_rejected, label_prob=None):
    """Mean over pairs of -log σ(Δ), Δ = r_chosen − r_rejected (Bradley-Terry); with soft labels p
    (B,) the cross-entropy −[p log σ(Δ) + (1 − p) log σ(−Δ)]: BT at p = 1, log 2 at Δ = 0."""
    delta = r_chosen - r_rejected                                              # (B,)
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))  # bf16 rewards -> fp32 loss
    if label_prob is None:
        return -F.logsigmoid(delta).mean()
    p = label_prob.to(delta)
    return -(p * F.logsigmoid(delta) + (1 - p) * F.logsigmoid(-delta)).mean()


def _parse_pref(line):
    """One prefs JSONL line -> (record, None) or (None, reason): data.parse_pref, the one parser."""
    from nanorlcd.data import parse_pref
    return parse_pref(line)


def read_prefs(path, skip_bad=False):
    """Preference records for PM training -> (records, summary): data.read_prefs, the one reader of
    a preference file (a bad line is a ValueError naming file and line, unless skip_bad skips and
    counts it)."""
    from nanorlcd.data import read_prefs as read
    return read(path, skip_bad=skip_bad)


# ------------------------------------------------------------------ evaluation

@torch.no_grad()
def _pair_stats(pm, tokenizer, pairs, max_len, batch_size, n_real=None):
    """Sums over pairs [n, correct, σ(Δ), loss, truncated] (float64), Δ = r_chosen − r_rejected.
    A pair is correct when the PM agrees with the label (chosen is better if label_prob >= 0.5).
    A pair may give the rejected reply its own prompt (`rejected_prompt`; HH-RLHF lines).
    n_real: only the first n_real pairs count; the rest pad this rank's share so that every rank
    runs the same number of forwards (dist.shard_padded; an FSDP2 forward is collective)."""
    was_training, device = pm.training, next(pm.parameters()).device
    pm.eval()
    stats = torch.zeros(5, dtype=torch.float64)
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        # chosen and rejected in one forward: rows [0, n) chosen, [n, 2n) rejected
        prompts = ([b["prompt"] for b in batch]
                   + [b.get("rejected_prompt", b["prompt"]) for b in batch])
        replies = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
        ids, mask, n_cut = reward_inputs(tokenizer, prompts, replies, max_len)
        r = pm(ids.to(device), mask.to(device)).cpu().double()             # (2n,)
        r_c, r_r = r[:len(batch)], r[len(batch):]
        real = len(batch) if n_real is None else max(0, min(len(batch), n_real - i))
        if real < len(batch):                  # padding pairs: forwarded, then left out
            if real == 0:
                continue
            keep = list(range(real)) + list(range(len(batch), len(batch) + real))
            n_cut = reward_inputs(tokenizer, [prompts[k] for k in keep],
                                  [replies[k] for k in keep], max_len)[2]
            batch, r_c, r_r = batch[:real], r_c[:real], r_r[:real]
        p = torch.tensor([1.0 if b.get("label_prob") is None else b["label_prob"] for b in batch],
                         dtype=torch.float64)                              # no label: chosen wins
        correct = ((r_c > r_r) == (p >= 0.5)).sum()
        loss = preference_loss(r_c, r_r, p) * len(batch)
        stats += torch.stack([torch.tensor(float(len(batch))), correct.double(),
                              torch.sigmoid(r_c - r_r).sum(), loss.double(),
                              torch.tensor(float(n_cut))])
    pm.train(was_training)
    return stats


def _as_metrics(stats):
    n, correct, prob, loss, cut = stats.tolist()
    return {"acc": correct / max(n, 1), "mean_prob": prob / max(n, 1), "loss": loss / max(n, 1),
            "n": int(n), "truncated": int(cut)}


def pairwise_accuracy(pm, tokenizer, pairs, max_len=512, batch_size=16):
    """Held-out simulated pairs (dicts with prompt/chosen/rejected[/label_prob]) -> {acc, mean_prob,
    loss, n, truncated}: acc = the fraction of pairs on which the PM agrees with the label."""
    return _as_metrics(_pair_stats(pm, tokenizer, pairs, max_len, batch_size))


def human_agreement(pm, tokenizer, hh_path, limit=2000, max_len=512, batch_size=16):
    """Agreement with HH-RLHF's human labels (paper Table 5) -> {acc, mean_prob, loss, n, truncated,
    skipped_lines}: acc = the fraction of pairs with r_chosen > r_rejected, mean_prob = the mean of
    σ(r_chosen − r_rejected), the two numbers the paper reports. The pairs are those the reference
    evaluates: its evaluate_reward_model_human_agreement.py reads the first 2000 lines (--num-pairs)
    of the task's HH-RLHF *train* file (harmless-base or helpful-base train.jsonl, the file whose
    prompts the simulation used), not the test file."""
    # a bad line among the first `limit` is skipped and counted (the reference would stop on it)
    pairs, summary = load_hh_pairs(hh_path, limit=limit)
    stats = _pair_stats(pm, tokenizer, pairs, max_len, batch_size)
    return {**_as_metrics(stats), "skipped_lines": summary["bad"]}


def oracle_accuracy(pm, tokenizer, pairs, judge, max_len=512, batch_size=16):
    """Toy world: among pairs whose two replies the oracle `judge(prompt, response)` (toy.judge)
    labels one harmless and one harmful, the fraction where the PM scores the harmless one higher.
    Other pairs (both alike, or an invalid reply) are skipped and counted; labels are ignored."""
    kept = []
    for rec in pairs:
        labels = (judge(rec["prompt"], rec["chosen"]), judge(rec["prompt"], rec["rejected"]))
        if labels == ("harmless", "harmful"):
            kept.append({**rec, "label_prob": None})
        elif labels == ("harmful", "harmless"):
            kept.append({**rec, "chosen": rec["rejected"], "rejected": rec["chosen"],
                         "label_prob": None})
    if not kept:
        return {"acc": float("nan"), "n": 0, "skipped": len(pairs)}
    metrics = pairwise_accuracy(pm, tokenizer, kept, max_len, batch_size)
    return {**metrics, "skipped": len(pairs) - len(kept)}


# ------------------------------------------------------------------ training

@dataclass
class PMConfig:
    batch_size: int = 16         # pairs per optimizer step, all ranks and micro-steps (ref.: 16)
    micro_batch_size: int = 4    # pairs per forward/backward on a rank (2 rows each); 0: B/ranks
    epochs: int = 1              # passes over the training pairs (reference: 1; more overfits)
    lr: float = 3e-6             # peak AdamW lr (reference at 7B: 3e-6; the toy PM needs ~1e-3)
    warmup_steps: int = 0        # linear warmup steps; 0 = ceil(warmup_ratio * steps)
    warmup_ratio: float = 0.03   # warmup fraction, used when warmup_steps is 0 (reference: 0.03)
    min_lr_ratio: float = 0.0    # the cosine decays to lr * min_lr_ratio (reference: 0)
    weight_decay: float = 0.0    # AdamW decoupled weight decay on every parameter (reference: 0)
    grad_clip: float = 1.0       # max global gradient norm, 0 = none (reference: 1.0)
    max_len: int = 512           # tokens per reward text; longer: the prompt's oldest tokens go
    eval_frac: float = 0.05      # the last eval_frac of the prefs file is held out (>= one pair)
    eval_every: int = 100        # held-out evaluation every this many steps (and at the end)
    save_every: int = 0          # resumable checkpoint into out_dir every this many steps (0: none)
    log_every: int = 10          # JSONL line every this many steps
    skip_bad: bool = False       # skip (and count) malformed prefs lines instead of raising
    bf16: bool = False           # bf16 autocast on CUDA (weights and AdamW state stay fp32)
    seed: int = 0                # data order and head init; the same on every rank
    strategy: str = "ddp"        # under torchrun: "ddp" replicas, "fsdp" / "hsdp" FSDP2 shards
    activation_checkpointing: bool = False  # recompute each block in backward (less memory)


def check_config(cfg, world):
    """Exact divisibility of the batch over ranks and micro-batches, and a sane warmup (one-line
    errors). Returns (micro_batch_size resolved: 0 = batch_size / ranks, accumulation steps)."""
    micro_batch_size = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    accum, rem = divmod(cfg.batch_size, micro_batch_size * world)
    if rem or accum == 0:
        raise ValueError(f"PMConfig.batch_size={cfg.batch_size} must be a multiple of "
                         f"micro_batch_size ({micro_batch_size}) x world size ({world})")
    check_strategy("PMConfig", cfg, world)
    if cfg.warmup_steps < 0 or not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"PMConfig.warmup_steps={cfg.warmup_steps}, warmup_ratio="
                         f"{cfg.warmup_ratio}: expected warmup_steps >= 0, 0 <= warmup_ratio < 1")
    return micro_batch_size, accum


def train_pm(cfg, base_dir, prefs_path, out_dir, log_path=None, resume=False):
    """Train a PM from `base_dir` (a base LLaMA dir, or a PM dir to continue) on the pairs of
    `prefs_path`; writes the PM to `out_dir` and JSONL metrics to log_path (out_dir/log.jsonl).
    resume=True continues from out_dir's last periodic checkpoint (`save_every`) exactly where it
    stopped. Returns the summary dict."""
    _, world, device = dist.init()
    tokenizer = Tokenizer(base_dir)
    # 1. data: the last eval_frac of the file is held out; the rest is shuffled each epoch
    records, data_summary = read_prefs(prefs_path, cfg.skip_bad)
    n_eval = max(1, round(cfg.eval_frac * len(records))) if cfg.eval_frac > 0 else 0
    train, held = records[:len(records) - n_eval], records[len(records) - n_eval:]
    micro_batch_size, accum = check_config(cfg, world)
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{prefs_path}: {len(train)} training pairs, fewer than one batch "
                         f"({cfg.batch_size})")
    max_steps = steps_per_epoch * cfg.epochs
    cfg = replace(cfg, micro_batch_size=micro_batch_size,    # resolved, as logged and saved
                  warmup_steps=cfg.warmup_steps or math.ceil(cfg.warmup_ratio * max_steps))
    # 2. model, wrapped by cfg.strategy: a DDP replica per rank, or FSDP2 shards (only rank 0 reads
    #    the files; the others receive their shards by broadcast). The same seed on every rank gives
    #    the same fresh head (DDP broadcasts rank 0's too). The optimizer comes after the wrap: it
    #    must hold FSDP2's DTensor shards, not the tensors they replaced
    if resume and cfg.strategy != "ddp" and world > 1:
        raise ValueError(f"train_pm: resume needs strategy='ddp' (got {cfg.strategy!r})")
    torch.manual_seed(cfg.seed)
    ddp_pm = dist.load_pretrained(PreferenceModel, out_dir if resume else base_dir, cfg.strategy,
                                  activation_checkpointing=cfg.activation_checkpointing).train()
    pm = dist.unwrap(ddp_pm)                # the module itself (under FSDP2, the sharded root)
    # texts never exceed the context the base was trained for (the header logs the resolved max_len)
    cfg = replace(cfg, max_len=min(cfg.max_len, pm.config.max_position_embeddings))
    optimizer = torch.optim.AdamW(ddp_pm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    identity = run_identity(cfg, records)
    start = resume_from(out_dir, optimizer, identity) if resume else 0
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
    log = open(log_path or os.path.join(out_dir, "log.jsonl"), "a") if dist.is_main() else None
    header = {"config": asdict(cfg), "train_pairs": len(train), "eval_pairs": len(held),
              "max_steps": max_steps, "accumulation": accum, "world_size": world,
              "skipped_lines": data_summary["bad"], "start_step": start}
    if log:
        log.write(json.dumps(header) + "\n")
    dist.print0(f"pm: {header}")

    # 3. the loop: one optimizer step per global batch of cfg.batch_size pairs
    t0, summary, truncated = time.time(), {}, 0
    bar = tqdm(total=max_steps, initial=start, disable=not dist.is_main(), desc="pm",
               dynamic_ncols=True)
    for step in range(start, max_steps):
        t_step = time.time()
        epoch, k = divmod(step, steps_per_epoch)
        if k == 0 or step == start:                  # the epoch's order, from the seed alone
            order = list(range(len(train)))
            random.Random(cfg.seed + epoch).shuffle(order)
        batch = [train[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
        lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, "cosine", cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        totals = torch.zeros(4, dtype=torch.float64)              # [loss, correct, Δ, truncated]
        for micro, sync_context in micro_steps(ddp_pm, accum):
            # this rank's pairs: the (micro * world + rank)-th block of micro_batch_size pairs
            first = (micro * world + dist.rank()) * micro_batch_size
            pairs = batch[first:first + micro_batch_size]
            m = len(pairs)
            # chosen and rejected in one forward: rows [0, m) chosen, [m, 2m) rejected
            ids, mask, n_cut = reward_inputs(tokenizer, [p["prompt"] for p in pairs] * 2,
                                             [p["chosen"] for p in pairs]
                                             + [p["rejected"] for p in pairs], cfg.max_len)
            label_prob = torch.tensor([p["label_prob"] for p in pairs], device=device)
            with sync_context:
                with autocast(device, cfg.bf16):
                    r = ddp_pm(ids.to(device), mask.to(device))           # (2m,)
                loss = preference_loss(r[:m], r[m:], label_prob)
                # sum over this micro-batch / global batch size, times world (DDP averages ranks)
                (loss * m * world / cfg.batch_size).backward()
            delta = (r[:m] - r[m:]).detach().double().cpu()               # (m,)
            agree = ((delta > 0) == (label_prob.cpu() >= 0.5)).sum().item()
            totals += torch.tensor([loss.item() * m, agree, delta.sum().item(), n_cut],
                                   dtype=torch.float64)
        # 4. metrics over the global batch; a non-finite loss stops before the step
        totals = dist.all_reduce_sum(totals.to(device)).cpu()
        totals /= torch.tensor([cfg.batch_size] * 3 + [1])
        stop_if_not_finite("pm", step + 1, loss=totals[0].item())
        grad_norm = optimizer_step(optimizer, list(pm.parameters()), cfg.grad_clip).item()
        stop_if_not_finite("pm", step + 1, grad_norm=grad_norm)
        truncated += int(totals[3])
        record = {"step": step + 1, "pm/loss": totals[0].item(), "pm/acc": totals[1].item(),
                  "pm/margin": totals[2].item(), "pm/lr": lr, "pm/grad_norm": grad_norm,
                  "pm/truncated": truncated, "pm/ms": 1000 * (time.time() - t_step)}
        last = step + 1 == max_steps
        if held and ((step + 1) % cfg.eval_every == 0 or last):
            # held-out evaluation on every rank's shard, padded to equal forwards, summed
            mine, n_real = dist.shard_padded(held)
            stats = _pair_stats(pm, tokenizer, mine, cfg.max_len, micro_batch_size * 2, n_real)
            ev = _as_metrics(dist.all_reduce_sum(stats.to(device)).cpu())
            record.update({f"eval/{k}": ev[k] for k in ("acc", "mean_prob", "loss")})
            dist.print0(f"step {step + 1}: loss {record['pm/loss']:.4f} acc {record['pm/acc']:.3f} "
                        f"eval acc {ev['acc']:.3f} lr {lr:.2e} {record['pm/ms']:.0f} ms")
        if log and ((step + 1) % cfg.log_every == 0 or last or "eval/acc" in record):
            log.write(json.dumps(record) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{record['pm/loss']:.3f}", acc=f"{record['pm/acc']:.2f}")
        summary.update(record)
        # 5. checkpoints + tokenizer + resolved config, swapped in whole; the periodic ones add the
        #    training state, the last one is the result. `dist.gathered` is collective: a sharded PM
        #    is all-gathered unit by unit into a plain CPU copy on rank 0 (None elsewhere)
        def write(tmp):
            plain.save_pretrained(tmp, tokenizer=tokenizer)
            with open(os.path.join(tmp, "pm_config.json"), "w") as f:
                json.dump({**asdict(cfg), "step": step + 1}, f, indent=1)

        periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
        plain = dist.gathered(pm) if last or periodic else None
        if last:
            save_checkpoint(out_dir, write)
        elif periodic:
            save_checkpoint(out_dir, write, optimizer, step + 1, resume_state=identity)
    bar.close()
    summary.update({"pm/seconds": time.time() - t0, "pm/skipped_lines": data_summary["bad"]})
    if log:
        log.write(json.dumps({"summary": summary}) + "\n")
        log.close()
    dist.print0(f"pm: done {json.dumps(summary)}")
    return summary
