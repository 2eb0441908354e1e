"""PPO against a preference model with a per-token KL penalty: RLCD's step 3 (RLHF as AlpacaFarm runs it).

Implements (PAPER.md "PPO"; Ziegler et al. 2019; Ouyang et al. 2022; PPO: Schulman et al. 2017; GAE: Schulman et
al. 2016): rollouts at temperature T with no top-k / top-p (truncation would bias the ratio and the KL estimate);
the PM score on the last real response token plus -β·(log π − log π_ref) on every token; GAE over response tokens;
reward and advantage whitening; clipped surrogate and clipped value losses; ppo_epochs over shuffled minibatches
with gradient accumulation; one AdamW over policy + value, grad-norm clipping, linear lr decay; fixed or adaptive β.
Models: policy (trainable LLaMA), reference (frozen copy of the initial policy), reward = PM (frozen), value = a
trainable copy of the PM (backbone + `score` head). LLaMA has no dropout. Prompts over max_prompt_len tokens are
dropped, as the reference's query_len filter does.
The off-by-one: a rollout is a query (B, P), left-padded, then a response (B, R), right-padded. The hidden state at
column P − 1 + t produces the logits of response token t, so log-probs, entropies AND values of token t are read
there: V_t is the value of the state *before* token t (AlpacaFarm's `last_hidden_state[:, P-1:-1]`). The state
after the last real token is terminal: its value is 0.
Choices that differ from AlpacaFarm as RLCD ran it (tatsu-lab/alpaca_farm `rl/ppo_trainer.py` at b68d7cf, patched
by facebookresearch/RLCD `alpaca-farm-modifications.patch`):
  1. Padding is masked out everywhere: losses, reward/advantage whitening, GAE and stats see real response tokens
     only (the reference averages over the pads after the end; PAPER.md "quirks").
  2. No KL clamp by default (`clamp_kl=False`): with untruncated sampling Σ_t (log π − log π_ref) is an unbiased
     estimate of KL(π‖π_ref); the reference clamps each token's log-ratio at 0, which biases it upward.
  3. Sampling stops at EOS or "\\n\\nHuman:" and the episode ends there. The reference samples on to EOS or 300
     tokens, cuts the text only for the PM, and trains on (and puts the score after) the tail.
  4. The −1 penalty replaces the score of replies that hit max_new_tokens or are empty; the reference also
     penalises replies that ended with EOS rather than "\\n\\nHuman:".
  5. The value head is the PM's bias-free `score`, zeroed (or kept: `keep_pm_head`); the reference adds a new
     zeroed Linear with a bias on the PM backbone.
  6. approx_kl = mean((r − 1) − log r) and clipfrac = frac(|r − 1| > ε) (cleanrl); the reference logs
     0.5·mean((log r)²) and the fraction where the clipped term wins.
  7. Whitening statistics are global over ranks and every minibatch is normalised by its real-token count, so N
     processes and gradient accumulation give the gradient of one process on the whole minibatch.
Simplified: no resumable optimizer state, no FSDP (each rank holds all four models), no periodic evaluation.
Run: `python train.py --stage ppo --method rlcd`; in code `train_ppo(PPOConfig(), policy, None, pm, None,
tokenizer, prompts, out_dir)` (ref and value default to copies of the policy and the PM).
"""
import contextlib
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanorlcd import dist
from nanorlcd.pm import reward_inputs
from nanorlcd.sample import HUMAN_TURN, generate
from nanorlcd.tokenizer import left_pad


