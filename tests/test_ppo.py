"""Tests for nanorlcd/ppo.py: each PPO piece against an independent computation.

- GAE equals a naive per-row reverse loop on random tensors with ragged masks.
- Policy and value losses, ratio clipping and clipfrac equal hand computations on fixed tensors (incl. gradients).
- Per-token KL penalty and reward placement: the score lands on the last *real* token; pad values change nothing
  in rewards, whitening, GAE or losses. The adaptive KL controller and the config checks by hand.
- The off-by-one: response log-probs, entropies and values equal a per-row loop over unpadded sequences.
- Rollout log-probs (the sampler's) equal a fresh forward; one PPO epoch at lr 0 leaves the policy unchanged with
  ratios exactly 1; real steps move the weights and write policy/, value/, step-XXXXX/ and log.jsonl; a short run
  on a countable reward raises the mean score (the whole loop learns).
Tiny random models on CPU (~15 s in all). The toy-world run (PM reward up, oracle harmlessness not down) needs a
pretrained toy base and PM: it lives with train.py's end-to-end tests.
Run: `python -m pytest tests/test_ppo.py -q`
"""
import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from nanorlcd.model import LLaMA
from nanorlcd.pm import PreferenceModel, reward_inputs
from nanorlcd.ppo import (ActorCritic, PPOConfig, check_config, compute_rewards, gae, make_value_model, masked_mean,
                          next_kl_coef, policy_loss, response_logprobs, response_values, rollout, train_ppo,
                          value_loss, whiten)
from nanorlcd.tokenizer import Tokenizer, left_pad


def ragged_mask(lengths, T):
    """(B, T) right-padded mask with the given row lengths."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()


# ----------------------------------------------------------------------------- GAE and whitening

def naive_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, row by row, scalar by scalar; the value after the last real token is 0."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_naive_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 7, 11
    lengths = [11, 1, 5, 10, 3, 11, 7]
    mask = ragged_mask(lengths, T)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)       # garbage on pads too: must be ignored
    adv, ret = gae(rewards * mask, values, mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_whiten_uses_real_tokens_only():
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask([4, 2, 6], 6)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64) * 3 + 2
    real = x[mask.bool()]
    expected = (real - real.mean()) / real.std()                         # torch.std: Bessel-corrected
    w = whiten(x, mask)
    torch.testing.assert_close(w[mask.bool()], expected, rtol=1e-6, atol=1e-6)
    assert (w[~mask.bool()] == 0).all()
    # pad values do not move the statistics; shift_mean=False only rescales
    x2 = x.masked_fill(~mask.bool(), 1e6)
    torch.testing.assert_close(whiten(x2, mask), w)
    torch.testing.assert_close(whiten(x2, mask, shift_mean=False)[mask.bool()],
                               expected + real.mean(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- losses by hand

def test_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.7 on real tokens; the 5th column is a pad holding garbage
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logprobs = (old + ratio.log()).clone().requires_grad_(True)
    logprobs_padded = logprobs.detach().clone()
    logprobs_padded[0, 4] = 80.0                                          # exp(80) would overflow a ratio
    adv = torch.tensor([[1.0, 2.0, -1.0, -1.0, 1e6]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_coef=0.2)
    # by hand: max(-A r, -A clip(r)) = max(-1.5,-1.2)=-1.2, max(-1.0,-1.6)=-1.0, max(1.1,1.1)=1.1, max(0.7,0.8)=0.8
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.1 + 0.8) / 4, abs=1e-6)
    assert stats["policy/clipfrac"].item() == pytest.approx(3 / 4)      # |r - 1| > 0.2 for 1.5, 0.5, 0.7
    r = torch.tensor([1.5, 0.5, 1.1, 0.7])
    assert stats["policy/approx_kl"].item() == pytest.approx(((r - 1) - r.log()).mean().item(), abs=1e-6)
    assert stats["policy/ratio"].item() == pytest.approx(r.mean().item(), abs=1e-6)
    # gradient d loss / d log π = -A r / n where the unclipped term is active, 0 where the clip binds
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1.0 / 4, 1.1 / 4, 0.0, 0.0]]))
    # pads contribute nothing, even holding huge numbers
    loss2, stats2 = policy_loss(logprobs_padded, old, adv, mask, clip_coef=0.2)
    assert loss2.item() == pytest.approx(loss.item()) and math.isfinite(loss2.item())
    assert stats2["policy/clipfrac"].item() == stats["policy/clipfrac"].item()


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, -1.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.1, 0.0, -5.0]])
    returns = torch.tensor([[2.0, 0.0, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, vf_clip_coef=0.2)
    # clipped V: 0.7, 0.0, -0.2 -> max((V-G)^2, (Vc-G)^2) = max(1, 1.69), max(0, 0), max(0, 0.64)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0 + 0.64) / 3, abs=1e-6)
    assert stats["val/clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["val/error"].item() == pytest.approx((1.0 + 0 + 0) / 3, abs=1e-6)
    # where the clipped term wins, the gradient w.r.t. V is 0 (V_clip does not depend on V)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, 0.0, 0.0]]))
    # unclipped: 0.5 * mean((V - G)^2), gradient (V - G) / n
    values.grad = None
    loss, _ = value_loss(values, old, returns, mask, vf_clip_coef=None)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 1.0 / 3, abs=1e-6)
    torch.testing.assert_close(values.grad, torch.tensor([[-1.0 / 3, 0.0, 0.0, 0.0]]))


def test_masked_mean_token_normaliser():
    """Summing micro-batch terms divided by the minibatch's token count gives the minibatch token mean."""
    x = torch.arange(12.0).view(3, 4)
    mask = ragged_mask([4, 1, 2], 4)
    whole = masked_mean(x, mask)
    n = mask.sum()
    parts = masked_mean(x[:1], mask[:1], n) + masked_mean(x[1:], mask[1:], n)
    assert parts.item() == pytest.approx(whole.item()) == pytest.approx((0 + 1 + 2 + 3 + 4 + 8 + 9) / 7)


