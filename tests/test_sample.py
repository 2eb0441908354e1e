"""Tests of nanorlcd/sample.py: the KV-cached sampler against independent computations.

- cached decoding == the no-cache loop (tokens and log-probs), greedy and seeded sampling, ragged batch;
- greedy decoding == a plain one-row loop over `model(ids)` (so left padding and batch mates change nothing);
- log-probs and entropies == one full forward over prompt + response at logits / T (what ppo.py
  recomputes);
- EOS and stop strings end each row on its own; pads and masks after the end;
- top-k / top-p keep exactly the intended support (hand distribution);
- seeding, bad inputs, `chat` and the command line.
Run: `python -m pytest tests/test_sample.py -q` (a few seconds on CPU).
"""
import io
import pathlib
import subprocess
import sys

import pytest
import torch

from nanorlcd.model import LLaMA, LLaMAConfig
from nanorlcd.sample import HUMAN_TURN, chat, filter_logits, generate, generate_naive, sample_next
from nanorlcd.tokenizer import Tokenizer, left_pad

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 40, 41]]   # ragged on purpose


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return LLaMA(tiny_config)


@pytest.fixture(scope="module")
def hh_tokenizer(tmp_path_factory):
    """A tokenizer that keeps HH newlines (identity normalisation) and has no byte pieces, so random models
    emit readable text. conftest's tiny tokenizer folds "\\n" into spaces, which would hide "\\n\\nHuman:"."""
    import sentencepiece as spm
    from conftest import synthetic_corpus
    corpus = [line.replace("Human:", "\n\nHuman:").replace(" Assistant:", "\n\nAssistant:")
              for line in synthetic_corpus()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=200, model_type="bpe", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    path = tmp_path_factory.mktemp("hh_tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return Tokenizer(str(path))


def hh_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return LLaMA(LLaMAConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128))


def greedy_reference(model, prompt, max_new_tokens, eos_ids):
    """The plainest greedy loop: one row, no padding, no mask, no cache, full forward each step."""
    x, out, logps = list(prompt), [], []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([x]))[0, -1]                      # (V,) next-token logits
        tok = int(logits.argmax())
        out.append(tok)
        logps.append(float(logits.log_softmax(-1)[tok]))
        x.append(tok)
        if tok in eos_ids:
            break
    return out, logps


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=1.0),
                                    dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_cached_equals_naive(model, kwargs):
    a = generate(model, PROMPTS, 24, generator=torch.Generator().manual_seed(3), **kwargs)
    b = generate_naive(model, PROMPTS, 24, generator=torch.Generator().manual_seed(3), **kwargs)
    assert a.tokens == b.tokens
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(a.finished, b.finished)
    assert not a.logprobs.requires_grad and torch.is_grad_enabled()      # no_grad stays inside generate


def test_cached_equals_naive_through_linear_fast_path(make_model):
    """A model wide enough (MLP and LM head weights of 2^18 elements) that decoding steps, a few rows each, take
    model.Linear's CPU fast path while the naive path's long recomputations do not: both must still agree."""
    model = make_model(vocab_size=1024, hidden_size=256, intermediate_size=1024, max_position_embeddings=64)
    assert model.lm_head.weight.numel() >= 2**18 and model.model.layers[0].mlp.up_proj.weight.numel() >= 2**18
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=50)):
        a = generate(model, PROMPTS, 20, generator=torch.Generator().manual_seed(1), **kwargs)
        b = generate_naive(model, PROMPTS, 20, generator=torch.Generator().manual_seed(1), **kwargs)
        assert a.tokens == b.tokens
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_greedy_equals_one_row_loop_whatever_the_batch(model):
    """Left padding and batch mates must not change a row: each row of several batches equals the row alone."""
    refs = [greedy_reference(model, prompt, 20, [model.config.eos_token_id]) for prompt in PROMPTS]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1], [2, 1]):
        out = generate(model, [PROMPTS[j] for j in order], 20, temperature=0)
        for i, j in enumerate(order):
            ref_tokens, ref_logps = refs[j]
            assert out.tokens[i] == ref_tokens
            torch.testing.assert_close(out.logprobs[i, :len(ref_tokens)], torch.tensor(ref_logps),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.3)])
def test_logprobs_equal_full_forward_recompute(model, kwargs):
    """What ppo.py does: one forward over [left-padded prompt | response], log_softmax(logits / T) at the
    response tokens (T = 1 for greedy), masked after each row's end."""
    out = generate(model, PROMPTS, 16, generator=torch.Generator().manual_seed(0), **kwargs)
    prompt_ids, prompt_mask = left_pad(PROMPTS, 0)
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, out.response_ids], 1)                      # (B, P + T_new)
    mask = torch.cat([prompt_mask, out.response_mask], 1)
    T = kwargs["temperature"] or 1.0
    with torch.no_grad():
        logits = model(ids, mask)[:, P - 1:-1] / T                          # (B, T_new, V): position t predicts t+1
    logp = logits.log_softmax(-1).gather(-1, out.response_ids[..., None]).squeeze(-1) * out.response_mask
    torch.testing.assert_close(out.logprobs, logp, atol=1e-5, rtol=0)
    # the entropies, what PPO logs when it reuses the sampler's log-probs: -sum p log p, 0 on pads
    p_log_p = logits.softmax(-1) * logits.log_softmax(-1)                  # (B, T_new, V)
    torch.testing.assert_close(out.entropy, -p_log_p.sum(-1) * out.response_mask, atol=1e-4, rtol=0)


