"""Tests for nanorlcd/ppo.py: each PPO piece against an independent computation.

- GAE equals a naive per-row reverse loop on random tensors with ragged masks.
- Whitening equals AlpacaFarm's formula (biased std) by hand, over real tokens only.
- Policy and value losses, ratio clipping and clipfrac equal hand computations (incl. gradients).
- Per-token KL penalty and reward placement: the score lands on the last *real* token; pad values
change nothing in rewards, whitening, GAE or losses. The adaptive KL controller and config checks.
- compute_advantages on a real rollout: with zero KL and V = 0 the returns are the scores.
- The learning rate as logged: 5 warmup steps, then linear decay to 0, by hand.
- One epoch at lr 0 leaves the policy unchanged with ratios exactly 1; real steps move the weights
and write policy/, value/, step-XXXXX/ and log.jsonl; a short run on a countable reward learns.
- Numeric guards: a NaN PM, lr 1 and the KL bounds each stop the run with a one-line error naming
the step and the quantity, and nothing is saved. Tiny random models on CPU; the two-process check is
test_ppo_dist.py, rollout.py's is test_rollout.py.
Run: `python -m pytest tests/test_ppo.py -q` """
import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from nanorlcd.model import LLaMA
from nanorlcd.pm import PreferenceModel
from nanorlcd.ppo import (Diverged, PPOConfig, check_config, compute_advantages, compute_rewards,
                          gae, make_value_model, masked_mean, next_kl_coef, policy_loss, train_ppo,
                          value_loss, whiten)
from nanorlcd.rollout import ActorCritic, collect_rollouts
from test_rollout import PROMPTS, ragged_mask, tiny  # noqa: F401  (tiny: a fixture used below)


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
    # garbage on pads too: must be ignored
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards * mask, values, mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_whiten_by_hand():
    """AlpacaFarm's whiten: (x − mean) / (std + 1e-8) with the biased std (divided by n)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [6.0, -7.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # real tokens 1, 2, 3, 6: mean 3, squared deviations 4 + 1 + 0 + 9 = 14, biased var 14 / 4
    std = math.sqrt(14 / 4)
    expected = torch.tensor([[(1 - 3) / std, (2 - 3) / std, 0.0, 0.0], [(6 - 3) / std, 0, 0, 0]],
                            dtype=torch.float64)
    torch.testing.assert_close(whiten(x, mask), expected, rtol=0, atol=1e-7)
    # shift_mean=False adds the mean back (the reference's reward whitening)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), (expected + 3) * mask)


def test_whiten_uses_real_tokens_only():
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask([4, 2, 6], 6)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64) * 3 + 2
    real = x[mask.bool()]
    expected = (real - real.mean()) / real.std(unbiased=False)
    w = whiten(x, mask)
    torch.testing.assert_close(w[mask.bool()], expected, rtol=1e-6, atol=1e-6)
    assert (w[~mask.bool()] == 0).all()
    # pad values do not move the statistics
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
    # exp(80) would overflow a ratio
    logprobs_padded[0, 4] = 80.0
    adv = torch.tensor([[1.0, 2.0, -1.0, -1.0, 1e6]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_coef=0.2)
    # by hand: max(-A r, -A clip(r)) = max(-1.5,-1.2)=-1.2, max(-1.0,-1.6)=-1.0, max(1.1,1.1)=1.1,
    # max(0.7,0.8)=0.8
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.1 + 0.8) / 4, abs=1e-6)
    # |r - 1| > 0.2 for 1.5, 0.5, 0.7
    assert stats["policy/clipfrac"].item() == pytest.approx(3 / 4)
    r = torch.tensor([1.5, 0.5, 1.1, 0.7])
    expected_approx_kl = ((r - 1) - r.log()).mean().item()
    assert stats["policy/approx_kl"].item() == pytest.approx(expected_approx_kl, abs=1e-6)
    assert stats["policy/ratio"].item() == pytest.approx(r.mean().item(), abs=1e-6)
    # gradient d loss / d log π = -A r / n where the unclipped term is active, 0 where the clip
    # binds
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
    """Summing micro-batch terms divided by the minibatch's token count gives the minibatch token
    mean."""
    x = torch.arange(12.0).view(3, 4)
    mask = ragged_mask([4, 1, 2], 4)
    whole = masked_mean(x, mask)
    n = mask.sum()
    parts = masked_mean(x[:1], mask[:1], n) + masked_mean(x[1:], mask[1:], n)
    expected = (0 + 1 + 2 + 3 + 4 + 8 + 9) / 7
    assert parts.item() == pytest.approx(whole.item()) == pytest.approx(expected)


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
    # last real token of each row
    expected[0, 2] += 10.0
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
    fixed = PPOConfig()
    adaptive = replace(PPOConfig(), adaptive_kl=True, kl_target=6.0, kl_k_beta=0.1)
    assert next_kl_coef(0.004, 100.0, fixed) == 0.004
    # KL above target: β grows by at most k·0.2; below: shrinks by at most k·0.2; at target:
    # unchanged
    assert next_kl_coef(0.1, 100.0, adaptive) == pytest.approx(0.1 * 1.02)
    assert next_kl_coef(0.1, 0.0, adaptive) == pytest.approx(0.1 * 0.98)
    assert next_kl_coef(0.1, 6.6, adaptive) == pytest.approx(0.1 * 1.01)
    assert next_kl_coef(0.1, 6.0, adaptive) == pytest.approx(0.1)
    check_config(PPOConfig(), world=8)
    for bad in (dict(minibatch_size=200), dict(micro_batch_size=3), dict(temperature=0.0),
                dict(steps=0), dict(warmup_steps=-1)):
        with pytest.raises(ValueError, match="PPOConfig"):
            check_config(replace(PPOConfig(), **bad), world=1)
    with pytest.raises(ValueError, match="world size"):
        check_config(replace(PPOConfig(), rollout_batch_size=48, minibatch_size=24,
                             micro_batch_size=1), world=5)


# ----------------------------------------------------------------------------- tiny models

def test_compute_advantages_on_a_collected_rollout(tiny):
    """Zero KL (an exact reference copy) and V = 0 (zeroed head): the only reward is the score on
    the last real token, and with γ = λ = 1 every token's return is the sequence score."""
    tok, policy, pm = tiny
    cfg = replace(PPOConfig(), micro_batch_size=3, gen_batch_size=5, max_new_tokens=12,
                  whiten_rewards=False)
    ac, ref = ActorCritic(policy, make_value_model(pm)), copy.deepcopy(policy)
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    generator = torch.Generator().manual_seed(0)
    rollout = collect_rollouts(ac, ref, pm, tok, PROMPTS, ids, cfg, generator)
    rollout = compute_advantages(rollout, cfg, cfg.kl_coef)
    mask = rollout.response_mask
    assert (rollout.kl == 0).all()
    expected_rewards = torch.zeros_like(rollout.rewards)
    expected_rewards[torch.arange(len(PROMPTS)), mask.sum(-1) - 1] = rollout.scores
    torch.testing.assert_close(rollout.rewards, expected_rewards)
    torch.testing.assert_close(rollout.returns, rollout.scores[:, None] * mask)
    # advantages = returns − V = returns, whitened over the real tokens
    torch.testing.assert_close(rollout.advantages, whiten(rollout.returns, mask))


