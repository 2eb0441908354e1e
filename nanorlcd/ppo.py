"""PPO against a preference model with a per-token KL penalty: RLCD's step 3 (paper Sec. 3 and 4).

What: PPO as AlpacaFarm runs it (Ziegler et al. 2019; Ouyang et al. 2022): reward = PM score on the
last reply token − β·(log π − log π_ref) on every token, GAE advantages (Schulman et al. 2016),
clipped surrogate and value losses (Schulman et al. 2017), ppo_epochs over shuffled minibatches, a
fixed or adaptive β. This file holds the equations first, then the update and the loop; rollout.py
collects the experience. Models: the policy (trainable), the reference (frozen initial policy), the
PM (frozen) and the value model (a trainable copy of the PM). Pads are masked everywhere, and N
processes give the gradient of one process on the whole minibatch.
Sharding (PPOConfig.strategy): "ddp" replicates the models on every rank; "fsdp" / "hsdp" shard all
four with FSDP2, as the reference sharded them on 8 GPUs (train_ppo shows where each is sharded,
unsharded for the rollout and gathered for saving).
Simplified: no resumable optimizer state; differences from the reference are listed in the
README's deviations table.
Run: `python train.py --stage ppo --method rlcd`, or `train_ppo(PPOConfig(), policy, None, pm, None,
tokenizer, prompts, out_dir)` (ref and value default to copies of the policy and the PM).
"""
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from nanorlcd import checkpoint, dist
from nanorlcd.optim import autocast, lr_at, micro_steps, optimizer_step, set_lr
from nanorlcd.rollout import (ActorCritic, Rollout, collect_rollouts, make_value_model, print_table,
                              response_logits, response_logprobs, response_values)

__all__ = ["ActorCritic", "Diverged", "PPOConfig", "Rollout", "build_models",
           "compute_advantages", "compute_rewards", "gae", "gathered_parts", "make_value_model",
           "masked_mean", "next_kl_coef", "policy_loss", "ppo_update", "response_logits",
           "response_logprobs", "response_values", "train_ppo", "value_loss", "whiten"]


