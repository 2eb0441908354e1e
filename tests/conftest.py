"""Shared pytest fixtures: a tiny LLaMA config and a tiny sentencepiece tokenizer.

Everything is built on the fly (CPU, offline, well under a second), so no test downloads anything.

- `tiny_config`: a 2-layer grouped-query LLaMAConfig (4 query heads sharing 2 key/value heads).
- `make_model(seed=0, **overrides)`: a LLaMA built from `tiny_config` (fields overridden) whose
  weights are redrawn at a scale where attention and RoPE visibly matter (the std-0.02 init gives
  near-uniform attention, under which a wrong rotation or mask would hardly change the logits).
- `tiny_tokenizer_path`: path (str) to a `tokenizer.model` trained here with LLaMA's settings:
  special ids unk 0 / bos 1 / eos 2 and no pad piece, byte fallback, identity normalisation (so
  "\\n\\n" and repeated spaces survive, as HH prompts need), split digits; any Unicode text
  round-trips exactly.

Run: `python -m pytest tests -q`
"""

import io
import random

import pytest

# Words for the synthetic HH-style corpus the tokenizer is trained on.
TOPICS = ["bake bread", "fix a bike", "plant tomatoes", "learn chess", "write a poem",
          "steal a car", "cheat on a test", "pick a lock", "train a dog", "paint a wall"]
REPLIES = ["Sure, here is how to {t}: start slowly and practise every day.",
           "I'm sorry, I can't help you {t}, but I can suggest something safer.",
           "Why would you want to {t}? Ask someone else.",
           "Great question! To {t}, gather your tools first, then follow the steps."]


def synthetic_corpus(n_lines=400, seed=0):
    """One-line dialogues "Human: ... Assistant: ..." (callers add the HH "\\n\\n" separators if
    they want them)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        topic = rng.choice(TOPICS)
        reply = rng.choice(REPLIES).format(t=topic)
        lines.append(f"Human: How do I {topic}? (question {i}) Assistant: {reply}")
    return lines


# The tiny model's config.json fields (head_dim 8 is derived: hidden_size / num_attention_heads).
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None,
            tie_word_embeddings=False)


@pytest.fixture
def tiny_config():
    """A 2-layer GQA LLaMAConfig small enough for naive reference loops (~25k parameters)."""
    from nanorlcd.model import LLaMAConfig
    return LLaMAConfig(**TINY)


@pytest.fixture
def make_model():
    """Factory: make_model(seed=0, **config_overrides) -> LLaMA in eval mode with seeded, O(1)-scale
    weights."""
    import torch

    from nanorlcd.model import LLaMA, LLaMAConfig

    def make(seed=0, **overrides):
        model = LLaMA(LLaMAConfig(**{**TINY, **overrides}))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * noise)       # RMSNorm gains near 1
                elif "embed_tokens" in name:
                    p.copy_(noise)                    # unit-scale token embeddings
                else:
                    p.copy_(0.2 * noise)              # projections: attention scores of order 1
        return model.eval()

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """Path (str) to a BPE `tokenizer.model`, vocab 512, unk 0 / bos 1 / eos 2, no pad, byte
    fallback."""
    import sentencepiece as spm
    model = io.BytesIO()
    # 1. the synthetic corpus with HH's "\n\n" turn separators
    hh = [line.replace("Human:", "\n\nHuman:").replace(" Assistant:", "\n\nAssistant:")
          for line in synthetic_corpus()]
    # 2. train in memory (deterministic: one thread, fixed corpus), with the normaliser and
    #    whitespace
    #    options of LLaMA's own tokenizer.model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(hh), model_writer=model, vocab_size=512,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2)
    # 3. write it where the LLaMA layout expects it: <dir>/tokenizer.model
    path = tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)


def pytest_collection_modifyitems(config, items):
    """Notebook executions run last: unit tests first, so a broken module shows up as itself."""
    items.sort(key=lambda item: item.get_closest_marker("notebook") is not None)


def pytest_configure(config):
    """One thread per test process: the CI machine has 2 cores, and torch's default of one thread
    per core made some tests 20x slower when two processes (pytest and a torchrun child) shared
    them."""
    import torch
    torch.set_num_threads(1)