@dataclass
class PPOConfig:
    # rollouts (defaults: AlpacaFarm's rlhf_ppo as RLCD ran it on LLaMA-7B)
    steps: int = 80                  # PPO steps, one rollout batch each (RLCD: 40-80; quality decays later)
    rollout_batch_size: int = 512    # prompts rolled out per step, all ranks together
    minibatch_size: int = 256        # rollouts per optimiser step, all ranks together (AlpacaFarm step_batch_size)
    micro_batch_size: int = 2        # rollouts per forward/backward on one rank; accumulation fills the minibatch
    gen_batch_size: int = 32         # prompts per generate() call on one rank (rollout_per_device_batch_size)
    ppo_epochs: int = 2              # passes over each rollout batch (noptepochs)
    max_prompt_len: int = 192        # prompts longer than this (tokens, BOS included) are dropped (query_len)
    max_new_tokens: int = 300        # response length cap (response_len)
    temperature: float = 1.0         # sampling temperature; log-probs use logits / T too; > 0
    # reward
    kl_coef: float = 0.004           # β in -β·(log π − log π_ref) per token; RLCD: 0.002 or 0.004, fixed
    clamp_kl: bool = False           # clamp each token's log π − log π_ref at 0 (AlpacaFarm: True; see docstring)
    adaptive_kl: bool = False        # Ziegler et al.'s controller moves β toward kl_target (paper: fixed β)
    kl_target: float = 6.0           # adaptive only: target KL(π‖π_ref) per sequence, nats
    kl_k_beta: float = 0.1           # adaptive only: β *= 1 + k_beta·clip(KL / kl_target − 1, ±0.2) each step
    pm_max_len: int = 512            # tokens per reward text; longer ones lose the prompt's oldest tokens (pm.py)
    penalty_reward: float = -1.0     # replaces the PM score of replies that never end or are empty; None = off
    whiten_rewards: bool = True      # divide per-token rewards by their std over the batch (no mean shift)
    # PPO (cleanrl names)
    gamma: float = 1.0               # discount over response tokens (1: the reward is one sequence-level score)
    gae_lambda: float = 1.0          # GAE λ (1: Monte-Carlo returns minus the value baseline)
    norm_adv: bool = True            # whiten advantages over the batch (mean 0, std 1)
    clip_coef: float = 0.2           # policy ratio clip ε
    vf_clip_coef: float = 0.2        # value clip: V may move at most this far from the rollout's V; None = off
    vf_coef: float = 0.1             # weight of the value loss in the total loss
    ent_coef: float = 0.0            # entropy bonus weight (paper: none)
    target_kl: float = None          # stop this step's epochs once approx_kl exceeds it (cleanrl); None = never
    # optimiser (policy and value together, one AdamW, as AlpacaFarm's ActorCritic)
    lr: float = 1e-5                 # AdamW lr, decayed linearly to 0 over `steps`
    adam_eps: float = 1e-5           # AdamW ε (OpenAI's PPO value, not PyTorch's 1e-8)
    weight_decay: float = 0.0        # AdamW decoupled weight decay
    max_grad_norm: float = 1.0       # global grad-norm clip over policy + value
    bf16: bool = False               # bf16 autocast on CUDA for every forward (weights and AdamW stay as loaded)
    # models and bookkeeping
    keep_pm_head: bool = False       # value head starts as the PM head (True) or zero (False, AlpacaFarm)
    seed: int = 0                    # prompt order and per-rank sampling seeds
    save_every: int = 20             # checkpoint every this many steps (0 = only at the end)
    table_every: int = 10            # print a small prompt/response/score/KL table every this many steps (0 = off)
    table_rows: int = 3              # rows in that table


# The toy world (CPU, ~1.2 M parameter LLaMA, replies <= ~30 tokens): small batches, the paper's 2 epochs, a larger
# lr and β. Measured on the `toy` preset's base and PM (300 test prompts, T = 1): harmless 94-98 %, invalid 0.3-3 %
# over seeds at 12-16 steps (base: 46 %, 0 %); β = 0.05 or 30 steps drift into invalid replies that the PM still
# likes (up to 6 %). 6-11 s per step measured on a shared 2-core machine (one thread).
TOY = replace(PPOConfig(), steps=16, rollout_batch_size=64, minibatch_size=32, micro_batch_size=8,
              gen_batch_size=64, max_new_tokens=48, kl_coef=0.2, lr=1e-4, save_every=0, table_every=4)