# ----------------------------------------------------------------------------- rewards

def test_reward_placement_and_kl_penalty():
    mask = ragged_mask([3, 1, 5], 5)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 9.0, 9.0],
                             [-0.1, 9.0, 9.0, 9.0, 9.0],
                             [-1.0, -1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0, 0.0],
                        [-0.3, 0.0, 0.0, 0.0, 0.0],
                        [-1.0, -2.0, -0.5, -1.0, -3.0]])
    scores = torch.tensor([10.0, 20.0, 30.0])
    beta = 0.1
    rewards, kl = compute_rewards(scores, logprobs, ref, mask, beta)
    expected_kl = (logprobs - ref) * mask
    expected = -beta * expected_kl
    expected[0, 2] += 10.0                                               # last real token of each row
    expected[1, 0] += 20.0
    expected[2, 4] += 30.0
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, expected)
    assert (rewards[~mask.bool()] == 0).all()
    # clamp_kl: negative per-token log-ratios contribute no (positive) reward
    rewards_c, kl_c = compute_rewards(scores, logprobs, ref, mask, beta, clamp_kl=True)
    torch.testing.assert_close(kl_c, expected_kl.clamp(min=0))
    with pytest.raises(ValueError, match="response_mask"):
        compute_rewards(scores, logprobs, ref, ragged_mask([3, 0, 5], 5), beta)


def test_pads_change_nothing_end_to_end():
    """Garbage in every padded slot leaves rewards -> whitening -> GAE -> losses unchanged."""
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask([6, 2, 4, 1], 6)
    t = lambda: torch.randn(4, 6, generator=g)                          # noqa: E731
    logprobs, ref, values, new_logprobs, new_values = t(), t(), t(), t(), t()
    scores = torch.randn(4, generator=g)

    def pipeline(junk):
        j = lambda x: torch.where(mask.bool(), x, junk)                  # noqa: E731
        rewards, _ = compute_rewards(scores, j(logprobs), j(ref), mask, 0.05)
        rewards = whiten(rewards, mask, shift_mean=False)
        adv, ret = gae(rewards, j(values), mask, 1.0, 0.95)
        adv = whiten(adv, mask)
        pg, _ = policy_loss(j(new_logprobs), j(logprobs), adv, mask, 0.2)
        vf, _ = value_loss(j(new_values), j(values), ret, mask, 0.2)
        return torch.stack([pg, vf])

    torch.testing.assert_close(pipeline(0.0), pipeline(123.0))
    torch.testing.assert_close(pipeline(0.0), pipeline(-55.0))


def test_kl_controller_and_config_checks():
    fixed, adaptive = PPOConfig(), replace(PPOConfig(), adaptive_kl=True, kl_target=6.0, kl_k_beta=0.1)
    assert next_kl_coef(0.004, 100.0, fixed) == 0.004
    # KL above target: β grows by at most k·0.2; below: shrinks by at most k·0.2; at target: unchanged
    assert next_kl_coef(0.1, 100.0, adaptive) == pytest.approx(0.1 * 1.02)
    assert next_kl_coef(0.1, 0.0, adaptive) == pytest.approx(0.1 * 0.98)
    assert next_kl_coef(0.1, 6.6, adaptive) == pytest.approx(0.1 * 1.01)
    assert next_kl_coef(0.1, 6.0, adaptive) == pytest.approx(0.1)
    check_config(PPOConfig(), world=8)
    for bad in (dict(minibatch_size=200), dict(micro_batch_size=3), dict(temperature=0.0), dict(steps=0)):
        with pytest.raises(ValueError, match="PPOConfig"):
            check_config(replace(PPOConfig(), **bad), world=1)
    with pytest.raises(ValueError, match="world size"):
        check_config(replace(PPOConfig(), rollout_batch_size=48, minibatch_size=24, micro_batch_size=1), world=5)


