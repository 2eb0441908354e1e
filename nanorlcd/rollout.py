"""Experience collection for PPO (paper Sec. 3, step 3): sample replies, score them, recompute
log-probs.

What: `collect_rollouts` samples one reply per prompt from the policy at the PPO temperature (no
top-k or top-p: truncation would bias the probability ratio and the KL estimate), cuts each reply at
the next human turn, scores prompt + reply with the frozen preference model, and runs no-grad
forwards over the exact sampled tokens for the value model's values, the reference's log-probs
and (by default) the policy's log-probs and entropies; recompute_logprobs=False keeps the
sampler's instead, saving one policy forward. The result is a `Rollout`; ppo.py turns it into
rewards and advantages and optimises on it.
The off-by-one: a rollout is a query (N, P), left-padded, then a response (N, R), right-padded. The
hidden state at column P - 1 + t produces the logits of response token t, so log-probs, entropies
AND values of token t are read there: V_t is the value of the state *before* token t (AlpacaFarm
reads `last_hidden_state[:, P-1:-1]`).
Simplified: every rank holds full copies of the policy, reference, value model and PM.
Run: through `train_ppo` in ppo.py (`python train.py --stage ppo`).
"""
import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanorlcd.dialogue import HUMAN, cut_reply
from nanorlcd.pm import reward_inputs
from nanorlcd.sample import generate
from nanorlcd.tokenizer import left_pad


@dataclass
class Rollout:
    """One batch of experience on one rank: N prompts, P = longest prompt, R = longest response
    (tokens).

    `collect_rollouts` fills the first block; the PPO loop fills the second
    (ppo.compute_advantages). Float (N, R) tensors are read on real tokens only (response_mask):
    their pads may hold anything."""
    query_ids: torch.Tensor       # (N, P) long, prompts left-padded with the tokenizer's pad id
    query_mask: torch.Tensor      # (N, P) long, 1 on real prompt tokens
    # (N, R) long, sampled replies right-padded (EOS / stop tokens kept)
    response_ids: torch.Tensor
    response_mask: torch.Tensor   # (N, R) long, 1 on real response tokens
    # (N, R) float32, log π_old(y_t) at logits / temperature (sampler or fresh forward)
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor    # (N, R) float32, log π_ref(y_t) at logits / temperature
    # (N, R) float32, V_old(s_t), the value of the state before token t
    values: torch.Tensor
    entropy: torch.Tensor         # (N, R) float32, entropy of π_old at token t
    # (N, R) float32, the sampler's log-probs (KV cache): should equal logprobs
    gen_logprobs: torch.Tensor
    pm_scores: torch.Tensor       # (N,) float32, the PM's score of prompt + reply
    scores: torch.Tensor          # (N,) float32, pm_scores, or the penalty if the reply never ended
    # (N,) bool, the reply ended (EOS or the next human turn) in max_new_tokens
    finished: torch.Tensor
    prompts: list                 # N prompt texts
    replies: list                 # N reply texts, cut at the next human turn (what the PM read)
    # (N,) bool, rows whose logprobs and entropy come from a fresh forward, the others' from the
    # sampler (collect_rollouts' recompute_logprobs); rollout/logprob_gap is measured on these
    recomputed: Optional[torch.Tensor] = None
    # (N, R) log π_old − log π_ref per token (clamped if asked)
    kl: Optional[torch.Tensor] = None
    # (N, R) per-token rewards: −β·kl, + score on the last token
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None  # (N, R) GAE advantages (whitened if cfg.norm_adv)
    # (N, R) advantages + values: the value model's targets
    returns: Optional[torch.Tensor] = None

    def select(self, inds):
        """The rows `inds` (a LongTensor or a list of row indices), e.g. one minibatch or
        micro-batch."""
        rows = inds.tolist() if torch.is_tensor(inds) else list(inds)
        index = torch.as_tensor(rows, dtype=torch.long, device=self.response_mask.device)
        picked = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                v = v[index]
            elif isinstance(v, list):
                v = [v[i] for i in rows]
            picked[f.name] = v
        return Rollout(**picked)

    def trim(self):
        """Drop the pad columns every row shares: leading ones of the query, trailing ones of the
        response. Real tokens' outputs are unchanged (positions come from the mask); only compute is
        saved, though the rounding may differ from the untrimmed batch's in the last bit."""
        first, last = shared_pad_columns(self.query_mask, self.response_mask)
        trimmed = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v) and v.dim() == 2:
                v = v[:, first:] if f.name.startswith("query") else v[:, :last]
            trimmed[f.name] = v
        return Rollout(**trimmed)

    def seq_kl(self):
        """(N,) Σ_t log π_old/π_ref over each reply, unclamped: the KL estimate of each sequence."""
        return (self.logprobs - self.ref_logprobs).mul(self.response_mask).sum(-1)