# ---------------------------------------------------------------------- the equations, in order
# t indexes the real tokens of one reply; π_old, V_old: the policy and value at collection time.
# 1. reward (compute_rewards): r_t = −β·(log π_old − log π_ref)_t, + the PM score on the last token
# 2. GAE (gae): δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns G_t = A_t + V_t
#    whitening (whiten): A ← (A − mean) / (std + 1e-8) over the batch's real tokens, biased std
# 3. policy (policy_loss): L_pg = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε)), ρ_t = π/π_old
# 4. value (value_loss): L_vf = ½·mean_t max((V − G)², (V_old + clip(V − V_old, ±ε_v) − G)²)
# 5. total (ppo_update): L = L_pg + c_vf·L_vf − c_ent·mean_t entropy_t
# 6. KL control (next_kl_coef, adaptive only): β ← β·(1 + k_β·clip(KL / KL_target − 1, ±0.2))


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, clamp_kl=False):
    """Per-token rewards (B, R): r_t = −β·(log π − log π_ref)_t on real tokens, plus the PM score
    (B,) at the last real token of each row. Returns (rewards, kl), kl the per-token log-ratio (0 on
    pads)."""
    real = mask.bool()
    if not real.any(-1).all():
        raise ValueError("response_mask: every row needs at least one real token "
                         "(got an empty response)")
    kl = torch.where(real, logprobs - ref_logprobs, 0.0)                     # (B, R)
    if clamp_kl:
        kl = kl.clamp(min=0.0)
    rewards = -kl_coef * kl
    last = real.long().sum(-1) - 1                                           # (B,) last real token
    rewards[torch.arange(len(last)), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over right-padded response tokens, all (B, R): V and A past
    the last real token are 0 (terminal). Returns (advantages, returns = advantages + values), both
    0 on pads."""
    m = mask.to(rewards.dtype)
    values = values * m
    # (B, R) 1 if t+1 is real
    next_m = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * next_m
    deltas = (rewards + gamma * next_values - values) * m                   # (B, R) TD errors δ_t
    # one reverse scan over the R response positions, vectorised over rows
    adv, last = [], torch.zeros_like(deltas[:, 0])
    for t in reversed(range(rewards.shape[1])):
        last = deltas[:, t] + gamma * lam * next_m[:, t] * last
        adv.append(last)
    advantages = torch.stack(adv[::-1], dim=1) * m                          # (B, R)
    return advantages, (advantages + values) * m


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef, n_tokens=None):
    """Clipped surrogate (Schulman et al. 2017, eq. 7) as a loss over real tokens. Returns (loss,
    stats); approx_kl = mean((ρ − 1) − log ρ) and clipfrac = frac(|ρ − 1| > ε), as cleanrl logs
    them."""
    # log ρ_t; pads 0, so a pad's junk log-prob can never overflow exp
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)
    ratio = log_ratio.exp()
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask, n_tokens)
    with torch.no_grad():
        stats = {"policy/approx_kl": masked_mean((ratio - 1) - log_ratio, mask, n_tokens),
                 "policy/clipfrac": masked_mean(((ratio - 1).abs() > clip_coef).float(), mask,
                                                n_tokens),
                 "policy/ratio": masked_mean(ratio, mask, n_tokens)}
    return loss, stats


def value_loss(values, old_values, returns, mask, vf_clip_coef, n_tokens=None):
    """Clipped value loss (OpenAI baselines / AlpacaFarm) over real tokens; vf_clip_coef None =
    unclipped.
    Returns (loss, stats)."""
    vf_losses = (values - returns) ** 2
    if vf_clip_coef is None:
        vf_losses_clipped = vf_losses
    else:
        clipped = old_values + (values - old_values).clamp(-vf_clip_coef, vf_clip_coef)
        vf_losses_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask, n_tokens)
    with torch.no_grad():
        clipped_wins = (vf_losses_clipped > vf_losses).float()
        stats = {"val/clipfrac": masked_mean(clipped_wins, mask, n_tokens),
                 "val/error": masked_mean(vf_losses, mask, n_tokens)}
    return loss, stats


def next_kl_coef(kl_coef, kl, cfg):
    """β for the next step: fixed (the paper), or Ziegler et al. 2019's adaptive controller (Sec.
    2.2, as in AlpacaFarm), with kl = this step's mean sequence KL."""
    if not cfg.adaptive_kl:
        return kl_coef
    return kl_coef * (1 + cfg.kl_k_beta * min(max(kl / cfg.kl_target - 1, -0.2), 0.2))


# ----------------------------------------------------------------------------- masked statistics

def masked_mean(x, mask, n_tokens=None):
    """Mean of x over real tokens (mask 1). n_tokens overrides the count: the whole minibatch's, so
    that gradient accumulation and DDP average over tokens rather than over micro-batches."""
    count = mask.sum() if n_tokens is None else n_tokens
    return torch.where(mask.bool(), x, 0.0).sum() / count


