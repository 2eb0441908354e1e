"""Batched sampling from a LLaMA with a KV cache: the engine behind preference simulation, PPO
rollouts and evaluation.

What: `generate` continues left-padded token prompts; one prefill pass fills a preallocated
`KVCache`, then each step feeds only the newest token at `start_pos` (Meta's llama `generation.py`
semantics) and samples with temperature / top-k / top-p. Rows stop at their own EOS or stop string.
`generate_naive` runs the same loop but recomputes the whole sequence every step (nanoGPT's
`generate`): the reference the cache must match. Per token we return log p under
softmax(logits / T) *before* truncation: the quantity PPO's ratio uses (Huang et al., "The N
implementation details of RLHF with PPO"), and that distribution's entropy (so PPO may skip a
recompute). `chat` is the HH-RLHF helper: a dialogue ending in "\n\nAssistant:" in, the reply cut
at the next human turn out (nanorlcd.dialogue), as the RLCD reference does.
Simplified: no speculative decoding, no paged cache (finished rows keep their slot), no beam search.
Run: `python -m nanorlcd.sample --model out/toy/base --prompt "How do I bake bread?" --seed 0`
"""
import argparse
from dataclasses import dataclass

import torch

from nanorlcd.dialogue import HUMAN, as_prompt, cut_reply
from nanorlcd.model import KVCache
from nanorlcd.tokenizer import left_pad

# the name earlier code imports from here (nanorlcd.dialogue owns the format)
HUMAN_TURN = HUMAN


@dataclass
class Generation:
    """What `generate` returns; all tensors on the model's device, T_new = the number of decoding
    steps run."""
    # list[list[int]] new tokens per row, EOS kept; stop string: up to its last token
    tokens: list
    response_ids: torch.Tensor    # (B, T_new) long, right-padded with pad_id
    # (B, T_new) long, 1 on real new tokens (incl. EOS), 0 after the row finished
    response_mask: torch.Tensor
    # (B, T_new) float32, log p(token) under softmax(logits / T) before top-k/p; 0 on pads
    logprobs: torch.Tensor
    # (B,) bool, True if the row ended with EOS or a stop string (False: max_new_tokens)
    finished: torch.Tensor
    # (B, T_new) float32, entropy of softmax(logits / T) at each step; 0 on pads
    entropy: torch.Tensor = None


def filter_logits(logits, top_k=None, top_p=None):
    """Sets logits outside the sampling support to -inf: first the top-k largest (ties with the
    k-th kept, as in Hugging Face), then the nucleus: the smallest set of most likely tokens whose
    probability reaches top_p (Holtzman et al. 2020), computed on the top-k-renormalised
    distribution. Always keeps the argmax."""
    if top_k is not None and top_k < logits.size(-1):
        # (B, 1) k-th largest logit per row
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # (B, V), most likely first
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # a token is dropped once the mass of the tokens strictly before it already reaches p,
        # so the token that crosses p stays and the most likely token always stays
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p                  # (B, V) in sorted order
        drop = drop_sorted.scatter(-1, order, drop_sorted)         # (B, V) back in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None,
                with_entropy=False):
    """(B, V) next-token logits -> (tokens (B,), logprobs (B,)), + entropy (B,) if with_entropy.
    Shared by both decoding paths, so they consume the random generator identically.
    temperature=0 is greedy, and its log-probs and entropy are then at temperature 1."""
    logits = logits.float()
    if temperature != 0:
        logits = logits / temperature
    # log p of the full tempered distribution, what PPO recomputes (truncation is a sampling choice)
    logp_all = logits.log_softmax(-1)                                      # (B, V)
    probs_all = logp_all.exp()                                             # (B, V)
    if temperature == 0:
        tokens = logits.argmax(-1)                                         # (B,)
    else:
        # top-k / top-p renormalise over their support (zero probability outside it)
        probs = (probs_all if top_k is None and top_p is None
                 else filter_logits(logits, top_k, top_p).softmax(-1))    # (B, V)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)   # (B,)
    logprobs = logp_all.gather(-1, tokens[:, None]).squeeze(-1)            # (B,)
    if not with_entropy:
        return tokens, logprobs
    return tokens, logprobs, -(probs_all * logp_all).sum(-1)              # H = -sum p log p