# ----------------------------------------------------------------------------- masked statistics

def masked_mean(x, mask, n_tokens=None):
    """Mean of x over real tokens (mask 1). n_tokens overrides the count: the whole minibatch's, so that gradient
    accumulation and DDP average over tokens rather than over micro-batches."""
    n = mask.sum() if n_tokens is None else n_tokens
    return torch.where(mask.bool(), x, 0.0).sum() / n


def masked_moments(x, mask):
    """Mean and (Bessel-corrected, as torch.var in AlpacaFarm's whiten) variance of x over real tokens on all
    ranks."""
    m = mask.bool()
    s = dist.all_reduce_sum(torch.stack([torch.where(m, x, 0.0).sum(), m.sum().to(x.dtype)]))   # [Σx, n]
    mean, n = s[0] / s[1], s[1]
    sq = dist.all_reduce_sum(torch.where(m, (x - mean) ** 2, 0.0).sum())
    return mean, sq / (n - 1).clamp(min=1)


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x − mean) / std over real tokens only (the reference includes pads); shift_mean=False keeps the mean and
    only rescales (reward whitening). Pads are 0."""
    mean, var = masked_moments(x, mask)
    w = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), w if shift_mean else w + mean, 0.0)


# ----------------------------------------------------------------------------- rewards, GAE, losses

def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, clamp_kl=False):
    """Per-token rewards (B, R): r_t = −β·(log π − log π_ref)_t on real tokens, plus the PM score (B,) at the last
    real token of each row. Returns (rewards, kl) with kl the per-token log-ratio (0 on pads, clamped if asked)."""
    m = mask.bool()
    if not m.any(-1).all():
        raise ValueError("response_mask: every row needs at least one real token (got an empty response)")
    kl = torch.where(m, logprobs - ref_logprobs, 0.0)                        # (B, R)
    if clamp_kl:
        kl = kl.clamp(min=0.0)
    rewards = -kl_coef * kl
    last = m.long().sum(-1) - 1                                              # (B,) index of the last real token
    rewards[torch.arange(len(last)), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over right-padded response tokens, all (B, T):
    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  V and A past the last real token are 0 (terminal).
    Returns (advantages, returns = advantages + values), both 0 on pads. One vectorised reverse scan over T."""
    m = mask.to(rewards.dtype)
    values = values * m
    next_m = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)          # (B, T) 1 if t+1 is real
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * next_m
    deltas = (rewards + gamma * next_values - values) * m                    # (B, T) TD errors δ_t
    adv, last = [], torch.zeros_like(deltas[:, 0])
    for t in reversed(range(rewards.shape[1])):
        last = deltas[:, t] + gamma * lam * next_m[:, t] * last
        adv.append(last)
    advantages = torch.stack(adv[::-1], dim=1) * m                           # (B, T)
    return advantages, (advantages + values) * m


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef, n_tokens=None):
    """Clipped surrogate (Schulman et al. 2017, eq. 7) as a loss: mean over real tokens of
    max(−A·r, −A·clip(r, 1−ε, 1+ε)), r = π/π_old. Returns (loss, detached stats)."""
    logratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)      # log r_t; pads 0 (no inf/nan)
    ratio = logratio.exp()
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask, n_tokens)
    with torch.no_grad():
        stats = {"policy/approx_kl": masked_mean((ratio - 1) - logratio, mask, n_tokens),
                 "policy/clipfrac": masked_mean(((ratio - 1).abs() > clip_coef).float(), mask, n_tokens),
                 "policy/ratio": masked_mean(ratio, mask, n_tokens)}
    return loss, stats


