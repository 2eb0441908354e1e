"""Preference-data simulation: RLCD and its baselines RLAIF and RLCD-Rescore (paper Sec. 3, Sec. 4).

What (reference: facebookresearch/RLCD `scripts/simulate_preference_data.py` and
`scripts/consolidate_preference_data.py`):
  rlcd          p+ / p- = the prompt with an affix pair in its assistant tags
                (`contrastive_prompts`); o+ ~ LM(p+), o- ~ LM(p-); o+ is preferred with
                label_prob 1.0. No scoring step.
  rlaif         o1, o2 ~ LM(p); the same LM reads "...(A) o1 ...(B) o2 ... The answer is: (" with a
                random instruction; P(B better) = softmax(logit_A, logit_B)[1] (`score_ab`).
  rlcd_rescore  o+ / o- shuffled into A / B and scored like rlaif, with the pair's instruction.
Replies are cut and filtered by the reference's rule (`postprocess`). Simplified: rejected outputs
are re-sampled in the next generate call of their batch; files, resume and rank shards: data.py.
Run: `python train.py --stage simulate --method rlcd --task harmless` (toy preset), or
`from nanorlcd.rlcd import RLCDConfig, simulate`.
"""
import hashlib
import json
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nanorlcd import dist
from nanorlcd.data import (acquire_lock, dropped_path, finish, lock_path, read_records,
                           release_lock, shard_path, start_run, write_dropped, write_records,
                           write_sft_data)
from nanorlcd.data import merge_shards  # noqa: F401  (re-exported: older code imports it from here)
from nanorlcd.dialogue import ASSISTANT, HUMAN
from nanorlcd.prompts import (HARMLESS_NEGATIVE_AFFIXES, HARMLESS_POSITIVE_AFFIXES,
                              HARMLESS_RLAIF_INSTRUCTIONS, HELPFUL_NEGATIVE_AFFIXES,
                              HELPFUL_POSITIVE_AFFIXES, HELPFUL_RLAIF_INSTRUCTIONS,
                              RLAIF_SCORING_TEMPLATE, apply_affixes)
from nanorlcd.sample import generate
from nanorlcd.tokenizer import left_pad

# Outline task: nanorlcd's own pairs and instructions (index i belongs together), aimed at the
# paper's three outline qualities: interesting, well-structured, relevant to the premise.
OUTLINE_POSITIVE_AFFIXES = ["(interesting, creative outline)",
                            "(well-structured, coherent outline)",
                            "(outline relevant to the premise)"]
OUTLINE_NEGATIVE_AFFIXES = ["(boring, unoriginal outline)", "(disorganized, incoherent outline)",
                            "(outline unrelated to the premise)"]
OUTLINE_RLAIF_INSTRUCTIONS = [
    "Please choose the outline that is more interesting and creative.",
    "Please choose the outline that is better structured and more coherent.",
    "Please choose the outline that is more relevant to the premise."]

# task -> (positive affixes, negative affixes, RLAIF instructions)
TASKS = {
    "harmless": (HARMLESS_POSITIVE_AFFIXES, HARMLESS_NEGATIVE_AFFIXES, HARMLESS_RLAIF_INSTRUCTIONS),
    "helpful": (HELPFUL_POSITIVE_AFFIXES, HELPFUL_NEGATIVE_AFFIXES, HELPFUL_RLAIF_INSTRUCTIONS),
    "outline": (OUTLINE_POSITIVE_AFFIXES, OUTLINE_NEGATIVE_AFFIXES, OUTLINE_RLAIF_INSTRUCTIONS),
}
METHODS = ("rlcd", "rlaif", "rlcd_rescore")
# The reference's filter cuts at the bare word "Human", not at the full turn tag dialogue.HUMAN
# ("\n\nHuman:"): a reply that runs into "Human" mid-line is rejected rather than kept.
HUMAN_WORD = HUMAN.strip().rstrip(":")           # "Human"
ASSISTANT_WORD = ASSISTANT.strip()               # "Assistant:"
# The reference's bad_words while sampling (`generate_result` in simulate_preference_data.py).
# It masks them with HF's bad_words_ids; we reject an output that contains one and re-sample it.
BANNED_STRINGS = ("\\", "\\\\", "`", "```")