def _check_inputs(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_strings,
                  tokenizer):
    """One-line ValueErrors for inputs that would otherwise give silent garbage."""
    cfg = model.config
    if len(prompts) == 0:
        raise ValueError("prompts: empty list (expected at least one list of token ids)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: got {max_new_tokens}, expected >= 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt (expected at least one token, e.g. BOS)")
        if len(p) > cfg.max_position_embeddings:
            raise ValueError(f"prompts[{i}]: {len(p)} tokens is longer than the model's context "
                             f"(max_position_embeddings={cfg.max_position_embeddings})")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}]: token id out of range [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"max_new_tokens: longest prompt ({longest}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's context "
                         f"(max_position_embeddings={cfg.max_position_embeddings})")
    if temperature < 0:
        raise ValueError(f"temperature: got {temperature}, expected >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: got {top_k}, expected >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: got {top_p}, expected 0 < top_p <= 1 or None")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings: a tokenizer is needed to decode the new tokens")


# not inference_mode: its tensors cannot be saved for backward, and PPO mixes ours into graphs
@torch.no_grad()
def _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, stop_strings,
              tokenizer, generator, pad_id, use_cache):
    """The decoding loop of `generate` (use_cache=True) and `generate_naive` (use_cache=False)."""
    _check_inputs(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_strings,
                  tokenizer)
    device = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    L = P + max_new_tokens                                             # final length of every row
    # 1. left-pad the prompts into preallocated (B, L) buffers that the loop fills column by column
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L), dtype=torch.long, device=device)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                    # (B, P) each, on the CPU
    ids[:, :P], mask[:, :P] = prompt_ids, prompt_mask
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    entropy = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    eos = model.config.eos_token_id if eos_id is None else eos_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos = torch.tensor(eos, dtype=torch.long, device=device)               # (E,) ids that end a row
    alive = torch.ones(B, dtype=torch.bool, device=device)              # (B,) rows still generating
    new_tokens = [[] for _ in range(B)]                           # host copy, only for stop strings
    # tokens to decode for the stop-string check: a (non-special) token is >= 1 byte, +1 for
    # sentencepiece dropping the leading space of the first decoded piece
    window = max((len(s.encode()) for s in stop_strings or []), default=0) + 1
    cache = (KVCache.empty(model.config, B, L, dtype=model.lm_head.weight.dtype, device=device)
             if use_cache else None)

    def next_logits(start, end):
        """Logits (B, V) of the token after column end-1. The cache needs only the new columns
        [start, end); the naive path recomputes [0, end). Only the last position goes through
        lm_head (keep=1)."""
        if use_cache:
            return model(ids[:, start:end], mask[:, :end], cache=cache, start_pos=start,
                         keep=1)[:, -1]
        return model(ids[:, :end], mask[:, :end], keep=1)[:, -1]

    # 2. prefill: the whole prompt in one pass (fills cache positions [0, P))
    logits = next_logits(0, P)
    for t in range(max_new_tokens):
        col = P + t                                                # column of the token sampled now
        # 3. sample every row (so both paths draw the same random numbers), then freeze the
        # finished ones
        tok, logp, ent = sample_next(logits, temperature, top_k, top_p, generator,
                                     with_entropy=True)
        tok = torch.where(alive, tok, pad_id)
        ids[:, col], mask[:, col] = tok, alive
        logprobs[:, t], entropy[:, t] = logp * alive, ent * alive
        # 4. a row stops at its own EOS (kept, mask 1) ...
        just_done = alive & torch.isin(tok, eos) if len(eos) else torch.zeros_like(alive)
        # ... or once the tail of its new tokens decodes to a text containing a stop string
        if stop_strings:
            for i, (tok_i, alive_i) in enumerate(zip(tok.tolist(), alive.tolist())):
                if alive_i:
                    new_tokens[i].append(tok_i)
                    tail = tokenizer.decode(new_tokens[i][-window:])
                    if any(s in tail for s in stop_strings):
                        just_done[i] = True
        alive &= ~just_done
        if t == max_new_tokens - 1 or not alive.any():
            break
        # 5. feed the sampled column; finished rows are fed a pad with mask 0 (the cache slot is
        # simply ignored)
        logits = next_logits(col, col + 1)

    n = t + 1                                                              # decoding steps run
    response_ids, response_mask = ids[:, P:P + n], mask[:, P:P + n]        # (B, n) the new columns
    tokens = [row[:k] for row, k in zip(response_ids.tolist(), response_mask.sum(-1).tolist())]
    return Generation(tokens, response_ids, response_mask, logprobs[:, :n], ~alive, entropy[:, :n])