def value_loss(values, old_values, returns, mask, vf_clip_coef, n_tokens=None):
    """Clipped value loss 0.5·mean(max((V − G)², (V_clip − G)²)), V_clip = V_old + clip(V − V_old, ±ε_v) (OpenAI
    baselines / AlpacaFarm). Returns (loss, detached stats)."""
    vf_losses1 = (values - returns) ** 2
    if vf_clip_coef is None:
        vf_losses2 = vf_losses1
    else:
        clipped = old_values + (values - old_values).clamp(-vf_clip_coef, vf_clip_coef)
        vf_losses2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask, n_tokens)
    with torch.no_grad():
        stats = {"val/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask, n_tokens),
                 "val/error": masked_mean(vf_losses1, mask, n_tokens)}
    return loss, stats


# ----------------------------------------------------------------------------- models

def make_value_model(pm, keep_pm_head=False):
    """Value model = a trainable copy of the PM (backbone + `score` head), head zeroed unless keep_pm_head: V starts
    at 0 everywhere on the PM's features (AlpacaFarm's init_value_with_reward)."""
    value = copy.deepcopy(pm).requires_grad_(True)
    if not keep_pm_head:
        nn.init.zeros_(value.score.weight)
    return value


def response_logits(model, query_ids, query_mask, response_ids, response_mask, temperature):
    """Logits / T (B, R, V), fp32, of the response positions, from one forward pass over query (B, P) + response
    (B, R). `model` is a LLaMA (anything with a .model backbone and an .lm_head)."""
    P = query_ids.shape[1]
    ids = torch.cat([query_ids, response_ids], dim=1)                       # (B, P + R)
    h = model.model(ids, torch.cat([query_mask, response_mask], dim=1))    # (B, P + R, D)
    # the hidden state at column P-1+t produces the logits of response token t: columns P-1 .. P+R-2
    return model.lm_head(h[:, P - 1:-1]).float() / temperature             # (B, R, V)


def response_logprobs(model, query_ids, query_mask, response_ids, response_mask, temperature):
    """log π(y_t) (B, R) of the response tokens under softmax(logits / T) (0-padding is the caller's mask)."""
    logits = response_logits(model, query_ids, query_mask, response_ids, response_mask, temperature)
    return logits.log_softmax(-1).gather(-1, response_ids[..., None]).squeeze(-1)   # (B, R)


def response_values(value, query_ids, query_mask, response_ids, response_mask):
    """V_t (B, R) for response token t, read at hidden state P − 1 + t (the state before token t; see docstring)."""
    P = query_ids.shape[1]
    ids = torch.cat([query_ids, response_ids], dim=1)                       # (B, P + R)
    h = value.model(ids, torch.cat([query_mask, response_mask], dim=1))    # (B, P + R, D)
    return value.score(h[:, P - 1:-1]).squeeze(-1).float()                  # (B, R)


class ActorCritic(nn.Module):
    """Policy + value as one module, so that one DDP wrapper syncs both and one optimiser and one grad clip cover
    both (AlpacaFarm's ActorCritic). forward -> (logprobs, entropy, values), each (B, R)."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, query_ids, query_mask, response_ids, response_mask, temperature):
        logp_all = response_logits(self.policy, query_ids, query_mask, response_ids, response_mask,
                                   temperature).log_softmax(-1)                   # (B, R, V)
        logprobs = logp_all.gather(-1, response_ids[..., None]).squeeze(-1)       # (B, R)
        entropy = -(logp_all.exp() * logp_all).sum(-1)                            # (B, R)
        values = response_values(self.value, query_ids, query_mask, response_ids, response_mask)
        return logprobs, entropy, values


# ----------------------------------------------------------------------------- rollout

def _right_pad(rows, pad_id, device):
    """list of id lists -> (ids, mask), (B, R) LongTensors right-padded (R = the longest row)."""
    R = max(len(r) for r in rows)
    ids = torch.full((len(rows), R), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), R), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def trim(b):
    """Drop the pad columns all rows of a micro-batch share: on the left of the queries (query_*), on the right
    of the responses (every other (B, R) tensor). Real tokens' outputs are unchanged (positions come from the
    mask); only compute is saved. The rounding may differ from the untrimmed batch's (in the last bit)."""
    first = b["query_mask"].shape[1] - int(b["query_mask"].sum(-1).max())   # leading all-pad query columns
    last = int(b["response_mask"].sum(-1).max())                            # columns with a real response token
    return {k: v[:, first:] if k.startswith("query") else v[:, :last] for k, v in b.items()}