def shared_pad_columns(query_mask, response_mask):
    """(first, last): query columns before `first` and response columns from `last` on are pads in
    every row (queries are left-padded, responses right-padded)."""
    first = query_mask.shape[1] - int(query_mask.sum(-1).max())
    last = int(response_mask.sum(-1).max())
    return first, last


# ---------------------------------------------------------------------- models and their forwards

def make_value_model(pm, keep_pm_head=False):
    """Value model = a trainable copy of the PM (backbone + `score` head), head zeroed unless
    keep_pm_head: V starts at 0 everywhere on the PM's features (AlpacaFarm's
    init_value_with_reward)."""
    value = copy.deepcopy(pm).requires_grad_(True)
    if not keep_pm_head:
        nn.init.zeros_(value.score.weight)
    return value


def response_logits(model, query_ids, query_mask, response_ids, response_mask, temperature):
    """Logits / temperature (B, R, V), fp32, of the response positions, from one forward over query
    (B, P) + response (B, R). `model` is a LLaMA, called at its root (so FSDP and DDP wrappers see
    the call); only the R kept positions go through its LM head."""
    prompt_len = query_ids.shape[1]
    ids = torch.cat([query_ids, response_ids], dim=1)                          # (B, P + R)
    mask = torch.cat([query_mask, response_mask], dim=1)                       # (B, P + R)
    # the hidden state at column P-1+t produces the logits of response token t: columns P-1 .. P+R-2
    logits = model(ids, mask, keep=slice(prompt_len - 1, ids.shape[1] - 1))    # (B, R, V)
    return logits.float() / temperature


def token_logprobs(logits, tokens):
    """log softmax(logits) at `tokens`: (B, R, V), (B, R) -> (B, R), without materialising the
    (B, R, V) log-softmax (logit − logsumexp)."""
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


def response_logprobs(model, query_ids, query_mask, response_ids, response_mask, temperature):
    """log π(y_t) (B, R) of the response tokens under softmax(logits / temperature); pads are not
    zeroed (the caller masks them)."""
    logits = response_logits(model, query_ids, query_mask, response_ids, response_mask, temperature)
    return token_logprobs(logits, response_ids)                                # (B, R)


def response_values(value, query_ids, query_mask, response_ids, response_mask):
    """V_t (B, R) for response token t, read at hidden state P - 1 + t (the state before token
    t)."""
    prompt_len = query_ids.shape[1]
    ids = torch.cat([query_ids, response_ids], dim=1)                          # (B, P + R)
    hidden = value.model(ids, torch.cat([query_mask, response_mask], dim=1))  # (B, P + R, D)
    return value.score(hidden[:, prompt_len - 1:-1]).squeeze(-1).float()      # (B, R)


def entropy_of(logits):
    """Entropy (B, R) of softmax(logits) (B, R, V): − Σ p log p over the vocabulary."""
    logp_all = logits.log_softmax(-1)                                          # (B, R, V)
    return -(logp_all.exp() * logp_all).sum(-1)


