"""Tests for nanorlcd/rollout.py: experience collection against independent computations.

- `Rollout.select` equals indexing every field by hand; `Rollout.trim` drops exactly the pad columns
all rows share, and the model outputs on real tokens are the same trimmed or not.
- The off-by-one: response log-probs, entropies and values equal a per-row loop over unpadded
sequences.
- `collect_rollouts`: the sampler's log-probs equal a fresh forward; scores are the PM on the cut
reply (or the penalty); with a copied reference the KL is 0; with recompute_logprobs=False the
sampler's log-probs and entropies are kept except on the one recomputed micro-batch.
- `ActorCritic(entropy_grad=False)` gives the same outputs with the entropy outside autograd.
Tiny random models on CPU (a few seconds).
Run: `python -m pytest tests/test_rollout.py -q` """
import copy
from dataclasses import replace

import pytest
import torch

from nanorlcd.pm import PreferenceModel, reward_inputs
from nanorlcd.ppo import PPOConfig
from nanorlcd.rollout import (ActorCritic, Rollout, collect_rollouts, make_value_model,
                              response_logprobs, response_values, right_pad)
from nanorlcd.tokenizer import Tokenizer, left_pad

TOPICS = ["bake bread", "fix a bike", "plant tomatoes", "learn chess", "write a poem",
          "steal a car", "cheat on a test", "pick a lock"]
PROMPTS = [f"\n\nHuman: How do I {t}?\n\nAssistant:" for t in TOPICS]


def ragged_mask(lengths, width):
    """(B, width) right-padded mask with the given row lengths."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.fixture
def tiny(make_model, tiny_tokenizer_path, tmp_path):
    """(tokenizer, policy, pm): random tiny LLaMAs on the tiny tokenizer; the PM is built from a
    saved base dir the way train.py builds it from a trained one."""
    tok = Tokenizer(tiny_tokenizer_path)
    policy = make_model(seed=0, vocab_size=tok.vocab_size, max_position_embeddings=128)
    base = make_model(seed=1, vocab_size=tok.vocab_size, max_position_embeddings=128)
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    pm = PreferenceModel.from_pretrained(str(tmp_path / "base"))
    return tok, policy, pm


def random_batch(tok, prompt_lengths, response_lengths, seed=0):
    """Random token rows: (prompt id lists, response id lists, query_ids, query_mask, response_ids,
    response_mask) with a left-padded query and a right-padded response."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in prompt_lengths]
    responses = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist()
                 for n in response_lengths]
    query_ids, query_mask = left_pad(prompts, tok.pad_id)
    response_ids, response_mask = right_pad(responses, tok.pad_id, "cpu")
    return prompts, responses, query_ids, query_mask, response_ids, response_mask