@torch.no_grad()
def rollout(ac, ref, pm, tokenizer, prompt_texts, prompt_ids, cfg, kl_coef, generator):
    """One batch of experience on this rank: sample replies, score them, recompute log-probs and values with a
    fresh forward, shape per-token rewards, GAE. Returns a dict of (N, ·) tensors plus the reply texts."""
    device, mb = next(ac.parameters()).device, cfg.micro_batch_size
    # 1. sample at temperature T, no truncation, stopping at EOS or the next human turn
    tokens, finished, gen_logprobs = [], [], []
    for i in range(0, len(prompt_ids), cfg.gen_batch_size):
        out = generate(ac.policy, prompt_ids[i:i + cfg.gen_batch_size], cfg.max_new_tokens,
                       temperature=cfg.temperature, eos_id=tokenizer.eos_id, stop_strings=[HUMAN_TURN],
                       tokenizer=tokenizer, generator=generator, pad_id=tokenizer.pad_id)
        tokens += out.tokens
        finished.append(out.finished)
        gen_logprobs.append(out.logprobs)                                     # (gen_batch, T_new), 0 on pads
    finished = torch.cat(finished)                                           # (N,)
    query_ids, query_mask = (t.to(device) for t in left_pad(prompt_ids, tokenizer.pad_id))   # (N, P)
    response_ids, response_mask = _right_pad(tokens, tokenizer.pad_id, device)                  # (N, R)
    # 2. PM score of prompt + " " + reply + "\n\nHuman:" (reply cut at the human turn); penalty if no proper end
    replies = [tokenizer.decode(t).split(HUMAN_TURN)[0].strip() for t in tokens]
    scores = []
    for i in range(0, len(replies), mb):
        ids, mask, _ = reward_inputs(tokenizer, prompt_texts[i:i + mb], replies[i:i + mb], cfg.pm_max_len)
        scores.append(pm(ids.to(device), mask.to(device)).float())
    scores = torch.cat(scores)                                               # (N,)
    ok = finished & torch.tensor([len(r) > 0 for r in replies], device=device)
    if cfg.penalty_reward is not None:
        scores = torch.where(ok, scores, cfg.penalty_reward)
    # 3. a fresh forward over the exact rollout tokens: log π, entropy, V and log π_ref, micro-batch by micro-batch
    parts, R = {"logprobs": [], "entropy": [], "values": [], "ref_logprobs": []}, response_ids.shape[1]
    for i in range(0, len(tokens), mb):
        batch = trim({"query_ids": query_ids[i:i + mb], "query_mask": query_mask[i:i + mb],
                      "response_ids": response_ids[i:i + mb], "response_mask": response_mask[i:i + mb]})
        batch = list(batch.values())
        outs = [*ac(*batch, cfg.temperature), response_logprobs(ref, *batch, cfg.temperature)]
        for k, v in zip(parts, outs):
            parts[k].append(F.pad(v, (0, R - v.shape[1])))                   # back to (mb, R), 0 on pads
    r = {k: torch.cat(v) for k, v in parts.items()}                         # each (N, R)
    # 4. per-token rewards (score at the last real token), optional reward scaling, GAE, advantage whitening
    rewards, kl = compute_rewards(scores, r["logprobs"], r["ref_logprobs"], response_mask, kl_coef, cfg.clamp_kl)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, response_mask, shift_mean=False)
    advantages, returns = gae(rewards, r["values"], response_mask, cfg.gamma, cfg.gae_lambda)
    if cfg.norm_adv:
        advantages = whiten(advantages, response_mask)
    gen_logprobs = torch.cat([F.pad(g, (0, R - g.shape[1])) for g in gen_logprobs]).to(device)   # (N, R)
    r.update(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
             scores=scores, finished=finished, kl=kl, rewards=rewards, advantages=advantages, returns=returns,
             gen_logprobs=gen_logprobs)
    return r, replies