def masked_moments(x, mask):
    """Mean and biased variance (divided by n, as AlpacaFarm's `whiten`) of x over real tokens on
    all ranks."""
    real = mask.bool()
    sums = dist.all_reduce_sum(torch.stack([torch.where(real, x, 0.0).sum(),
                                            real.sum().to(x.dtype)]))
    mean, count = sums[0] / sums[1], sums[1]
    square_sum = dist.all_reduce_sum(torch.where(real, (x - mean) ** 2, 0.0).sum())
    return mean, square_sum / count.clamp(min=1)


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x − mean) / (std + eps) over real tokens only (the reference's formula, biased std, but
    without its pads); shift_mean=False adds the mean back: (x − mean) / (std + eps) + mean. Pads
    are 0."""
    mean, var = masked_moments(x, mask)
    whitened = (x - mean) / (var.sqrt() + eps)
    return torch.where(mask.bool(), whitened if shift_mean else whitened + mean, 0.0)


# ----------------------------------------------------------------------------- configuration

@dataclass
class PPOConfig:
    """Defaults: AlpacaFarm's rlhf_ppo as RLCD ran it on LLaMA-7B. Batch names (cleanrl's): a
    rollout batch is split into minibatches (one optimiser step each), a minibatch into
    micro-batches (one forward and backward each, gradients accumulated)."""
    # rollouts
    # PPO steps, one rollout batch each (RLCD: 40-80; quality decays later)
    steps: int = 80
    rollout_batch_size: int = 512    # prompts rolled out per step, all ranks together
    # rollouts per optimiser step, all ranks (AlpacaFarm step_batch_size)
    minibatch_size: int = 256
    # rollouts per forward/backward on one rank; 0 = the whole local minibatch (minibatch / ranks)
    micro_batch_size: int = 2
    gen_batch_size: int = 32         # prompts per generate() call on one rank
    ppo_epochs: int = 2              # passes over each rollout batch (noptepochs)
    max_prompt_len: int = 192        # prompts longer than this (tokens, BOS included) are dropped
    max_new_tokens: int = 300        # response length cap (response_len)
    # sampling temperature; log-probs use logits / temperature too; > 0
    temperature: float = 1.0
    # reward
    # β in −β·(log π − log π_ref) per token; RLCD: 0.002 or 0.004, fixed
    kl_coef: float = 0.004
    clamp_kl: bool = False           # clamp each token's log π − log π_ref at 0 (AlpacaFarm: True)
    # Ziegler et al.'s controller moves β toward kl_target (paper: fixed)
    adaptive_kl: bool = False
    kl_target: float = 6.0           # adaptive only: target KL(π‖π_ref) per sequence, nats
    kl_k_beta: float = 0.1           # adaptive only: the controller's gain k_β
    # tokens per reward text; longer ones lose the prompt's oldest tokens
    pm_max_len: int = 512
    # replaces the score of replies that never end or are empty; None = off
    penalty_reward: float = -1.0
    whiten_rewards: bool = True      # rescale per-token rewards by their std over the batch
    # PPO
    gamma: float = 1.0               # discount over response tokens (1: one sequence-level score)
    gae_lambda: float = 1.0          # GAE λ (1: Monte-Carlo returns minus the value baseline)
    norm_adv: bool = True            # whiten advantages over the batch (mean 0, std 1)
    clip_coef: float = 0.2           # policy ratio clip ε
    vf_clip_coef: float = 0.2        # value clip ε_v around the rollout's V; None = off
    vf_coef: float = 0.1             # c_vf, weight of the value loss
    ent_coef: float = 0.0            # c_ent, entropy bonus weight (paper: none)
    # stop this step's epochs once approx_kl exceeds it; None = never
    target_kl: float = None
    # optimiser: one AdamW over policy and value (AlpacaFarm's ActorCritic)
    lr: float = 1e-5                 # peak AdamW lr
    # linear warmup over this many PPO steps, then linear decay to 0
    warmup_steps: int = 5
    adam_eps: float = 1e-5           # AdamW ε (OpenAI's PPO value, not PyTorch's 1e-8)
    weight_decay: float = 0.0        # AdamW decoupled weight decay
    max_grad_norm: float = 1.0       # global grad-norm clip over policy + value
    bf16: bool = False               # bf16 autocast on CUDA for every forward
    # guards: stop with an error (nothing saved) past these; None = no bound
    max_kl: float = 200.0            # mean sequence KL(π‖π_ref), nats
    max_approx_kl: float = 1.0       # approx_kl of one minibatch update, nats per token
    # models and bookkeeping
    # value head starts as the PM head (True) or zero (False, AlpacaFarm)
    keep_pm_head: bool = False
    # log π_old from a fresh forward over the sampled tokens (exact); False reuses the sampler's
    # log-probs (one policy forward fewer; one micro-batch is still recomputed as a check)
    recompute_logprobs: bool = True
    seed: int = 0                    # prompt order and per-rank sampling seeds
    # under torchrun: "ddp" (replicas) or "fsdp" / "hsdp" (FSDP2 shards of all four models)
    strategy: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block in backward (less memory)
    save_every: int = 20             # checkpoint every this many steps (0 = only at the end)
    # print a prompt/reply/score/KL table every this many steps (0 = off)
    table_every: int = 10
    table_rows: int = 3              # rows in that table


def check_config(cfg, world):
    """Exact divisibility of the batch sizes over ranks, minibatches and micro-batches (one-line
    errors). Returns cfg with micro_batch_size resolved (0 = the whole local minibatch)."""
    local_rollouts, rest1 = divmod(cfg.rollout_batch_size, world)
    local_minibatch, rest2 = divmod(cfg.minibatch_size, world)
    micro = cfg.micro_batch_size or max(1, local_minibatch)
    if (rest1 or rest2 or local_minibatch == 0 or local_rollouts % local_minibatch
            or local_minibatch % micro):
        raise ValueError(f"PPOConfig: expected rollout_batch_size ({cfg.rollout_batch_size}) "
                         f"divisible by minibatch_size ({cfg.minibatch_size}), itself divisible by "
                         f"world size ({world}) x micro_batch_size ({micro})")
    if cfg.strategy not in dist.STRATEGIES:
        raise ValueError(f"PPOConfig.strategy={cfg.strategy!r}: expected one of "
                         f"{dist.STRATEGIES}")
    if cfg.steps < 1:
        raise ValueError(f"PPOConfig.steps: got {cfg.steps}, expected >= 1")
    if cfg.warmup_steps < 0:
        raise ValueError(f"PPOConfig.warmup_steps: got {cfg.warmup_steps}, expected >= 0")
    if cfg.temperature <= 0:
        raise ValueError(f"PPOConfig.temperature: got {cfg.temperature}, expected > 0 "
                         "(PPO samples)")
    return replace(cfg, micro_batch_size=micro)


# ----------------------------------------------------------------------------- numeric guards

class Diverged(FloatingPointError):
    """Training produced a non-finite or out-of-bounds quantity; the run stops and saves nothing.
    A FloatingPointError, like the SFT and PM stages' non-finite stops."""