def test_eos_stops_each_row_and_pads_after(model):
    ref = generate(model, PROMPTS, 20, temperature=0, eos_id=[])           # no EOS: every row runs 20 tokens
    assert all(len(t) == 20 for t in ref.tokens) and not ref.finished.any()
    # make the 4th greedy token of row 0 the EOS: row 0 must stop there; other rows stop at their first such token
    eos = ref.tokens[0][3]
    pad = 96
    out = generate(model, PROMPTS, 20, temperature=0, eos_id=eos, pad_id=pad)
    for i, row in enumerate(ref.tokens):
        n = row.index(eos) + 1 if eos in row else 20
        assert out.tokens[i] == row[:n]
        assert out.finished[i].item() == (eos in row)
        assert out.response_mask[i].tolist() == [1] * n + [0] * (out.response_mask.shape[1] - n)
        assert (out.response_ids[i, n:] == pad).all() and (out.logprobs[i, n:] == 0).all()
        torch.testing.assert_close(out.logprobs[i, :n], ref.logprobs[i, :n], atol=1e-5, rtol=0)
    assert out.tokens[0][-1] == eos and len(out.tokens[0]) <= 4
    # an id list works like an int, the loop ends as soon as every row is done, the default is config's EOS
    row = ref.tokens[0]
    n = min(row.index(e) + 1 for e in (eos, 95) if e in row)
    one = generate(model, PROMPTS[:1], 20, temperature=0, eos_id=[eos, 95])
    assert one.tokens[0] == row[:n] and one.response_ids.shape == (1, n)
    model.config.eos_token_id = [eos, 95]
    assert generate(model, PROMPTS[:1], 20, temperature=0).tokens == one.tokens


def test_stop_strings(hh_tokenizer):
    tok = hh_tokenizer
    model = hh_model(tok)
    prompts = [tok.encode(t) for t in ("\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: Hi")]
    ref = generate(model, prompts, 30, temperature=0, eos_id=[])
    # stop string = the last 5 characters of row 0's text after 6 tokens; it must first appear at some step j
    text = tok.decode(ref.tokens[0][:6])
    stop = text[-5:]
    j = next(j for j in range(1, 31) if stop in tok.decode(ref.tokens[0][:j]))
    out = generate(model, prompts, 30, temperature=0, eos_id=[], stop_strings=[stop, "zzzz-never"], tokenizer=tok)
    assert out.tokens[0] == ref.tokens[0][:j] and out.finished[0]
    assert out.response_mask[0].sum() == j
    # row 1 stops only where the string appears in its own new text (never because of the prompt or row 0)
    k = next((k for k in range(1, 31) if stop in tok.decode(ref.tokens[1][:k])), None)
    assert out.tokens[1] == ref.tokens[1][:k or 30] and out.finished[1].item() == (k is not None)


def test_filter_logits_support():
    # a hand distribution, shuffled so that the support is not simply a prefix
    probs = torch.tensor([0.0625, 0.5, 0.03125, 0.25, 0.125, 0.03125])
    logits = probs.log()[None]                                              # (1, 6)

    def support(**kw):
        return set(torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist())

    assert support(top_k=1) == {1}
    assert support(top_k=3) == {1, 3, 4}
    assert support(top_k=6) == support() == set(range(6))
    assert support(top_p=0.5) == {1}                   # the argmax alone already has mass 0.5
    assert support(top_p=0.51) == {1, 3}
    assert support(top_p=0.75) == {1, 3}
    assert support(top_p=0.76) == {1, 3, 4}
    assert support(top_p=1.0) == set(range(6))
    # top-p runs on the top-k-renormalised distribution: top-3 = (.5, .25, .125) / .875 -> .571, .286, .143
    assert support(top_k=3, top_p=0.8) == {1, 3}
    assert support(top_k=3, top_p=0.86) == {1, 3, 4}
    # the kept tokens keep their relative probabilities
    kept = filter_logits(logits, top_k=3).softmax(-1)[0]
    torch.testing.assert_close(kept, torch.tensor([0, 0.5, 0, 0.25, 0.125, 0]) / 0.875)
    # ties with the k-th logit are kept (Hugging Face's convention)
    assert torch.isfinite(filter_logits(torch.tensor([[1.0, 1.0, 0.0]]), top_k=1)).tolist() == [[True, True, False]]