@dataclass
class RLCDConfig:
    method: str = "rlcd"          # rlcd | rlaif | rlcd_rescore
    task: str = "harmless"        # harmless | helpful | outline: picks affix pairs and instructions
    batch_size: int = 8           # examples per generate call (2 rows each); also the scoring batch
    max_new_tokens: int = 300     # reply length cap (paper: 300); must leave room for the prompt
    temperature: float = 1.0      # sampling temperature (paper: 1, no top-k / top-p)
    max_retries: int = 5          # attempts per output; one rejected that often drops its example
    banned_strings: tuple = BANNED_STRINGS  # an output containing one is rejected and re-sampled
    seed: int = 0                 # with the example id / batch index, seeds every random choice
    # RLAIF / RLCD-Rescore: which two vocabulary ids are "A" and "B" (`ab_token_ids`):
    #   "project"   the tokens that "(A" / "(B" add after the scoring prompt's final "(" (for
    #               LLaMA the bare pieces "A" / "B": what the model would actually write there)
    #   "reference" the last token of encode("A") / encode("B"), as the RLCD reference does (for
    #               LLaMA the word-initial pieces "▁A" / "▁B"): the baseline as the paper ran it
    ab_tokens: str = "project"


AB_TOKEN_MODES = ("project", "reference")


def contrastive_prompts(prompt, task, pair_index):
    """(p+, p-) for a prompt ending in "\\n\\nAssistant:" (paper Sec. 3): p+ puts the positive affix
    on the final assistant tag and the negative one on every earlier tag; p- is the mirror image."""
    if task not in TASKS:
        raise ValueError(f"task: unknown '{task}' (expected one of {', '.join(TASKS)})")
    positive, negative, _ = TASKS[task]
    if not 0 <= pair_index < len(positive):
        raise ValueError(f"pair_index: {pair_index} out of range for task '{task}' "
                         f"({len(positive)} pairs)")
    pos, neg = positive[pair_index], negative[pair_index]
    return apply_affixes(prompt, pos, neg), apply_affixes(prompt, neg, pos)


def postprocess(text, ended_with_eos=False, banned_strings=BANNED_STRINGS):
    """A sampled continuation -> the reply, or None to re-sample (the reference's
    `process_filter_result`). Rule table, applied in order:
      1. 'Human' in text      -> cut at its first occurrence; the cut must contain a newline (else
                                 None: the text ran into 'Human' mid-line), and is cut again at its
                                 last newline (drops the "\\n\\n" before "Human:" and any
                                 unfinished last line)
         no 'Human', EOS end  -> the whole text (EOS closed the dialogue: our toy model ends
                                 dialogues with EOS; the reference requires 'Human')
         no 'Human', no EOS   -> None (unterminated: max_new_tokens ran out)
      2. 'Assistant:' remains -> keep only what follows its first occurrence (a stray early tag)
      3. empty after strip, or contains a banned string -> None
    dialogue.cut_reply is not used: it keeps a reply that runs into "Human" mid-line, which the
    reference rejects, and changing the filter would change the simulated data.
    """
    # 1. find the end of the reply: the next human turn, or EOS
    if HUMAN_WORD in text:
        text = text[:text.index(HUMAN_WORD)]
        if "\n" not in text:
            return None
        text = text[:text.rindex("\n")]
    elif not ended_with_eos:
        return None
    text = text.strip()
    # 2. a reply that starts with (or soon repeats) an assistant tag keeps what follows it
    if ASSISTANT_WORD in text:
        text = text[text.index(ASSISTANT_WORD) + len(ASSISTANT_WORD):].strip()
    # 3. reject empty replies and banned strings (the reference masks these while sampling)
    if not text or any(b in text for b in banned_strings):
        return None
    return text


def scoring_prompt(prompt, instruction, response_a, response_b):
    """The paper's RLAIF scoring prompt; every field is .strip()ped as in the reference."""
    return RLAIF_SCORING_TEMPLATE.format(prompt=prompt.strip(), instruction=instruction.strip(),
                                         response_a=response_a.strip(),
                                         response_b=response_b.strip())