def small_cfg(**overrides):
    """One step of 8 rollouts: 2 minibatches of 4, micro-batches of 2, 10 new tokens, no warmup."""
    fields = dict(steps=1, rollout_batch_size=8, minibatch_size=4, micro_batch_size=2,
                  gen_batch_size=8, ppo_epochs=1, max_new_tokens=10, max_prompt_len=64,
                  warmup_steps=0, save_every=0, table_every=0)
    return replace(PPOConfig(), **{**fields, **overrides})


def read_log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()[1:]]


def test_one_epoch_at_lr_zero_changes_nothing_and_ratios_are_one(tiny, tmp_path):
    tok, policy, pm = tiny
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    stats = train_ppo(small_cfg(lr=0.0), policy, None, pm, None, tok, PROMPTS,
                      str(tmp_path / "ppo"))
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the update's forward reproduces the rollout's log-probs exactly: r = 1 on every real token, so
    # each
    # (r - 1) - log r term is exactly 0 (for r = 1 + 1e-7 it would be ~5e-15, not 0); the mean of r
    # is a sum of
    # micro-batch parts, 1 up to rounding
    assert stats["policy/approx_kl"] == 0.0 and stats["policy/clipfrac"] == 0.0
    assert stats["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["rollout/logprob_gap"] < 1e-5


def test_ppo_step_trains_and_writes_checkpoints(tiny, tmp_path):
    tok, policy, pm = tiny
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    out = tmp_path / "ppo"
    cfg = small_cfg(lr=1e-3, steps=2, ppo_epochs=2, save_every=1)
    long_prompt = "\n\nHuman: " + "word " * 80 + "\n\nAssistant:"
    stats = train_ppo(cfg, policy, None, pm, None, tok, PROMPTS + [long_prompt], str(out))
    assert any(not torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    assert stats["policy/ratio"] != 1.0 and math.isfinite(stats["loss/total"])
    # HF policy dir + tokenizer, PM-layout value dir with a trained (no longer zero) head, JSONL log
    for d in (out, out / "step-00001"):
        assert (d / "policy" / "model.safetensors").exists()
        assert (d / "policy" / "tokenizer.model").exists()
        assert json.loads((d / "value" / "config.json").read_text())["architectures"] == [
            "LlamaForSequenceClassification"]
    value = PreferenceModel.from_pretrained(str(out / "value"))
    assert value.score.weight.abs().sum() > 0
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert lines[0]["dropped_prompts"] == 1 and [x["step"] for x in lines[1:]] == [1, 2]
    assert lines[-1]["policy/epochs"] == 2


def test_failed_save_keeps_the_previous_set(tiny, tmp_path, monkeypatch):
    """policy/ and value/ switch as one set: a save that dies after writing policy/ leaves the
    previous run's policy/ and value/ in place, and no temporary directory behind."""
    tok, policy, pm = tiny
    out = tmp_path / "run" / "ppo"
    train_ppo(small_cfg(), copy.deepcopy(policy), None, pm, None, tok, PROMPTS, str(out))
    before = {name: (out / name / "model.safetensors").read_bytes() for name in ("policy", "value")}

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreferenceModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train_ppo(small_cfg(lr=1e-2), policy, None, pm, None, tok, PROMPTS, str(out))
    for name, data in before.items():
        assert (out / name / "model.safetensors").read_bytes() == data, name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ppo"]


class CountingPM(torch.nn.Module):
    """A reward anyone can verify: the number of tokens with id < 160 in the reward text, / 8."""

    def forward(self, input_ids, attention_mask):
        return ((input_ids < 160) & attention_mask.bool()).float().sum(-1) / 8


def test_short_run_raises_the_reward_and_follows_the_schedule(tiny, tmp_path):
    """The whole loop learns: 10 PPO steps on a countable reward raise the mean score while the KL
    to the reference grows from 0. The logged lr is AlpacaFarm's schedule: 5 warmup steps, then
    linear decay to 0 (lr_at counts the step being taken, so warmup step s runs at (s + 1) / 5 of
    the peak)."""
    tok, _, pm = tiny
    torch.manual_seed(0)
    # std-0.02 init: a near-uniform policy
    policy = LLaMA(pm.config)
    cfg = small_cfg(steps=10, rollout_batch_size=16, minibatch_size=8, micro_batch_size=8,
                    gen_batch_size=16, ppo_epochs=2, max_new_tokens=8, lr=2e-2, warmup_steps=5,
                    kl_coef=0.01, penalty_reward=None)
    train_ppo(cfg, policy, None, CountingPM(), make_value_model(pm), tok, PROMPTS,
              str(tmp_path / "ppo"))
    log = read_log(tmp_path / "ppo")
    expected_lr = [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    assert [x["train/lr"] for x in log] == pytest.approx([2e-2 * f for f in expected_lr])
    first = sum(x["objective/score"] for x in log[:3]) / 3
    last = sum(x["objective/score"] for x in log[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert log[-1]["objective/kl"] > 0.5


# ----------------------------------------------------------------------------- numeric guards

class NaNPM(torch.nn.Module):
    """A broken preference model: NaN for every text."""

    def forward(self, input_ids, attention_mask):
        return torch.full((input_ids.shape[0],), float("nan"))


def assert_nothing_saved(out):
    assert not (out / "policy").exists() and not (out / "value").exists()


def test_nan_pm_stops_at_step_one(tiny, tmp_path):
    tok, policy, pm = tiny
    out = tmp_path / "ppo"
    with pytest.raises(Diverged, match=r"^ppo: step 1: PM score is non-finite on 8 rollout "):
        train_ppo(small_cfg(), policy, None, NaNPM(), make_value_model(pm), tok, PROMPTS, str(out))
    assert_nothing_saved(out)


def test_huge_lr_stops_before_saving(tiny, tmp_path):
    """lr 1 wrecks the policy within the first update: the run stops naming the step and a quantity
    (a non-finite loss, grad norm or weight, or approx_kl past its bound)."""
    tok, policy, pm = tiny
    out = tmp_path / "ppo"
    cfg = small_cfg(lr=1.0, steps=3, ppo_epochs=2)
    with pytest.raises(Diverged, match=r"^ppo: step \d+: ") as err:
        train_ppo(cfg, policy, None, pm, None, tok, PROMPTS, str(out))
    assert "\n" not in str(err.value)
    assert_nothing_saved(out)


@pytest.mark.parametrize("bound,quantity", [("max_kl", "objective/kl"),
                                            ("max_approx_kl", "policy/approx_kl")])
def test_kl_bounds_stop_the_run(tiny, tmp_path, bound, quantity):
    """A distinct reference makes the rollout KL positive; lr 1e-2 makes approx_kl positive: a bound
    below either stops step 1 with the quantity and the field named."""
    tok, policy, pm = tiny
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        ref.lm_head.weight.mul_(0.5)
    out = tmp_path / "ppo"
    cfg = small_cfg(lr=1e-2, **{bound: 1e-9})
    message = rf"^ppo: step 1: {quantity} = \S+ exceeds PPOConfig.{bound}"
    with pytest.raises(Diverged, match=message):
        train_ppo(cfg, policy, ref, pm, None, tok, PROMPTS, str(out))
    assert_nothing_saved(out)