def fake_rollout(n=5, prompt_width=6, response_width=7, seed=0):
    """A Rollout of random tensors with ragged masks (row i: prompt 2 + i % 3, response 1 + i)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)               # noqa: E731
    query_mask = ragged_mask([2 + i % 3 for i in range(n)], prompt_width).flip(-1)
    response_mask = ragged_mask([1 + i for i in range(n)], response_width)
    return Rollout(query_ids=torch.randint(3, 50, (n, prompt_width), generator=g),
                   query_mask=query_mask,
                   response_ids=torch.randint(3, 50, (n, response_width), generator=g),
                   response_mask=response_mask, logprobs=rand(n, response_width),
                   ref_logprobs=rand(n, response_width), values=rand(n, response_width),
                   entropy=rand(n, response_width), gen_logprobs=rand(n, response_width),
                   pm_scores=rand(n), scores=rand(n), finished=torch.arange(n) % 2 == 0,
                   prompts=[f"p{i}" for i in range(n)], replies=[f"r{i}" for i in range(n)],
                   advantages=rand(n, response_width))


def test_select_picks_rows_of_every_field():
    rollout = fake_rollout()
    rows = [3, 0, 3]
    picked = rollout.select(torch.tensor(rows))
    assert torch.equal(picked.logprobs, torch.stack([rollout.logprobs[i] for i in rows]))
    assert torch.equal(picked.query_ids, torch.stack([rollout.query_ids[i] for i in rows]))
    assert torch.equal(picked.scores, torch.tensor([rollout.scores[i].item() for i in rows]))
    assert picked.replies == ["r3", "r0", "r3"] and picked.prompts == ["p3", "p0", "p3"]
    assert picked.rewards is None and picked.returns is None       # unset fields stay unset
    assert torch.equal(picked.advantages, rollout.advantages[rows])
    assert rollout.select([1, 2]).replies == ["r1", "r2"]                # a plain list works too


def test_trim_drops_only_shared_pad_columns():
    rollout = fake_rollout(n=5, prompt_width=6, response_width=9)
    micro = rollout.select([0, 1, 2]).trim()
    # rows 0-2 have prompts of 2, 3, 4 tokens (left-padded to 6) and responses of 1, 2, 3 tokens
    assert micro.query_ids.shape == (3, 4) and micro.response_ids.shape == (3, 3)
    assert torch.equal(micro.query_ids, rollout.query_ids[:3, 2:])
    for name in ("response_mask", "logprobs", "values", "advantages", "gen_logprobs"):
        assert torch.equal(getattr(micro, name), getattr(rollout, name)[:3, :3]), name
    assert torch.equal(micro.scores, rollout.scores[:3])              # (N,) fields untouched
    assert micro.query_mask.sum() == rollout.query_mask[:3].sum()      # no real token lost
    assert micro.response_mask.sum() == rollout.response_mask[:3].sum()


def test_trim_leaves_real_token_outputs_unchanged(tiny):
    tok, policy, pm = tiny
    ac = ActorCritic(policy, make_value_model(pm, keep_pm_head=True))
    batch = random_batch(tok, (3, 6, 4), (2, 5, 1))
    query_ids, query_mask, response_ids, response_mask = batch[2:]
    # extra all-pad columns on both sides
    query_ids = torch.cat([torch.full((3, 2), tok.pad_id), query_ids], 1)
    query_mask = torch.cat([torch.zeros(3, 2, dtype=torch.long), query_mask], 1)
    response_ids = torch.cat([response_ids, torch.full((3, 3), tok.pad_id)], 1)
    response_mask = torch.cat([response_mask, torch.zeros(3, 3, dtype=torch.long)], 1)
    n = 3
    rollout = Rollout(query_ids, query_mask, response_ids, response_mask, *[torch.zeros(n, 8)] * 5,
                      *[torch.zeros(n)] * 2, torch.ones(n, dtype=torch.bool), [""] * n, [""] * n)
    micro = rollout.trim()
    assert micro.query_ids.shape[1] == 6 and micro.response_ids.shape[1] == 5
    with torch.no_grad():
        full = ac(query_ids, query_mask, response_ids, response_mask, 1.0)
        trimmed = ac(micro.query_ids, micro.query_mask, micro.response_ids, micro.response_mask,
                     1.0)
    real = micro.response_mask.bool()
    for a, b in zip(full, trimmed):
        torch.testing.assert_close(a[:, :5][real], b[real], rtol=0, atol=1e-5)


def test_logprobs_entropy_values_read_at_the_right_position(tiny):
    """Token t of the response is scored by the hidden state at P_b - 1 + t of its *unpadded*
    row."""
    tok, policy, pm = tiny
    value = make_value_model(pm, keep_pm_head=True)          # a non-zero head, so values are tested
    prompts, responses, query_ids, query_mask, response_ids, response_mask = random_batch(
        tok, (3, 8, 5), (4, 1, 6))
    temperature = 0.7
    inputs = (query_ids, query_mask, response_ids, response_mask)
    with torch.no_grad():
        logprobs, entropy, values = ActorCritic(policy, value)(*inputs, temperature)
        torch.testing.assert_close(response_logprobs(policy, *inputs, temperature), logprobs)
        torch.testing.assert_close(response_values(value, *inputs), values)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            seq = torch.tensor([p + r])
            logp = (policy(seq)[0] / temperature).log_softmax(-1)      # (len, V), no padding
            v = value.score(value.model(seq))[0, :, 0]                   # (len,)
            for t, token in enumerate(r):
                pos = len(p) - 1 + t                                      # predicts token t
                assert logprobs[b, t].item() == pytest.approx(logp[pos, token].item(), abs=1e-5)
                expected_entropy = -(logp[pos].exp() * logp[pos]).sum().item()
                assert entropy[b, t].item() == pytest.approx(expected_entropy, abs=1e-4)
                assert values[b, t].item() == pytest.approx(v[pos].item(), abs=1e-5)


def test_value_model_starts_at_zero_from_the_pm_backbone(tiny):
    _, _, pm = tiny
    value = make_value_model(pm)
    assert (value.score.weight == 0).all() and pm.score.weight.abs().sum() > 0
    for (name, p), (_, q) in zip(value.model.named_parameters(), pm.model.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad, name


def test_collect_logprobs_equal_fresh_forward_and_scores(tiny):
    tok, policy, pm = tiny
    cfg = replace(PPOConfig(), micro_batch_size=3, gen_batch_size=5, max_new_tokens=12,
                  temperature=0.9)
    ac, ref = ActorCritic(policy, make_value_model(pm)), copy.deepcopy(policy)
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    generator = torch.Generator().manual_seed(0)
    rollout = collect_rollouts(ac, ref, pm, tok, PROMPTS, ids, cfg, generator)
    real = rollout.response_mask.bool()
    n, width = rollout.response_ids.shape
    for name in ("logprobs", "ref_logprobs", "values", "entropy", "gen_logprobs"):
        assert getattr(rollout, name).shape == (n, width), name
    # the sampler's log-probs (KV cache, step by step) equal one fresh forward over prompt +
    # response
    torch.testing.assert_close(rollout.gen_logprobs[real], rollout.logprobs[real], rtol=0,
                               atol=1e-5)
    inputs = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
    fresh = response_logprobs(policy, *inputs, cfg.temperature)
    torch.testing.assert_close(fresh[real], rollout.logprobs[real], rtol=0, atol=1e-5)
    # ref is an exact copy: zero KL; the zero-initialised value head: zero values
    assert (rollout.seq_kl() == 0).all() and (rollout.values[real] == 0).all()
    # scores: the PM on prompt + " " + reply + "\n\nHuman:" when the reply ended, else the penalty
    pm_scores = pm(*reward_inputs(tok, PROMPTS, rollout.replies)[:2])
    ended = rollout.finished & torch.tensor([len(x) > 0 for x in rollout.replies])
    expected = torch.where(ended, pm_scores, torch.tensor(cfg.penalty_reward))
    torch.testing.assert_close(rollout.pm_scores, pm_scores)
    torch.testing.assert_close(rollout.scores, expected)
    assert (~rollout.finished).any(), "a random tiny model should hit max_new_tokens on some rows"
    # the replies are the decoded responses cut before the next human turn
    for reply, row, length in zip(rollout.replies, rollout.response_ids.tolist(),
                                  rollout.response_mask.sum(-1).tolist()):
        assert "Human:" not in reply and reply in tok.decode(row[:length])
    assert rollout.prompts == PROMPTS and rollout.rewards is None
    assert rollout.recomputed.all()


def test_sampler_logprobs_reused_and_one_micro_batch_checked(tiny):
    """recompute_logprobs=False: log π_old and entropies come from the sampler, except the first
    micro-batch, recomputed by a fresh forward; everything else equals the recomputing rollout."""
    tok, policy, pm = tiny
    cfg = replace(PPOConfig(), micro_batch_size=3, gen_batch_size=5, max_new_tokens=12)
    ac, ref = ActorCritic(policy, make_value_model(pm, keep_pm_head=True)), copy.deepcopy(policy)
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    full, reused = (collect_rollouts(ac, ref, pm, tok, PROMPTS, ids, cfg,
                                     torch.Generator().manual_seed(0), recompute_logprobs=flag)
                    for flag in (True, False))
    real = full.response_mask.bool()
    assert torch.equal(full.response_ids, reused.response_ids)
    for name in ("ref_logprobs", "values", "pm_scores", "scores", "gen_logprobs"):
        assert torch.equal(getattr(full, name), getattr(reused, name)), name
    assert reused.recomputed.tolist() == [True] * 3 + [False] * 5
    # checked rows: the fresh forward's values; the others: the sampler's, bit for bit
    for name in ("logprobs", "entropy"):
        assert torch.equal(getattr(reused, name)[:3], getattr(full, name)[:3]), name
    assert torch.equal(reused.logprobs[3:], reused.gen_logprobs[3:])
    # and the sampler's log-probs and entropies agree with the fresh forward up to rounding
    torch.testing.assert_close(reused.logprobs[real], full.logprobs[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(reused.entropy[real], full.entropy[real], rtol=0, atol=1e-4)


def test_entropy_outside_autograd_changes_no_output(tiny):
    tok, policy, pm = tiny
    value = make_value_model(pm, keep_pm_head=True)
    inputs = random_batch(tok, (3, 5), (4, 2))[2:]
    with_grad = ActorCritic(policy, value)(*inputs, 0.8)
    without = ActorCritic(policy, value, entropy_grad=False)(*inputs, 0.8)
    assert with_grad[1].requires_grad and not without[1].requires_grad
    assert without[0].requires_grad and without[2].requires_grad     # log-probs and values train
    for a, b in zip(with_grad, without):
        assert torch.equal(a, b)