def check_finite_rollout(step, rollout):
    """Stop if a PM score or a log-prob / value on a real token is non-finite on any rank (all ranks
    raise together: the counts are summed over ranks)."""
    real = rollout.response_mask.bool()
    quantities = {"PM score": rollout.pm_scores, "log-prob": rollout.logprobs[real],
                  "reference log-prob": rollout.ref_logprobs[real], "value": rollout.values[real]}
    counts = [(~v.isfinite()).sum().float() for v in quantities.values()]
    bad = dist.all_reduce_sum(torch.stack(counts))
    for name, count in zip(quantities, bad.tolist()):
        if count:
            raise Diverged(f"ppo: step {step}: {name} is non-finite on {int(count)} rollout "
                           "entries (expected finite; nothing saved)")


def check_stats(step, stats, cfg):
    """Stop on a non-finite logged quantity, or on a KL past cfg.max_kl / cfg.max_approx_kl. `stats`
    are all-reduced, so every rank takes the same decision."""
    for name, value in stats.items():
        if not math.isfinite(value):
            raise Diverged(f"ppo: step {step}: {name} is {value} (expected finite; nothing "
                           "saved)")
    bounds = {"objective/kl": ("max_kl", cfg.max_kl),
              "policy/approx_kl": ("max_approx_kl", cfg.max_approx_kl)}
    for name, (field, limit) in bounds.items():
        if limit is not None and name in stats and stats[name] > limit:
            raise Diverged(f"ppo: step {step}: {name} = {stats[name]:.4g} exceeds "
                           f"PPOConfig.{field} = "
                           f"{limit} (lower lr or raise kl_coef; nothing saved)")