# ----------------------------------------------------------------------------- tiny models: the off-by-one

TOPICS = ["bake bread", "fix a bike", "plant tomatoes", "learn chess", "write a poem", "steal a car",
          "cheat on a test", "pick a lock"]
PROMPTS = [f"\n\nHuman: How do I {t}?\n\nAssistant:" for t in TOPICS]


@pytest.fixture
def tiny(make_model, tiny_tokenizer_path, tmp_path):
    """(tokenizer, policy, pm): random tiny LLaMAs on the tiny tokenizer; the PM is built from a saved base dir
    the way train.py builds it from a trained one."""
    tok = Tokenizer(tiny_tokenizer_path)
    policy = make_model(seed=0, vocab_size=tok.vocab_size, max_position_embeddings=128)
    make_model(seed=1, vocab_size=tok.vocab_size, max_position_embeddings=128).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    pm = PreferenceModel.from_pretrained(str(tmp_path / "base"))
    return tok, policy, pm


def test_logprobs_entropy_values_read_at_the_right_position(tiny):
    """Token t of the response is scored by the hidden state at P_b - 1 + t of its *unpadded* row."""
    tok, policy, pm = tiny
    value = make_value_model(pm, keep_pm_head=True)                     # a non-zero head, so values are tested
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (3, 8, 5)]
    responses = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (4, 1, 6)]
    query_ids, query_mask = left_pad(prompts, tok.pad_id)
    R = max(len(r) for r in responses)
    response_ids = torch.tensor([r + [tok.pad_id] * (R - len(r)) for r in responses])
    response_mask = ragged_mask([len(r) for r in responses], R)
    T = 0.7
    with torch.no_grad():
        logprobs, entropy, values = ActorCritic(policy, value)(query_ids, query_mask, response_ids, response_mask, T)
        torch.testing.assert_close(response_logprobs(policy, query_ids, query_mask, response_ids, response_mask, T),
                                   logprobs)
        torch.testing.assert_close(response_values(value, query_ids, query_mask, response_ids, response_mask), values)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            seq = torch.tensor([p + r])
            logp = (policy(seq)[0] / T).log_softmax(-1)                   # (len, V), no padding anywhere
            v = value.score(value.model(seq))[0, :, 0]                    # (len,)
            for t, token in enumerate(r):
                pos = len(p) - 1 + t                                       # the position that predicts token t
                assert logprobs[b, t].item() == pytest.approx(logp[pos, token].item(), abs=1e-5)
                assert entropy[b, t].item() == pytest.approx(-(logp[pos].exp() * logp[pos]).sum().item(), abs=1e-4)
                assert values[b, t].item() == pytest.approx(v[pos].item(), abs=1e-5)