def ab_token_ids(tokenizer, mode="project"):
    """Ids (a, b) of the answer letters whose logits RLAIF compares after the final "(".

    mode "reference": the last token of encode("A") / encode("B"), as the RLCD reference does.
    LLaMA's tokenizer adds a dummy-prefix space, so these are the word-initial pieces "▁A" / "▁B".
    mode "project" (default): the one token that "A" / "B" adds to "The answer is: (", i.e. what the
    model would actually write next. For LLaMA that is the bare piece "A" / "B": "(A" has no space
    before "A", so "▁A" is a token the model almost never emits there, and its logit says less about
    its judgement. If a letter merges with "(" or splits into several pieces there is no single next
    token, and we fail."""
    if mode == "reference":
        ids = [tokenizer.encode(letter, bos=False)[-1] for letter in "AB"]
        ending = "encode('A') / encode('B')"
    elif mode == "project":
        # the template's last line, "The answer is: ("
        ending = RLAIF_SCORING_TEMPLATE[RLAIF_SCORING_TEMPLATE.rindex("\n") + 1:]
        base = tokenizer.encode(ending, bos=False)
        ids = []
        for letter in "AB":
            full = tokenizer.encode(ending + letter, bos=False)
            if full[:-1] != base or tokenizer.decode(full[-1:]).strip() != letter:
                raise ValueError(f"tokenizer: '{letter}' after {ending!r} is not one token of its "
                                 f"own ({base} -> {full}); RLAIF scoring needs single A/B tokens "
                                 "(or RLCDConfig.ab_tokens='reference')")
            ids.append(full[-1])
    else:
        raise ValueError(f"RLCDConfig.ab_tokens: unknown '{mode}' "
                         f"(expected one of {AB_TOKEN_MODES})")
    if ids[0] == ids[1]:
        raise ValueError(f"tokenizer: 'A' and 'B' map to the same id {ids[0]} ({mode}: {ending!r})")
    return tuple(ids)


@torch.no_grad()
def score_ab(model, tokenizer, texts, ab_tokens="project"):
    """Scoring prompts -> P(B better) per prompt, (N,): softmax over the next-token logits of A and
    B at the last position (paper Sec. 4, RLAIF); ab_tokens picks the two ids (`ab_token_ids`).
    A prompt longer than the context keeps BOS + its last tokens (rare at LLaMA-7B's 2048)."""
    a_id, b_id = ab_token_ids(tokenizer, ab_tokens)
    max_len = model.config.max_position_embeddings
    # 1. encode; an over-long prompt keeps BOS + its last tokens (the options and the question)
    rows = [tokenizer.encode(t, bos=True) for t in texts]
    rows = [r if len(r) <= max_len else r[:1] + r[len(r) - max_len + 1:] for r in rows]
    ids, mask = (x.to(model.lm_head.weight.device) for x in left_pad(rows, tokenizer.pad_id))
    # 2. one forward through the root; left padding puts every row's last token in the last column
    logits = model(ids, mask, keep=1)[:, -1].float()     # (N, V) only the last position
    # 3. two-way softmax over the A and B logits
    return logits[:, [a_id, b_id]].softmax(-1)[:, 1]     # (N,) P(B)