def check_finite_weights(step, module):
    """Stop before a non-finite policy or value could be sampled from or saved. Under FSDP2 each
    rank checks its own shards and the count is summed, so all ranks stop together."""
    bad = [name for name, p in module.named_parameters()
           if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
    device = next(module.parameters()).device
    if dist.all_reduce_sum(torch.tensor(float(len(bad)), device=device)).item():
        where = f"weight {bad[0]}" if bad else "a weight shard of another rank"
        raise Diverged(f"ppo: step {step}: {where} is non-finite (nothing saved)")


# ----------------------------------------------------------------------------- one PPO step

def compute_advantages(rollout, cfg, kl_coef):
    """Equations 1 and 2 on a collected rollout: per-token rewards (optionally rescaled by their
    std), GAE, advantage whitening. Returns the rollout with kl, rewards, advantages and returns
    filled."""
    mask = rollout.response_mask
    rewards, kl = compute_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                  kl_coef, cfg.clamp_kl)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.gae_lambda)
    if cfg.norm_adv:
        advantages = whiten(advantages, mask)
    return replace(rollout, kl=kl, rewards=rewards, advantages=advantages, returns=returns)


def ppo_update(ac_ddp, optimizer, rollout, cfg, generator, step=0):
    """ppo_epochs over shuffled minibatches of this rank's rollout, one optimiser step per minibatch
    with gradient accumulation over micro-batches. Returns the mean stats, global over ranks."""
    world, batch_size = dist.world_size(), rollout.response_mask.shape[0]
    local_minibatch_size = cfg.minibatch_size // world
    params = [p for p in ac_ddp.parameters() if p.requires_grad]
    device = rollout.response_mask.device
    history = []
    for epoch in range(cfg.ppo_epochs):
        b_inds = torch.randperm(batch_size, generator=generator).to(device)
        epoch_stats = []
        for start in range(0, batch_size, local_minibatch_size):
            mb_inds = b_inds[start:start + local_minibatch_size]
            # this minibatch's real-token count on all ranks, / world: DDP averages gradients over
            # ranks,
            # so every loss term below is a share of the token mean of the whole global minibatch
            n_tokens = dist.all_reduce_sum(rollout.response_mask[mb_inds].sum().float()) / world
            micro_inds = mb_inds.split(cfg.micro_batch_size)
            sums = {}
            for i, context in micro_steps(ac_ddp, len(micro_inds)):
                micro = rollout.select(micro_inds[i]).trim()
                mask = micro.response_mask
                with context:
                    with autocast(device, cfg.bf16):
                        inputs = (micro.query_ids, micro.query_mask, micro.response_ids, mask)
                        logprobs, entropy, values = ac_ddp(*inputs, cfg.temperature)
                    pg_loss, pg_stats = policy_loss(logprobs, micro.logprobs, micro.advantages,
                                                    mask, cfg.clip_coef, n_tokens)
                    vf_loss, vf_stats = value_loss(values, micro.values, micro.returns, mask,
                                                   cfg.vf_clip_coef, n_tokens)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    if cfg.ent_coef:
                        loss = loss - cfg.ent_coef * masked_mean(entropy, mask, n_tokens)
                    loss.backward()
                # each micro-batch's terms are already divided by the minibatch's tokens: sums are
                # means
                for k, v in {**pg_stats, **vf_stats, "loss/policy": pg_loss, "loss/value": vf_loss,
                             "loss/total": loss}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
            sums["loss/grad_norm"] = optimizer_step(optimizer, params, cfg.max_grad_norm)
            minibatch_stats = dist.all_reduce_mean({k: float(v) for k, v in sums.items()})
            check_stats(step, minibatch_stats, cfg)
            epoch_stats.append(minibatch_stats)
        history += epoch_stats
        # early stop (cleanrl): every rank sees the same all-reduced approx_kl, so all stop together
        approx_kl = sum(s["policy/approx_kl"] for s in epoch_stats) / len(epoch_stats)
        if cfg.target_kl is not None and approx_kl > cfg.target_kl:
            break
    stats = {k: sum(s[k] for s in history) / len(history) for k in history[0]}
    stats["policy/epochs"] = epoch + 1
    return stats