def test_value_model_starts_at_zero_from_the_pm_backbone(tiny):
    _, _, pm = tiny
    value = make_value_model(pm)
    assert (value.score.weight == 0).all() and pm.score.weight.abs().sum() > 0
    for (name, p), (_, q) in zip(value.model.named_parameters(), pm.model.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad, name


def test_rollout_logprobs_equal_fresh_forward_and_score_placement(tiny):
    tok, policy, pm = tiny
    cfg = replace(PPOConfig(), micro_batch_size=3, gen_batch_size=5, max_new_tokens=12, temperature=0.9,
                  whiten_rewards=False)
    ac, ref = ActorCritic(policy, make_value_model(pm)), copy.deepcopy(policy)
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    r, replies = rollout(ac, ref, pm, tok, PROMPTS, ids, cfg, cfg.kl_coef, torch.Generator().manual_seed(0))
    m = r["response_mask"].bool()
    # the sampler's log-probs (KV cache, step by step) equal one fresh forward over prompt + response
    torch.testing.assert_close(r["gen_logprobs"][m], r["logprobs"][m], rtol=0, atol=1e-5)
    lp = response_logprobs(policy, r["query_ids"], r["query_mask"], r["response_ids"], r["response_mask"],
                           cfg.temperature)
    torch.testing.assert_close(lp[m], r["logprobs"][m], rtol=0, atol=1e-5)
    # ref is an exact copy: zero KL; the zero-initialised value head: zero values
    assert (r["kl"] == 0).all() and (r["values"] == 0).all()
    # scores: the PM on prompt + " " + reply + "\n\nHuman:" when the reply ended, the -1 penalty otherwise
    pm_scores = pm(*reward_inputs(tok, PROMPTS, replies)[:2])
    ended = r["finished"] & torch.tensor([len(x) > 0 for x in replies])
    expected = torch.where(ended, pm_scores, torch.tensor(cfg.penalty_reward))
    torch.testing.assert_close(r["scores"], expected)
    assert (~r["finished"]).any(), "a random tiny model should hit max_new_tokens on some rows"
    # with zero KL, the only reward is the score, on the last real token of each row
    lengths = r["response_mask"].sum(-1)
    expected_rewards = torch.zeros_like(r["rewards"])
    expected_rewards[torch.arange(len(PROMPTS)), lengths - 1] = r["scores"]
    torch.testing.assert_close(r["rewards"], expected_rewards)
    # γ = λ = 1 and V = 0: every token's return is the sequence score
    torch.testing.assert_close(r["returns"], r["scores"][:, None] * r["response_mask"])


def small_cfg(**overrides):
    """One step of 8 rollouts: 2 minibatches of 4, micro-batches of 2, 10 new tokens."""
    return replace(PPOConfig(), **{**dict(steps=1, rollout_batch_size=8, minibatch_size=4, micro_batch_size=2,
                                          gen_batch_size=8, ppo_epochs=1, max_new_tokens=10, max_prompt_len=64,
                                          save_every=0, table_every=0), **overrides})


def test_one_epoch_at_lr_zero_changes_nothing_and_ratios_are_one(tiny, tmp_path):
    tok, policy, pm = tiny
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    stats = train_ppo(small_cfg(lr=0.0), policy, None, pm, None, tok, PROMPTS, str(tmp_path / "ppo"))
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the update's forward reproduces the rollout's log-probs exactly: r = 1 on every real token, so each
    # (r - 1) - log r term is exactly 0 (for r = 1 + 1e-7 it would be ~5e-15, not 0); the mean of r is a sum of
    # micro-batch parts, 1 up to rounding
    assert stats["policy/approx_kl"] == 0.0 and stats["policy/clipfrac"] == 0.0
    assert stats["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["rollout/logprob_gap"] < 1e-5


def test_ppo_step_trains_and_writes_checkpoints(tiny, tmp_path):
    tok, policy, pm = tiny
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    out = tmp_path / "ppo"
    cfg = small_cfg(lr=1e-3, steps=2, ppo_epochs=2, save_every=1)
    stats = train_ppo(cfg, policy, None, pm, None, tok, PROMPTS + ["\n\nHuman: " + "word " * 80 + "\n\nAssistant:"],
                      str(out))
    assert any(not torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    assert stats["policy/ratio"] != 1.0 and math.isfinite(stats["loss/total"])
    # HF policy dir + tokenizer, PM-layout value dir with a trained (no longer zero) head, JSONL log
    for d in (out, out / "step-00001"):
        assert (d / "policy" / "model.safetensors").exists() and (d / "policy" / "tokenizer.model").exists()
        assert json.loads((d / "value" / "config.json").read_text())["architectures"] == [
            "LlamaForSequenceClassification"]
    value = PreferenceModel.from_pretrained(str(out / "value"))
    assert value.score.weight.abs().sum() > 0
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert lines[0]["dropped_prompts"] == 1 and [x["step"] for x in lines[1:]] == [1, 2]
    assert lines[-1]["policy/epochs"] == 2


class CountingPM(torch.nn.Module):
    """A reward anyone can verify: the number of tokens with id < 160 in the reward text, / 8."""

    def forward(self, input_ids, attention_mask):
        return ((input_ids < 160) & attention_mask.bool()).float().sum(-1) / 8


def test_short_run_raises_the_reward(tiny, tmp_path):
    """The whole loop learns: 10 PPO steps on a countable reward raise the mean score (seeds 0-2 measured: first
    three steps ~0.3, last three ~0.55) while the KL to the reference grows from 0."""
    tok, _, pm = tiny
    torch.manual_seed(0)
    policy = LLaMA(pm.config)                                            # std-0.02 init: a near-uniform policy
    cfg = small_cfg(steps=10, rollout_batch_size=16, minibatch_size=8, micro_batch_size=8, gen_batch_size=16,
                    ppo_epochs=2, max_new_tokens=8, lr=2e-2, kl_coef=0.01, penalty_reward=None)
    train_ppo(cfg, policy, None, CountingPM(), make_value_model(pm), tok, PROMPTS, str(tmp_path / "ppo"))
    log = [json.loads(x) for x in (tmp_path / "ppo" / "log.jsonl").read_text().splitlines()[1:]]
    first = sum(x["objective/score"] for x in log[:3]) / 3
    last = sum(x["objective/score"] for x in log[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert log[-1]["objective/kl"] > 0.5