def test_sample_next_draws_only_from_the_support():
    probs = torch.tensor([0.0625, 0.5, 0.03125, 0.25, 0.125, 0.03125])
    logits = probs.log().expand(4000, 6)                                    # (4000, 6) identical rows
    g = torch.Generator().manual_seed(0)
    tokens, logp = sample_next(logits, 1.0, top_k=3, top_p=0.8, generator=g)
    assert set(tokens.tolist()) == {1, 3}
    assert abs((tokens == 1).float().mean().item() - 2 / 3) < 0.03           # .5 / (.5 + .25)
    # log-probs are those of the untruncated tempered distribution
    torch.testing.assert_close(logp, probs.log()[tokens])
    tokens, logp = sample_next(logits[:2], 0.5, generator=g)
    torch.testing.assert_close(logp, (logits[:2] / 0.5).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1))
    # the entropy of the tempered distribution, by hand: softmax(2 log probs) = probs^2 / sum probs^2
    _, _, entropy = sample_next(logits[:2], 0.5, generator=g, with_entropy=True)
    tempered = probs ** 2 / (probs ** 2).sum()
    torch.testing.assert_close(entropy, -(tempered * tempered.log()).sum().expand(2))


def test_seeded_sampling_is_reproducible(model):
    def run(seed):
        return generate(model, PROMPTS, 16, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert a.tokens == b.tokens and torch.equal(a.logprobs, b.logprobs)
    assert a.tokens != c.tokens


@pytest.mark.parametrize("prompts, max_new, kwargs, field", [
    ([], 4, {}, "prompts"),
    ([[1, 2], []], 4, {}, "prompts[1]"),
    ([[1] * 65], 1, {}, "prompts[0]"),
    ([[1] * 60, [1]], 5, {}, "max_new_tokens"),
    ([[1, 200]], 4, {}, "prompts[0]"),
    ([[1]], 0, {}, "max_new_tokens"),
    ([[1]], 4, dict(temperature=-1), "temperature"),
    ([[1]], 4, dict(top_p=0.0), "top_p"),
    ([[1]], 4, dict(top_k=0), "top_k"),
    ([[1]], 4, dict(stop_strings=["x"]), "stop_strings"),
])
def test_bad_input_is_a_one_line_error(model, prompts, max_new, kwargs, field):
    with pytest.raises(ValueError) as e:
        generate(model, prompts, max_new, **kwargs)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def bigram_llama(tokenizer, chain):
    """A LLaMA that is a bigram table: with o_proj and down_proj zeroed every block adds nothing, so the final
    hidden state is the (normed) one-hot embedding of the current token and lm_head[next, cur] = 1 picks
    `chain[cur]` greedily; every other token is followed by EOS."""
    V = tokenizer.vocab_size
    model = LLaMA(LLaMAConfig(vocab_size=V, hidden_size=V, intermediate_size=8, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=128))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_id] = 1.0
        for cur, nxt in chain.items():
            model.lm_head.weight[:, cur] = 0.0
            model.lm_head.weight[nxt, cur] = 1.0
    return model


def scripted_chat_model(tok):
    """A bigram LLaMA whose reply to any "...Assistant:" is " Sure bake\\n\\nHuman: Sure bake\\n\\nHuman: ..."."""
    ids = {piece: tok.sp.piece_to_id(piece) for piece in (":", "▁Sure", "▁bake", "\n\n", "Human")}
    assert 0 not in ids.values()                                             # all pieces exist in the vocabulary
    cycle = [":", "▁Sure", "▁bake", "\n\n", "Human"]
    return bigram_llama(tok, {ids[a]: ids[b] for a, b in zip(cycle, cycle[1:] + cycle[:1])})


def test_chat_cuts_at_next_human_turn(hh_tokenizer):
    tok = hh_tokenizer
    model = scripted_chat_model(tok)
    dialogues = ["\n\nHuman: How do I bake bread?\n\nAssistant:",
                 "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"]
    assert chat(model, tok, dialogues, max_new_tokens=40, temperature=0) == ["Sure bake", "Sure bake"]
    # generation stopped at the stop string, not at max_new_tokens: " Sure bake \n\n Human :" is 5 tokens
    out = generate(model, [tok.encode(dialogues[0])], 40, temperature=0, stop_strings=[HUMAN_TURN], tokenizer=tok)
    assert len(out.tokens[0]) == 5 and out.finished.all()


def test_command_line_prints_the_reply(hh_tokenizer, tmp_path):
    model = scripted_chat_model(hh_tokenizer)
    model.save_pretrained(tmp_path)
    hh_tokenizer.save(tmp_path)
    cmd = [sys.executable, "-m", "nanorlcd.sample", "--model", str(tmp_path), "--prompt", "How do I bake bread?",
           "--max-new-tokens", "20", "--temperature", "0", "--device", "cpu"]
    repo = pathlib.Path(__file__).resolve().parents[1]                     # so `-m nanorlcd.sample` resolves
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "Sure bake"
