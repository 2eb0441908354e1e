"""Shared pytest fixtures: a tiny LLaMA config and a tiny sentencepiece tokenizer.

Everything is built on the fly (CPU, offline, well under a second), so no test downloads anything.

- `tiny_config`: a 2-layer grouped-query LLaMAConfig (4 query heads sharing 2 key/value heads).
- `tiny_tokenizer_path`: path (str) to a `tokenizer.model` trained here with LLaMA's special ids
  (unk 0, bos 1, eos 2, no pad piece) and byte fallback, so any Unicode text round-trips.

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
    """Dialogues in the HH format ("\\n\\nHuman: ...\\n\\nAssistant: ..."), one per line."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        topic = rng.choice(TOPICS)
        reply = rng.choice(REPLIES).format(t=topic)
        lines.append(f"Human: How do I {topic}? (question {i}) Assistant: {reply}")
    return lines


@pytest.fixture
def tiny_config():
    """A 2-layer GQA LLaMAConfig small enough for naive reference loops (~20k parameters)."""
    from nanorlcd.model import LLaMAConfig
    return LLaMAConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                       tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """Path (str) to a BPE `tokenizer.model`, vocab 320, unk 0 / bos 1 / eos 2, no pad, byte fallback."""
    import sentencepiece as spm
    model = io.BytesIO()
    # 1. train on the synthetic corpus in memory (deterministic: one thread, fixed corpus)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_corpus()), model_writer=model, vocab_size=320,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    # 2. write it where the LLaMA layout expects it: <dir>/tokenizer.model
    path = tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)