def rollout_stats(rollout, kl_coef):
    """Step metrics of this rank's rollout (train_ppo averages them over ranks; the README documents
    each)."""
    mask = rollout.response_mask
    penalty = kl_coef * rollout.kl.sum(-1)                  # (N,) what the rewards subtracted
    logprob_gap = (rollout.gen_logprobs - rollout.logprobs).abs()       # sampler vs fresh forward
    # only rows whose log-probs came from a fresh forward can show a gap
    checked = mask if rollout.recomputed is None else mask * rollout.recomputed[:, None]
    returns_mean, returns_var = masked_moments(rollout.returns, mask)
    _, error_var = masked_moments(rollout.returns - rollout.values, mask)
    stats = {"objective/score": rollout.scores.mean(), "objective/kl": rollout.seq_kl().mean(),
             "objective/reward": (rollout.scores - penalty).mean(), "objective/kl_coef": kl_coef,
             "rollout/response_len": mask.sum(-1).float().mean(),
             "rollout/finished": rollout.finished.float().mean(),
             "rollout/logprob_gap": masked_mean(logprob_gap, checked),
             "policy/entropy": masked_mean(rollout.entropy, mask),
             "val/mean": masked_mean(rollout.values, mask), "val/returns_mean": returns_mean,
             # 1 − Var[G − V] / Var[G] over real tokens: how much of the return the value model
             # explains
             "val/explained_var": 1 - error_var / returns_var.clamp(min=1e-8)}
    return {k: float(v) for k, v in stats.items()}


def gathered_parts(ac):
    """(policy, value) as plain modules on rank 0 ((None, None) elsewhere). A sharded ActorCritic
    (one FSDP2 root over both) is all-gathered unit by unit into CPU tensors on rank 0
    (dist.full_state_dict, collective), then split into a plain LLaMA and PreferenceModel;
    otherwise the modules themselves."""
    if not dist.is_sharded(ac):
        return (ac.policy, ac.value) if dist.is_main() else (None, None)
    state = dist.full_state_dict(ac)                     # {"policy.…", "value.…": CPU tensor}
    if not dist.is_main():
        return None, None
    parts = []
    for name in ("policy", "value"):
        sub = getattr(ac, name)
        with torch.device("meta"):
            plain = type(sub)(sub.config)
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        plain.load_state_dict(own, strict=False, assign=True)    # a tied lm_head may be absent
        if getattr(plain.config, "tie_word_embeddings", False) and hasattr(plain, "lm_head"):
            plain.lm_head.weight = plain.model.embed_tokens.weight
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"ppo: {name} tensor '{missing[0]}' missing from the gathered state")
        parts.append(plain)
    return tuple(parts)


def save_checkpoint(path, ac, tokenizer, cfg):
    """Rank 0 writes path/policy/ (HF LLaMA + tokenizer.model), path/value/ (PM layout) and
    ppo_config.json into a fresh directory that replaces `path` as a whole (checkpoint.atomic_dir):
    a killed save leaves the previous set. The log and the periodic step-XXXXX/ saves are kept.
    Collective: every rank calls it (a sharded actor-critic is gathered to rank 0 first)."""
    policy, value = gathered_parts(ac)
    if dist.is_main():
        keep = lambda name: name == "log.jsonl" or name.startswith("step-")       # noqa: E731
        with checkpoint.atomic_dir(path, keep=keep) as tmp:
            policy.save_pretrained(os.path.join(tmp, "policy"))
            tokenizer.save(os.path.join(tmp, "policy"))
            value.save_pretrained(os.path.join(tmp, "value"), tokenizer=tokenizer)
            with open(os.path.join(tmp, "ppo_config.json"), "w") as f:
                json.dump(asdict(cfg), f, indent=1)
    dist.barrier()