class ActorCritic(nn.Module):
    """Policy + value as one module, so that one DDP wrapper syncs both and one optimiser and one
    grad clip cover both (AlpacaFarm's ActorCritic). forward -> (logprobs, entropy, values), each
    (B, R). entropy_grad=False computes the entropy outside autograd: the paper trains without an
    entropy bonus (ent_coef 0), so its full-vocabulary graph would be built and never used."""

    def __init__(self, policy, value, entropy_grad=True):
        super().__init__()
        self.policy, self.value, self.entropy_grad = policy, value, entropy_grad

    def forward(self, query_ids, query_mask, response_ids, response_mask, temperature):
        logits = response_logits(self.policy, query_ids, query_mask, response_ids, response_mask,
                                 temperature)                                    # (B, R, V)
        logprobs = token_logprobs(logits, response_ids)                          # (B, R)
        with torch.set_grad_enabled(self.entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_of(logits)                                         # (B, R)
        values = response_values(self.value, query_ids, query_mask, response_ids, response_mask)
        return logprobs, entropy, values


# ----------------------------------------------------------------------------- collection

def right_pad(rows, pad_id, device):
    """A list of id lists -> (ids, mask), (B, R) long tensors right-padded (R = the longest row)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def collect_rollouts(ac, ref, pm, tokenizer, prompt_texts, prompt_ids, cfg, generator,
                     recompute_logprobs=True):
    """One batch of experience on this rank for the prompts (texts and their BOS-led token ids):
    sample, score, then forward over the exact tokens. `cfg` is a PPOConfig. Returns a `Rollout`
    without rewards and advantages.

    recompute_logprobs: where log π_old and the entropies come from. True (default): a fresh
    forward over every row, the same computation as the reference's and the update's, so an exact
    copy of the policy gives a KL of exactly 0 and the first update a ratio of exactly 1. False:
    the sampler's (the distribution each token was drawn from; they differ from a full forward only
    by float rounding, ~1e-6 in fp32, more in bf16), which saves one policy forward over the batch;
    one micro-batch of rows is still recomputed (`Rollout.recomputed`), so `rollout/logprob_gap`
    keeps checking the KV-cached decoding against a full forward."""
    device = next(ac.parameters()).device
    # rows per no-grad forward: the frozen models and the value model need no backward, so they
    # take the sampler's batch rather than the (small) training micro-batch
    chunk = max(cfg.gen_batch_size, cfg.micro_batch_size)
    # 1. sample at the PPO temperature, no truncation, stopping at EOS or the next human turn
    tokens, finished, gen_logprobs, gen_entropy = [], [], [], []
    for i in range(0, len(prompt_ids), cfg.gen_batch_size):
        out = generate(ac.policy, prompt_ids[i:i + cfg.gen_batch_size], cfg.max_new_tokens,
                       temperature=cfg.temperature, eos_id=tokenizer.eos_id, stop_strings=[HUMAN],
                       tokenizer=tokenizer, generator=generator, pad_id=tokenizer.pad_id)
        tokens += out.tokens
        finished.append(out.finished)
        gen_logprobs.append(out.logprobs)                       # (gen_batch_size, T_new), 0 on pads
        gen_entropy.append(out.entropy)
    finished = torch.cat(finished)                                                     # (N,)
    query_ids, query_mask = (t.to(device) for t in left_pad(prompt_ids, tokenizer.pad_id))  # (N, P)
    response_ids, response_mask = right_pad(tokens, tokenizer.pad_id, device)            # (N, R)
    n, width = response_ids.shape
    gen_logprobs, gen_entropy = (torch.cat([F.pad(g, (0, width - g.shape[1])) for g in parts])
                                 .to(device) for parts in (gen_logprobs, gen_entropy))  # (N, R)
    # 2. PM score of prompt + " " + reply + "\n\nHuman:"; the penalty replaces it if the reply
    #    never ended or is empty (the reference penalises replies without a proper end the same way)
    replies = [cut_reply(tokenizer.decode(t)) for t in tokens]
    scores = []
    for i in range(0, n, chunk):
        ids, mask, _ = reward_inputs(tokenizer, prompt_texts[i:i + chunk], replies[i:i + chunk],
                                     cfg.pm_max_len)
        scores.append(pm(ids.to(device), mask.to(device)).float())
    pm_scores = torch.cat(scores)                                                      # (N,)
    ended = finished & torch.tensor([len(reply) > 0 for reply in replies], device=device)
    scores = pm_scores
    if cfg.penalty_reward is not None:
        scores = torch.where(ended, pm_scores, cfg.penalty_reward)
    # 3. forwards over the exact sampled tokens, chunk by chunk on trimmed columns: V_old and
    #    log π_ref on every row, log π_old and entropy on the first `checked` rows (all, or one
    #    micro-batch as a check of the sampler's)
    def trimmed(rows):
        first, last = shared_pad_columns(query_mask[rows], response_mask[rows])
        return last, (query_ids[rows, first:], query_mask[rows, first:],
                      response_ids[rows, :last], response_mask[rows, :last])

    values, ref_logprobs = torch.zeros_like(gen_logprobs), torch.zeros_like(gen_logprobs)  # (N, R)
    for i in range(0, n, chunk):
        rows = slice(i, i + chunk)
        last, inputs = trimmed(rows)
        values[rows, :last] = response_values(ac.value, *inputs)
        ref_logprobs[rows, :last] = response_logprobs(ref, *inputs, cfg.temperature)
    checked = n if recompute_logprobs else min(n, cfg.micro_batch_size)
    logprobs, entropy = gen_logprobs.clone(), gen_entropy.clone()                      # (N, R)
    for i in range(0, checked, chunk):
        rows = slice(i, min(i + chunk, checked))
        last, inputs = trimmed(rows)
        logits = response_logits(ac.policy, *inputs, cfg.temperature)             # (B, R', V)
        logprobs[rows, :last] = token_logprobs(logits, inputs[2])
        entropy[rows, :last] = entropy_of(logits)
    recomputed = torch.arange(n, device=device) < checked                              # (N,)
    # pads hold whatever the forward produced there; every consumer masks them
    return Rollout(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                   response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                   values=values, entropy=entropy, gen_logprobs=gen_logprobs, pm_scores=pm_scores,
                   scores=scores, finished=finished, prompts=list(prompt_texts), replies=replies,
                   recomputed=recomputed)


def print_table(rollout, n):
    """A few rollouts of this step: prompt tail, reply, score and KL
    (lm-human-preference-details)."""
    lines = [f"{'prompt (end)':<40} | {'reply':<60} | score  | KL"]
    rows = zip(rollout.prompts, rollout.replies, rollout.scores.tolist(), rollout.seq_kl().tolist())
    for prompt, reply, score, kl in list(rows)[:n]:
        lines.append(f"{prompt[-40:]!r:<40.40} | {reply!r:<60.60} | {score:+.3f} | {kl:+.2f}")
    tqdm.write("\n".join(lines))
