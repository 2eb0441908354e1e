"""Golden test: the greedy continuation of a seeded tiny LLaMA is pinned, so any change to the model,
the KV cache or the sampler that moves a logit enough to flip an argmax shows up here as itself (the
equivalence tests compare paths with each other; this one compares today with yesterday). The pin
was recorded with torch 2.13 on CPU (fp32); a deliberate numerical change re-records it."""
import torch

from nanorlcd.sample import generate, generate_naive

PROMPTS = [[1, 17, 42, 5, 63], [1, 88, 3]]
PINNED = [[5, 61, 45, 50, 12, 77, 46, 10, 2, 81, 10, 2],
          [53, 81, 21, 45, 73, 15, 72, 21, 85, 42, 42, 42]]


def test_greedy_continuation_is_pinned(make_model):
    model = make_model(seed=1234)
    cached = generate(model, PROMPTS, 12, temperature=0.0, eos_id=[], pad_id=0)
    naive = generate_naive(model, PROMPTS, 12, temperature=0.0, eos_id=[], pad_id=0)
    assert cached.tokens == naive.tokens
    assert cached.tokens == PINNED, cached.tokens
    # greedy = the argmax of a full forward over prompt + continuation, position by position
    ids = torch.tensor([PROMPTS[0] + PINNED[0]])
    logits = model(ids)[0, len(PROMPTS[0]) - 1:-1]                     # (12, V)
    assert logits.argmax(-1).tolist() == PINNED[0]