def rollout_stats(r, kl_coef):
    """Step metrics of this rank's rollouts (train_ppo averages them over ranks; README documents each one)."""
    m = r["response_mask"]
    seq_kl = (r["logprobs"] - r["ref_logprobs"]).mul(m).sum(-1)           # (N,) Σ_t log π/π_ref, unclamped
    penalty = kl_coef * r["kl"].sum(-1)                                       # (N,) what the rewards subtracted
    ret_mean, ret_var = masked_moments(r["returns"], m)
    _, err_var = masked_moments(r["returns"] - r["values"], m)
    stats = {"objective/score": r["scores"].mean(), "objective/kl": seq_kl.mean(),
             "objective/reward": (r["scores"] - penalty).mean(), "objective/kl_coef": kl_coef,
             "rollout/response_len": m.sum(-1).float().mean(), "rollout/finished": r["finished"].float().mean(),
             "rollout/logprob_gap": masked_mean((r["gen_logprobs"] - r["logprobs"]).abs(), m),
             "policy/entropy": masked_mean(r["entropy"], m), "val/mean": masked_mean(r["values"], m),
             "val/returns_mean": ret_mean,
             # 1 − Var[G − V] / Var[G] over real tokens: how much of the return the value model explains
             "val/explained_var": 1 - err_var / ret_var.clamp(min=1e-8)}
    return {k: float(v) for k, v in stats.items()}


# ----------------------------------------------------------------------------- update and training loop

TRAIN_KEYS = ("query_ids", "query_mask", "response_ids", "response_mask", "logprobs", "values", "advantages",
              "returns")