def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             eos_id=None, stop_strings=None, tokenizer=None, generator=None, pad_id=0):
    """Samples up to max_new_tokens after each token prompt, with a KV cache. eos_id: an id or a
    list of ids (default: model.config.eos_token_id; [] disables EOS); stop_strings need the
    tokenizer (only each row's new tokens are searched); generator: a torch.Generator on the
    model's device, for reproducible sampling. `model` is the unwrapped LLaMA (not a DDP wrapper).
    Returns a `Generation`."""
    return _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id,
                     stop_strings, tokenizer, generator, pad_id, use_cache=True)


def generate_naive(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                   eos_id=None, stop_strings=None, tokenizer=None, generator=None, pad_id=0):
    """`generate` without a cache: the full sequence is recomputed every step (O(T^2) tokens
    processed). The reference that tests and bench/bench_sample.py compare the cached path
    against."""
    return _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id,
                     stop_strings, tokenizer, generator, pad_id, use_cache=False)


def chat(model, tokenizer, dialogues, max_new_tokens=256, **sampling_kwargs):
    """HH-format dialogues ending in "\\n\\nAssistant:" -> the assistant's replies: generation
    stops at the next "\\n\\nHuman:" (or EOS), the text is cut there and stripped. Extra keyword
    arguments go to `generate`."""
    prompts = [tokenizer.encode(d, bos=True) for d in dialogues]
    stop = list(sampling_kwargs.pop("stop_strings", None) or []) + [HUMAN]
    out = generate(model, prompts, max_new_tokens, stop_strings=stop, tokenizer=tokenizer,
                   **sampling_kwargs)
    return [cut_reply(tokenizer.decode(t)) for t in out.tokens]


def main(argv=None):
    """Command line: print the reply of a LLaMA directory (base model or trained policy) to one
    prompt."""
    from nanorlcd.model import LLaMA
    from nanorlcd.tokenizer import Tokenizer
    parser = argparse.ArgumentParser(
        description="Talk to a LLaMA directory (HF layout with tokenizer.model).")
    parser.add_argument("--model", required=True,
                        help="HF LLaMA directory (config.json, *.safetensors)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model or its directory (default: --model)")
    parser.add_argument("--prompt", required=True,
                        help='a question, or a full "\\n\\nHuman: ...\\n\\nAssistant:" dialogue')
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="reply length cap in tokens")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling mass, e.g. 0.9 (paper's eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model = LLaMA.from_pretrained(args.model, device=args.device)
    tokenizer = Tokenizer(args.tokenizer or args.model)
    # a bare question becomes a one-turn HH dialogue; a prompt that already has "Assistant:" is
    # used as is
    dialogue = as_prompt(args.prompt)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    # cap the reply so prompt + reply fit the context
    n_prompt = len(tokenizer.encode(dialogue))
    max_new = max(1, min(args.max_new_tokens, model.config.max_position_embeddings - n_prompt))
    reply, = chat(model, tokenizer, [dialogue], max_new_tokens=max_new,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  generator=generator, pad_id=tokenizer.pad_id)
    print(reply)


if __name__ == "__main__":
    main()