def _seed(*parts):
    """A 63-bit seed from a tuple of ints (sha512 of its string form: stable across platforms)."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def plan_example(cfg, prompt, idx):
    """The per-example random choices, from a generator seeded by (seed, id): the generation prompts
    (two), the affix pair index (rlcd, rlcd_rescore), the scoring instruction index and whether A/B
    are swapped."""
    rng = random.Random(_seed(cfg.seed, idx))
    positive, _, instructions = TASKS[cfg.task]
    plan = {"affix_index": None, "pos_prompt": None, "neg_prompt": None, "instruction": None,
            "swap": False}
    if cfg.method == "rlaif":
        # o1, o2 i.i.d. from the plain prompt; a random instruction
        plan.update(gen_prompts=(prompt, prompt), instruction=rng.randrange(len(instructions)))
        return plan
    # one affix pair per example, shared by p+ and p-
    k = rng.randrange(len(positive))
    p_pos, p_neg = contrastive_prompts(prompt, cfg.task, k)
    plan.update(gen_prompts=(p_pos, p_neg), affix_index=k, pos_prompt=p_pos, neg_prompt=p_neg)
    if cfg.method == "rlcd_rescore":
        # the instruction matching the pair; o+ goes to A or B at random
        plan.update(instruction=k, swap=rng.random() < 0.5)
    return plan


def _sample_batch(cfg, model, tokenizer, plans, batch_index):
    """Two outputs per example, re-sampling rejected ones -> (outputs, dropped, n_resampled):
    outputs[j] is [o_0, o_1] or None, dropped maps j -> "too_long" | "rejected"."""
    max_len = model.config.max_position_embeddings
    device = model.lm_head.weight.device
    # 1. encode both prompts of every example: rows 2j, 2j+1 (p+ and p- of a pair sit side by side)
    ids = [[tokenizer.encode(p, bos=True) for p in plan["gen_prompts"]] for plan in plans]
    outputs, dropped, pending, n_resampled = [[None, None] for _ in plans], {}, [], 0
    for j, pair in enumerate(ids):
        if max(len(r) for r in pair) + cfg.max_new_tokens > max_len:
            dropped[j] = "too_long"
        else:
            pending += [(j, 0), (j, 1)]
    for attempt in range(cfg.max_retries):
        if not pending:
            break
        # 2. one generate call for every pending output; stopping at "Human" is lossless, since
        #    postprocess cuts the reply there anyway
        seed = _seed(cfg.seed, batch_index, attempt)
        generator = torch.Generator(device=device).manual_seed(seed)
        out = generate(model, [ids[j][s] for j, s in pending], cfg.max_new_tokens,
                       temperature=cfg.temperature, eos_id=tokenizer.eos_id,
                       stop_strings=[HUMAN_WORD], tokenizer=tokenizer, generator=generator,
                       pad_id=tokenizer.pad_id)
        # 3. post-process; rejected outputs are re-sampled in the next attempt
        retry = []
        for (j, s), tokens in zip(pending, out.tokens):
            ended = len(tokens) > 0 and tokens[-1] == tokenizer.eos_id
            text = postprocess(tokenizer.decode(tokens), ended, cfg.banned_strings)
            if text is None:
                retry.append((j, s))
            else:
                outputs[j][s] = text
        n_resampled += len(retry)
        pending = retry
    # 4. an output still rejected after max_retries attempts drops its whole example
    dropped.update({j: "rejected" for j, _ in pending})
    return [None if j in dropped else o for j, o in enumerate(outputs)], dropped, n_resampled


def _make_records(cfg, model, tokenizer, prompts, ids, plans, outputs):
    """Finished outputs -> preference records (rlaif / rlcd_rescore score all A/B pairs at once).
    `chosen` is the output the labeller prefers and `label_prob` its probability of being better:
    rlcd -> o+ with 1.0; rlaif / rlcd_rescore -> A if P(B) <= 0.5 else B, label_prob = max(P(A),
    P(B)), as the reference's consolidation turns its A/B logits into a preference. The PM's
    Bradley-Terry loss with soft target label_prob is the same under either order."""
    done = [j for j, o in enumerate(outputs) if o is not None]
    p_b = {}
    if cfg.method != "rlcd" and done:
        # A/B: rlaif (o1, o2); rlcd_rescore (o+, o-) or swapped
        _, _, instructions = TASKS[cfg.task]
        ab = {j: outputs[j][::-1] if plans[j]["swap"] else outputs[j] for j in done}
        texts = [scoring_prompt(prompts[ids[j]], instructions[plans[j]["instruction"]], *ab[j])
                 for j in done]
        p_b = dict(zip(done, score_ab(model, tokenizer, texts, cfg.ab_tokens).tolist()))
    records = []
    for j in done:
        if cfg.method == "rlcd":
            chosen, rejected, label_prob = outputs[j][0], outputs[j][1], 1.0
        else:
            # the labeller's pick is `chosen`; a tie (P(B) = 0.5) goes to A
            (a, b), p = ab[j], p_b[j]
            chosen, rejected, label_prob = (b, a, p) if p > 0.5 else (a, b, 1.0 - p)
        records.append({"id": ids[j], "task": cfg.task, "method": cfg.method,
                        "prompt": prompts[ids[j]], "chosen": chosen, "rejected": rejected,
                        "pos_prompt": plans[j]["pos_prompt"], "neg_prompt": plans[j]["neg_prompt"],
                        "affix_index": plans[j]["affix_index"], "label_prob": label_prob})
    return records


def run_settings(cfg, prompts, model):
    """What a resumed run must share with the interrupted one: every setting that changes a record,
    the prompt list (count and sha256) and a fingerprint of the model (its config and a checksum of
    the first entries of every weight: a cheap guard against a retrained base, not a full hash)."""
    with torch.no_grad():
        checksum = sum(p.detach().flatten()[:64].double().sum().item() for p in model.parameters())
    return {"method": cfg.method, "task": cfg.task, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "max_retries": cfg.max_retries, "banned_strings": list(cfg.banned_strings),
            "ab_tokens": cfg.ab_tokens, "n_prompts": len(prompts),
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "model_config_sha256": hashlib.sha256(json.dumps(
                model.config.to_dict(), sort_keys=True, default=str).encode()).hexdigest(),
            "model_checksum": float(f"{checksum:.10g}")}


@torch.no_grad()
def simulate(cfg, model, tokenizer, prompts, out_path, resume=False, rank=None, world_size=None,
             max_records=None, sft_path=None, progress=True):
    """Simulate preference pairs for `prompts` (ids = list indices) into out_path.

    Records are appended as produced to out_path's partial file (one process) or to rank r's shard
    (rank r takes the batches b with b % world_size == r); under torchrun rank 0 then merges the
    shards (by hand: `merge_shards`). out_path appears, with its `.done` marker, only once every id
    is a record or a dropped id (data.py has the file layout); until then an earlier out_path is
    untouched. resume=True continues an interrupted run after checking it has the same prompts and
    settings (`run_settings`). Ids dropped after max_retries go to a ".dropped" log. max_records
    stops after that many records (for tests).
    Randomness: the per-example choices come from a generator seeded by (seed, id), batch b's
    sampling from one seeded by (seed, b, attempt), so a resumed run, or one on any number of ranks,
    writes the records of an uninterrupted single-process run (on GPU: up to nondeterministic
    kernels). sft_path: where rank 0 writes the context-distillation view (prompt, o+) (rlcd)."""
    if cfg.method not in METHODS or cfg.task not in TASKS or cfg.ab_tokens not in AB_TOKEN_MODES:
        raise ValueError(f"RLCDConfig: method '{cfg.method}' / task '{cfg.task}' / ab_tokens "
                         f"'{cfg.ab_tokens}' unknown (expected one of {METHODS} / {tuple(TASKS)} / "
                         f"{AB_TOKEN_MODES})")
    if cfg.max_new_tokens >= model.config.max_position_embeddings:
        raise ValueError(f"RLCDConfig.max_new_tokens: {cfg.max_new_tokens} leaves no room for a "
                         f"prompt in the model's context ({model.config.max_position_embeddings})")
    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    shard = shard_path(out_path, rank, world_size)
    lock = acquire_lock(lock_path(out_path, rank))
    was_training = model.training
    model.eval()
    try:
        # 1. what is already done (resume, after checking the settings), or a clean start
        done = start_run(out_path, run_settings(cfg, prompts, model), rank, world_size, resume)
        summary = _simulate_batches(cfg, model, tokenizer, prompts, shard, done, rank, world_size,
                                    max_records, progress)
        # 2. under torchrun: wait for every rank, then rank 0 merges the shards; one process: finish
        complete = False
        if world_size > 1 and dist.world_size() > 1:
            dist.barrier()
            if rank == 0:
                merge_shards(out_path)
            dist.barrier()
        if rank == 0 and not summary["stopped"] and (world_size == 1 or dist.world_size() > 1):
            complete = finish(out_path)
        # 3. the context-distillation view: (plain prompt, o+) of every RLCD record
        if sft_path and cfg.method == "rlcd" and complete:
            write_sft_data(read_records(out_path), sft_path)
    finally:
        release_lock(lock)
        model.train(was_training)
    return {"method": cfg.method, "task": cfg.task, "resumed_ids": len(done), **summary,
            "complete": complete}


def _simulate_batches(cfg, model, tokenizer, prompts, shard, done, rank, world_size, max_records,
                      progress):
    """This rank's batches that still miss an id -> records appended to `shard`; returns counts."""
    B = cfg.batch_size
    batches = [b for b in range(rank, (len(prompts) + B - 1) // B, world_size)
               if any(i not in done for i in range(b * B, min((b + 1) * B, len(prompts))))]
    todo = sum(1 for b in batches for i in range(b * B, min((b + 1) * B, len(prompts)))
               if i not in done)
    bar = tqdm(total=todo, unit="pairs", desc=f"simulate {cfg.method}",
               disable=not progress or rank != 0)
    totals = {"records": 0, "resampled": 0, "too_long": 0, "rejected": 0}
    stopped, t0 = False, time.time()
    for b in batches:
        # a whole batch is regenerated even if some ids are done: its random streams need it all
        ids = list(range(b * B, min((b + 1) * B, len(prompts))))
        plans = [plan_example(cfg, prompts[i], i) for i in ids]
        outputs, dropped, n_resampled = _sample_batch(cfg, model, tokenizer, plans, b)
        records = [r for r in _make_records(cfg, model, tokenizer, prompts, ids, plans, outputs)
                   if r["id"] not in done]
        # append the new records (flushed), then the batch's dropped ids; max_records: a stop
        if max_records is not None and totals["records"] + len(records) >= max_records:
            records, stopped = records[:max_records - totals["records"]], True
        write_records(shard, records)
        totals["records"] += len(records)
        if stopped:
            break
        new_drops = {ids[j]: reason for j, reason in dropped.items() if ids[j] not in done}
        write_dropped(dropped_path(shard), new_drops)
        for reason in new_drops.values():
            totals[reason] += 1
        totals["resampled"] += n_resampled
        bar.set_postfix(dropped=totals["too_long"] + totals["rejected"],
                        resampled=totals["resampled"], refresh=False)
        bar.update(sum(i not in done for i in ids))
    bar.close()
    elapsed = time.time() - t0
    return {**totals, "stopped": stopped, "seconds": elapsed,
            "pairs_per_s": totals["records"] / elapsed if elapsed > 0 else 0.0}