def ppo_update(ac_ddp, optimizer, r, cfg, generator):
    """ppo_epochs over shuffled minibatches of this rank's rollouts r (from `rollout`), one optimiser step per
    minibatch with gradient accumulation over micro-batches. Returns the mean stats, global over ranks."""
    world, N = dist.world_size(), r["response_mask"].shape[0]
    local_mb = cfg.minibatch_size // world
    params = [p for p in ac_ddp.parameters() if p.requires_grad]
    history = []
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(N, generator=generator).to(r["response_mask"].device)
        epoch_stats = []
        for start in range(0, N, local_mb):
            idx = perm[start:start + local_mb]
            # this minibatch's real-token count on all ranks (/ world: DDP averages gradients over ranks)
            n_tokens = dist.all_reduce_sum(r["response_mask"][idx].sum().float()) / world
            micro, sums = idx.split(cfg.micro_batch_size), {}
            for j, mi in enumerate(micro):
                b = trim({k: r[k][mi] for k in TRAIN_KEYS})
                m = b["response_mask"]
                # all-reduce gradients only on the last micro-batch of the minibatch
                sync = j == len(micro) - 1 or world == 1
                with contextlib.nullcontext() if sync else ac_ddp.no_sync():
                    with autocast(cfg, m.device):
                        logprobs, entropy, values = ac_ddp(b["query_ids"], b["query_mask"], b["response_ids"], m,
                                                           cfg.temperature)
                    pg_loss, pg_stats = policy_loss(logprobs, b["logprobs"], b["advantages"], m, cfg.clip_coef,
                                                    n_tokens)
                    vf_loss, vf_stats = value_loss(values, b["values"], b["returns"], m, cfg.vf_clip_coef, n_tokens)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    if cfg.ent_coef:
                        loss = loss - cfg.ent_coef * masked_mean(entropy, m, n_tokens)
                    loss.backward()
                # each micro-batch's terms are already divided by the minibatch's tokens: summing gives the mean
                for k, v in {**pg_stats, **vf_stats, "loss/policy": pg_loss, "loss/value": vf_loss,
                             "loss/total": loss}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
            sums["loss/grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_stats.append(dist.all_reduce_mean({k: float(v) for k, v in sums.items()}))
        history += epoch_stats
        # early stop (cleanrl): every rank sees the same all-reduced approx_kl, so all ranks stop together
        approx_kl = sum(s["policy/approx_kl"] for s in epoch_stats) / len(epoch_stats)
        if cfg.target_kl is not None and approx_kl > cfg.target_kl:
            break
    stats = {k: sum(s[k] for s in history) / len(history) for k in history[0]}
    stats["policy/epochs"] = epoch + 1
    return stats


def next_kl_coef(kl_coef, kl, cfg):
    """β for the next step: fixed (the paper), or Ziegler et al. 2019's adaptive controller (sec. 2.2, as in
    AlpacaFarm): β ← β·(1 + k_β·clip(KL / KL_target − 1, −0.2, 0.2)), KL = this step's mean sequence KL."""
    if not cfg.adaptive_kl:
        return kl_coef
    return kl_coef * (1 + cfg.kl_k_beta * min(max(kl / cfg.kl_target - 1, -0.2), 0.2))


def autocast(cfg, device):
    """bf16 autocast on CUDA when cfg.bf16 (log-softmax and values are computed in fp32 regardless)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


def check_config(cfg, world):
    """Exact divisibility of the batch sizes over ranks, minibatches and micro-batches (one-line errors)."""
    local_rollouts, r1 = divmod(cfg.rollout_batch_size, world)
    local_mb, r2 = divmod(cfg.minibatch_size, world)
    if r1 or r2 or local_mb == 0 or local_rollouts % local_mb or local_mb % cfg.micro_batch_size:
        raise ValueError(f"PPOConfig: expected rollout_batch_size ({cfg.rollout_batch_size}) divisible by "
                         f"minibatch_size ({cfg.minibatch_size}), itself divisible by world size ({world}) x "
                         f"micro_batch_size ({cfg.micro_batch_size})")
    if cfg.steps < 1:
        raise ValueError(f"PPOConfig.steps: got {cfg.steps}, expected >= 1")
    if cfg.temperature <= 0:
        raise ValueError(f"PPOConfig.temperature: got {cfg.temperature}, expected > 0 (PPO needs sampling)")


def save_checkpoint(path, ac, tokenizer, cfg):
    """Rank 0 writes path/policy/ (HF LLaMA + tokenizer.model), path/value/ (PM layout) and ppo_config.json."""
    if dist.is_main():
        ac.policy.save_pretrained(os.path.join(path, "policy"))
        tokenizer.save(os.path.join(path, "policy"))
        ac.value.save_pretrained(os.path.join(path, "value"), tokenizer=tokenizer)
        with open(os.path.join(path, "ppo_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    dist.barrier()


def print_table(r, replies, prompts, n):
    """A few rollouts of this step: prompt tail, reply, score and KL (lm-human-preference-details)."""
    seq_kl = (r["logprobs"] - r["ref_logprobs"]).mul(r["response_mask"]).sum(-1)
    lines = [f"{'prompt (end)':<40} | {'reply':<60} | score  | KL"]
    for p, reply, s, k in list(zip(prompts, replies, r["scores"].tolist(), seq_kl.tolist()))[:n]:
        lines.append(f"{p[-40:]!r:<40.40} | {reply!r:<60.60} | {s:+.3f} | {k:+.2f}")
    tqdm.write("\n".join(lines))


def train_ppo(cfg, policy, ref, pm, value, tokenizer, prompts, out_dir, log_path=None):
    """Optimise `policy` (a LLaMA on this rank's device) against `pm` with PPO on the prompt texts `prompts`.
    ref=None -> a frozen copy of the initial policy; value=None -> make_value_model(pm, cfg.keep_pm_head).
    Writes out_dir/policy/, out_dir/value/, out_dir/step-XXXXX/ checkpoints and log.jsonl (rank 0).
    Returns the last step's stats."""
    rank, world, _ = dist.init()
    check_config(cfg, world)
    device = next(policy.parameters()).device
    ref = copy.deepcopy(policy) if ref is None else ref
    value = make_value_model(pm, cfg.keep_pm_head) if value is None else value
    for frozen in (ref, pm):
        frozen.to(device).eval().requires_grad_(False)
    ac = ActorCritic(policy, value.to(device)).train()
    # 1. tokenize once; drop prompts that leave no room for a reply (same on every rank)
    limit = min(cfg.max_prompt_len, policy.config.max_position_embeddings - cfg.max_new_tokens)
    kept = [(p, ids) for p in prompts if len(ids := tokenizer.encode(p, bos=True)) <= limit]
    if not kept:
        raise ValueError(f"prompts: none of {len(prompts)} prompts fits in max_prompt_len={limit} tokens")
    # 2. one AdamW over policy + value; DDP wraps the trained pair only (ref and PM are replicated, frozen)
    params = [p for p in ac.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    ac_ddp = dist.wrap(ac)
    order_gen = torch.Generator().manual_seed(cfg.seed)                     # same prompt order on every rank
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank)    # per-rank sampling seed
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1000 + rank)     # per-rank minibatch shuffling
    log = None
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        log = open(log_path or os.path.join(out_dir, "log.jsonl"), "w")
        log.write(json.dumps({"config": asdict(cfg), "world_size": world, "prompts": len(kept),
                              "dropped_prompts": len(prompts) - len(kept)}) + "\n")
    dist.print0(f"ppo: {len(kept)} prompts ({len(prompts) - len(kept)} longer than {limit} tokens dropped), "
                f"world {world}, config {asdict(cfg)}")

    # 3. the loop: roll out, score, advantages, then ppo_epochs of minibatch updates
    kl_coef, order, record = cfg.kl_coef, [], {}
    bar = tqdm(range(cfg.steps), disable=not dist.is_main(), desc="ppo", dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        lr = cfg.lr * (1 - step / cfg.steps)                                 # linear decay to 0 (cleanrl)
        for group in optimizer.param_groups:
            group["lr"] = lr
        while len(order) < cfg.rollout_batch_size:                          # reshuffle at each pass over prompts
            order += torch.randperm(len(kept), generator=order_gen).tolist()
        batch, order = dist.shard(order[:cfg.rollout_batch_size]), order[cfg.rollout_batch_size:]
        texts, ids = [kept[i][0] for i in batch], [kept[i][1] for i in batch]
        with autocast(cfg, device):
            r, replies = rollout(ac, ref, pm, tokenizer, texts, ids, cfg, kl_coef, sample_gen)
        stats = dist.all_reduce_mean(rollout_stats(r, kl_coef))
        stats.update(ppo_update(ac_ddp, optimizer, r, cfg, shuffle_gen))
        kl_coef = next_kl_coef(kl_coef, stats["objective/kl"], cfg)
        # 4. logging, table, checkpoints (rank 0 writes)
        record = {"step": step + 1, **stats, "train/lr": lr, "time/step_s": time.time() - t0}
        bar.set_postfix(score=f"{stats['objective/score']:.3f}", kl=f"{stats['objective/kl']:.2f}")
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if dist.is_main() and cfg.table_every and (step == 0 or (step + 1) % cfg.table_every == 0):
            tqdm.write(f"step {step + 1}: score {stats['objective/score']:.3f} kl {stats['objective/kl']:.2f} "
                       f"loss {stats['loss/total']:.4f} lr {lr:.2e} {record['time/step_s']:.1f} s")
            print_table(r, replies, texts, cfg.table_rows)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(os.path.join(out_dir, f"step-{step + 1:05d}"), ac, tokenizer, cfg)
    bar.close()
    save_checkpoint(out_dir, ac, tokenizer, cfg)
    if log:
        log.close()
    return record