# ----------------------------------------------------------------------------- the training loop

def build_models(cfg, policy, ref, pm, value):
    """The four PPO models, wrapped by cfg.strategy, and the optimizer -> (ac, ac_ddp, ref, pm,
    optimizer): ac the ActorCritic (under FSDP2 itself the sharded root), ac_ddp what trains (the
    DDP wrapper under "ddp", else ac). ref=None: a copy of the policy; value=None:
    make_value_model(pm, cfg.keep_pm_head)."""
    if dist.is_sharded(policy) or (value is not None and dist.is_sharded(value)):
        raise ValueError("train_ppo: pass policy and value unsharded (train_ppo shards them "
                         "together as one ActorCritic); ref and pm may come sharded")
    if value is None and dist.is_sharded(pm):
        raise ValueError("train_ppo: a sharded pm cannot be copied into the value model: pass "
                         "value (e.g. PreferenceModel.from_pretrained(pm_dir)) too")
    device = next(policy.parameters()).device
    # 1. copies first: the reference (the initial policy) and the value model (the PM plus a fresh
    #    head) are deep copies, and a sharded model cannot be copied
    ref = copy.deepcopy(policy) if ref is None else ref
    if value is None:      # trained, so in the policy's dtype (fp32) even if the PM came in bf16
        value = make_value_model(pm, cfg.keep_pm_head).to(next(policy.parameters()).dtype)
    for frozen in (ref, pm):
        if not dist.is_sharded(frozen):
            frozen.to(device).eval().requires_grad_(False)
    # without an entropy bonus the entropy is only logged: no autograd graph for it
    ac = ActorCritic(policy, value.to(device), entropy_grad=cfg.ent_coef > 0).train()
    # 2. sharding (cfg.strategy): the trained policy + value as ONE root (one optimizer, one grad
    #    clip, one DDP / FSDP2 unit), and under FSDP2 the frozen reference and PM too: each holds
    #    1/world of its weights (at 7B, replicas of the two frozen models would not fit 80 GB).
    #    Under "ddp" the frozen models stay plain replicas (wrap returns them as they are).
    ac_ddp = dist.wrap(ac, cfg.strategy, activation_checkpointing=cfg.activation_checkpointing)
    ref, pm = (m if dist.is_sharded(m) else dist.wrap(m, cfg.strategy) for m in (ref, pm))
    # 3. one AdamW over policy + value, built AFTER the wrap (it must hold FSDP2's DTensor shards)
    params = [p for p in ac_ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    return ac, ac_ddp, ref, pm, optimizer


def train_ppo(cfg, policy, ref, pm, value, tokenizer, prompts, out_dir, log_path=None):
    """Optimise `policy` (a LLaMA on this rank's device) against `pm` with PPO on the prompt texts.
    ref=None -> a frozen copy of the initial policy; value=None -> make_value_model(pm,
    cfg.keep_pm_head). Writes out_dir/policy/, out_dir/value/, out_dir/step-XXXXX/ checkpoints and
    log.jsonl (rank 0).
    Returns the last step's stats; raises Diverged (saving nothing) on a numeric fault."""
    rank, world, _ = dist.init()
    cfg = check_config(cfg, world)
    ac, ac_ddp, ref, pm, optimizer = build_models(cfg, policy, ref, pm, value)
    # after the wrap: FSDP2 moves the shards of a model loaded on the CPU to this rank's device
    device = next(ac.parameters()).device
    # tokenize once; drop prompts that leave no room for a reply (the reference's query_len filter)
    limit = min(cfg.max_prompt_len, policy.config.max_position_embeddings - cfg.max_new_tokens)
    kept = [(p, ids) for p in prompts if len(ids := tokenizer.encode(p, bos=True)) <= limit]
    if not kept:
        raise ValueError(f"prompts: none of {len(prompts)} prompts fits in "
                         f"max_prompt_len={limit} tokens")
    # same order on every rank
    order_gen = torch.Generator().manual_seed(cfg.seed)
    # per-rank sampling
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1000 + rank)     # per-rank minibatches
    log = None
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        log = open(log_path or os.path.join(out_dir, "log.jsonl"), "w")
        log.write(json.dumps({"config": asdict(cfg), "world_size": world, "prompts": len(kept),
                              "dropped_prompts": len(prompts) - len(kept)}) + "\n")
    dist.print0(f"ppo: {len(kept)} prompts ({len(prompts) - len(kept)} longer than {limit} tokens "
                f"dropped), world {world}, config {asdict(cfg)}")

    kl_coef, order, record = cfg.kl_coef, [], {}
    bar = tqdm(range(cfg.steps), disable=not dist.is_main(), desc="ppo", dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, decay="linear")
        set_lr(optimizer, lr)
        # reshuffle at each pass over prompts
        while len(order) < cfg.rollout_batch_size:
            order += torch.randperm(len(kept), generator=order_gen).tolist()
        batch, order = dist.shard(order[:cfg.rollout_batch_size]), order[cfg.rollout_batch_size:]
        # 1. collect: sample, score, recompute log π_old, log π_ref, V_old (rollout.py). The
        #    actor-critic is unsharded (all-gathered once) for the whole rollout, so decoding runs
        #    no per-token collective and ranks may stop at different lengths; resharded on exit. The
        #    frozen ref and PM stay sharded: called at their roots, the same number of forwards on
        #    every rank (equal per-rank prompt counts and chunks)
        with dist.unsharded(ac_ddp), autocast(device, cfg.bf16):
            rollout = collect_rollouts(ac, ref, pm, tokenizer, [kept[i][0] for i in batch],
                                       [kept[i][1] for i in batch], cfg, sample_gen,
                                       recompute_logprobs=cfg.recompute_logprobs)
        check_finite_rollout(step + 1, rollout)
        # 2-3. per-token rewards with the KL penalty, GAE, whitening
        rollout = compute_advantages(rollout, cfg, kl_coef)
        stats = dist.all_reduce_mean(rollout_stats(rollout, kl_coef))
        check_stats(step + 1, stats, cfg)
        # 4. ppo_epochs of minibatch updates
        stats.update(ppo_update(ac_ddp, optimizer, rollout, cfg, shuffle_gen, step=step + 1))
        check_finite_weights(step + 1, ac)
        # 5. the KL controller (a no-op at the paper's fixed β)
        kl_coef = next_kl_coef(kl_coef, stats["objective/kl"], cfg)
        # logging, table, checkpoints (rank 0 writes)
        record = {"step": step + 1, **stats, "train/lr": lr, "time/step_s": time.time() - t0}
        bar.set_postfix(score=f"{stats['objective/score']:.3f}", kl=f"{stats['objective/kl']:.2f}")
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if dist.is_main() and cfg.table_every and (step == 0 or (step + 1) % cfg.table_every == 0):
            tqdm.write(f"step {step + 1}: score {stats['objective/score']:.3f} kl "
                       f"{stats['objective/kl']:.2f} loss {stats['loss/total']:.4f} lr {lr:.2e} "
                       f"{record['time/step_s']:.1f} s")
            print_table(rollout, cfg.table_rows)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(os.path.join(out_dir, f"step-{step + 1:05d}"), ac, tokenizer, cfg)
    bar.close()
    save_checkpoint(out_dir, ac, tokenizer, cfg)
    if log:
        log.close()
    return record
