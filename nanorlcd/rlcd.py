"""Preference-data simulation: RLCD and its baselines RLAIF and RLCD-Rescore (the paper's contribution).

What (Yang et al. 2024, Sec. 3 and Sec. 4 "Baselines"; reference: facebookresearch/RLCD at commit 0a389fd,
`scripts/simulate_preference_data.py` and `scripts/consolidate_preference_data.py`):
  rlcd          p+ / p- = the prompt with an affix pair in its assistant tags (`contrastive_prompts`);
                o+ ~ LM(p+), o- ~ LM(p-); o+ is preferred with label 1.0. No scoring step.
  rlaif         o1, o2 ~ LM(p) i.i.d.; the same LM reads the scoring prompt "...(A) o1 ...(B) o2 ... The
                answer is: (" with a random instruction, and P(B better) = softmax(logit_A, logit_B)[1].
  rlcd_rescore  o+ / o- shuffled into A / B and scored like rlaif, with the instruction of the same index as
                the affix pair.
Tasks: harmless (16 affix pairs, 16 instructions), helpful (1 and 1), outline (3 and 3 of nanorlcd's own,
below: the paper's outline affixes were not released).
Records (DESIGN.md): `chosen` is the output the labeller prefers and `label_prob` its probability of being
better: rlcd -> o+ with 1.0; rlaif / rlcd_rescore -> A if P(B) <= 0.5 else B, label_prob = max(P(A), P(B)),
as the reference's consolidation turns win2_prob into a preference. The PM's Bradley-Terry loss with soft
target label_prob is the same under either order; a reader who ignores label_prob still gets the right pick.
Post-processing (`postprocess`) is the reference's filter; its rule table is in the docstring.
Departures from the reference, each documented where it happens:
  - banned strings ("\\", "`") are not masked during sampling (HF bad_words_ids) but reject the output;
  - generation stops at the first "Human" (a stop string): lossless, since the output is cut there anyway;
  - EOS counts as a proper end of the reply (the toy model ends dialogues with EOS);
  - the A/B ids are the tokens that actually follow "(" (`ab_token_ids`), not encode('A')[-1] = "▁A";
  - a scoring prompt longer than the context keeps BOS + its last tokens; a generation prompt too long for
    prompt + max_new_tokens is dropped and logged (both are rare at LLaMA-7B's 2048-token context).
Randomness and resume: examples form fixed batches of ids (batch b = ids [b*B, (b+1)*B)); the per-example
choices (affix pair, instruction, A/B order) come from a generator seeded by (seed, id), and the sampling of
batch b's attempt r from one seeded by (seed, b, r). So a resumed run, and a run on any number of ranks
(batch b goes to rank b % world_size), write exactly the records of an uninterrupted single-process run
with the same seed and batch_size (on GPU: up to nondeterministic kernels).
Run: `python train.py --stage simulate --method rlcd --task harmless` (toy preset), or
`from nanorlcd.rlcd import RLCDConfig, simulate`.
"""
import json
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from nanorlcd import dist
from nanorlcd.data import read_records, write_records, write_sft_data
from nanorlcd.prompts import (HARMLESS_NEGATIVE_AFFIXES, HARMLESS_POSITIVE_AFFIXES, HARMLESS_RLAIF_INSTRUCTIONS,
                              HELPFUL_NEGATIVE_AFFIXES, HELPFUL_POSITIVE_AFFIXES, HELPFUL_RLAIF_INSTRUCTIONS,
                              RLAIF_SCORING_TEMPLATE, apply_affixes)
from nanorlcd.sample import generate
from nanorlcd.tokenizer import left_pad

# Outline task: nanorlcd's own pairs and instructions (index i belongs together), aimed at the paper's three
# outline qualities: interesting, well-structured, relevant to the premise.
OUTLINE_POSITIVE_AFFIXES = ["(interesting, creative outline)", "(well-structured, coherent outline)",
                            "(outline relevant to the premise)"]
OUTLINE_NEGATIVE_AFFIXES = ["(boring, unoriginal outline)", "(disorganized, incoherent outline)",
                            "(outline unrelated to the premise)"]
OUTLINE_RLAIF_INSTRUCTIONS = ["Please choose the outline that is more interesting and creative.",
                              "Please choose the outline that is better structured and more coherent.",
                              "Please choose the outline that is more relevant to the premise."]

# task -> (positive affixes, negative affixes, RLAIF instructions)
TASKS = {
    "harmless": (HARMLESS_POSITIVE_AFFIXES, HARMLESS_NEGATIVE_AFFIXES, HARMLESS_RLAIF_INSTRUCTIONS),
    "helpful": (HELPFUL_POSITIVE_AFFIXES, HELPFUL_NEGATIVE_AFFIXES, HELPFUL_RLAIF_INSTRUCTIONS),
    "outline": (OUTLINE_POSITIVE_AFFIXES, OUTLINE_NEGATIVE_AFFIXES, OUTLINE_RLAIF_INSTRUCTIONS),
}
METHODS = ("rlcd", "rlaif", "rlcd_rescore")
# The reference's bad_words for simulation (prompts.json "generation_for_simulation").
BANNED_STRINGS = ("\\", "\\\\", "`", "```")


@dataclass
class RLCDConfig:
    method: str = "rlcd"                # rlcd | rlaif | rlcd_rescore
    task: str = "harmless"              # harmless | helpful | outline: picks affix pairs and instructions
    batch_size: int = 8                 # examples per generate call (2 rows each); also the scoring batch
    max_new_tokens: int = 300           # reply length cap (paper: 300); must leave room for the prompt
    temperature: float = 1.0            # sampling temperature (paper: 1, no top-k / top-p)
    max_retries: int = 5                # sampling attempts per output; an output rejected that often drops its example
    banned_strings: tuple = BANNED_STRINGS  # an output containing any of these is rejected and re-sampled
    seed: int = 0                       # with the example id / batch index, seeds every random choice


def contrastive_prompts(prompt, task, pair_index):
    """(p+, p-) for a prompt ending in "\\n\\nAssistant:" (paper Sec. 3): p+ puts the positive affix on the final
    assistant tag and the negative one on every earlier tag; p- is the mirror image."""
    if task not in TASKS:
        raise ValueError(f"task: unknown '{task}' (expected one of {', '.join(TASKS)})")
    positive, negative, _ = TASKS[task]
    if not 0 <= pair_index < len(positive):
        raise ValueError(f"pair_index: {pair_index} out of range for task '{task}' ({len(positive)} pairs)")
    pos, neg = positive[pair_index], negative[pair_index]
    return apply_affixes(prompt, pos, neg), apply_affixes(prompt, neg, pos)


def postprocess(text, ended_with_eos=False, banned_strings=BANNED_STRINGS):
    """A sampled continuation -> the reply, or None to re-sample (the reference's `process_filter_result`).

    Rule table, applied in order:
      1. 'Human' in text       -> cut at its first occurrence; the cut must contain a newline (else None: the
                                   text ran into 'Human' mid-line), and is cut again at its last newline
                                   (drops the "\\n\\n" before "Human:" and any unfinished last line)
         no 'Human', EOS end   -> the whole text (EOS closed the dialogue; generate() drops nothing but EOS)
         no 'Human', no EOS    -> None (unterminated: max_new_tokens ran out)
      2. 'Assistant:' remains  -> keep only what follows its first occurrence (a stray early turn tag)
      3. empty after strip, or contains a banned string -> None
    """
    # 1. find the end of the reply: the next human turn, or EOS
    if "Human" in text:
        text = text[:text.index("Human")]
        if "\n" not in text:
            return None
        text = text[:text.rindex("\n")]
    elif not ended_with_eos:
        return None
    text = text.strip()
    # 2. a reply that starts with (or soon repeats) an assistant tag keeps what follows it
    if "Assistant:" in text:
        text = text[text.index("Assistant:") + len("Assistant:"):].strip()
    # 3. reject empty replies and banned strings (the reference masks these at sampling time instead)
    if not text or any(s in text for s in banned_strings):
        return None
    return text


def scoring_prompt(prompt, instruction, response_a, response_b):
    """The paper's RLAIF scoring prompt; every field is .strip()ped as in the reference."""
    return RLAIF_SCORING_TEMPLATE.format(prompt=prompt.strip(), instruction=instruction.strip(),
                                         response_a=response_a.strip(), response_b=response_b.strip())


def ab_token_ids(tokenizer):
    """Ids of the tokens 'A' and 'B' as they follow the scoring prompt's final "(".

    The reference takes encode('A')[-1], which for LLaMA's sentencepiece is "▁A" (a word start with a space),
    whereas "(A" continues with the bare piece "A": the label should compare the tokens the model would
    actually emit. So we encode the template's ending with each letter appended and take the one new token;
    if a letter merges with "(" or splits into several pieces there is no single next token, and we fail."""
    ending = RLAIF_SCORING_TEMPLATE[RLAIF_SCORING_TEMPLATE.rindex("\n") + 1:]      # "The answer is: ("
    base = tokenizer.encode(ending, bos=False)
    ids = []
    for letter in "AB":
        full = tokenizer.encode(ending + letter, bos=False)
        if full[:-1] != base or tokenizer.decode(full[-1:]).strip() != letter:
            raise ValueError(f"tokenizer: '{letter}' after {ending!r} is not one token of its own "
                             f"({base} -> {full}); RLAIF scoring needs single A/B tokens")
        ids.append(full[-1])
    if ids[0] == ids[1]:
        raise ValueError(f"tokenizer: 'A' and 'B' map to the same id {ids[0]} after {ending!r}")
    return tuple(ids)


@torch.no_grad()
def score_ab(model, tokenizer, texts):
    """Scoring prompts -> P(B better) per prompt, (N,): softmax over the next-token logits of A and B at the
    last position (paper Sec. 4, RLAIF)."""
    a_id, b_id = ab_token_ids(tokenizer)
    max_len = model.config.max_position_embeddings
    # 1. encode; an over-long prompt keeps BOS + its last tokens (the options and "The answer is: (")
    rows = [tokenizer.encode(t, bos=True) for t in texts]
    rows = [r if len(r) <= max_len else r[:1] + r[len(r) - max_len + 1:] for r in rows]
    ids, mask = (x.to(model.lm_head.weight.device) for x in left_pad(rows, tokenizer.pad_id))
    # 2. backbone once; left padding puts every row's last real token in the last column
    h = model.model(ids, mask)[:, -1]                    # (N, D) hidden state before the answer letter
    logits = model.lm_head(h).float()                    # (N, V) only the last position through lm_head
    # 3. two-way softmax over the A and B logits
    return logits[:, [a_id, b_id]].softmax(-1)[:, 1]     # (N,) P(B)


def _seed(*parts):
    """A 63-bit seed from any tuple of ints (sha512 of its string form: stable across runs and platforms)."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def plan_example(cfg, prompt, idx):
    """The per-example random choices, from a generator seeded by (seed, id): the generation prompts (two),
    the affix pair index (rlcd, rlcd_rescore), the scoring instruction index and whether A/B are swapped."""
    rng = random.Random(_seed(cfg.seed, idx))
    positive, _, instructions = TASKS[cfg.task]
    plan = {"affix_index": None, "pos_prompt": None, "neg_prompt": None, "instruction": None, "swap": False}
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
    """Two outputs per example, re-sampling rejected ones -> (outputs, dropped, n_resampled): outputs[j] is
    [o_0, o_1] or None, dropped maps j -> "too_long" | "rejected"."""
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
        # 2. one generate call for every pending output; stop at "Human" since the reply is cut there anyway
        generator = torch.Generator(device=device).manual_seed(_seed(cfg.seed, batch_index, attempt))
        out = generate(model, [ids[j][s] for j, s in pending], cfg.max_new_tokens, temperature=cfg.temperature,
                       eos_id=tokenizer.eos_id, stop_strings=["Human"], tokenizer=tokenizer,
                       generator=generator, pad_id=tokenizer.pad_id)
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
    """Finished outputs -> preference records (rlaif / rlcd_rescore score the A/B pairs in one batch)."""
    done = [j for j, o in enumerate(outputs) if o is not None]
    p_b = {}
    if cfg.method != "rlcd" and done:
        # A/B: rlaif (o1, o2); rlcd_rescore (o+, o-) or swapped
        _, _, instructions = TASKS[cfg.task]
        ab = {j: outputs[j][::-1] if plans[j]["swap"] else outputs[j] for j in done}
        texts = [scoring_prompt(prompts[ids[j]], instructions[plans[j]["instruction"]], *ab[j]) for j in done]
        p_b = dict(zip(done, score_ab(model, tokenizer, texts).tolist()))
    records = []
    for j in done:
        if cfg.method == "rlcd":
            chosen, rejected, label_prob = outputs[j][0], outputs[j][1], 1.0
        else:
            # the labeller's pick is `chosen`; a tie (P(B) = 0.5) goes to A
            (a, b), p = ab[j], p_b[j]
            chosen, rejected, label_prob = (b, a, p) if p > 0.5 else (a, b, 1.0 - p)
        records.append({"id": ids[j], "task": cfg.task, "method": cfg.method, "prompt": prompts[ids[j]],
                        "chosen": chosen, "rejected": rejected, "pos_prompt": plans[j]["pos_prompt"],
                        "neg_prompt": plans[j]["neg_prompt"], "affix_index": plans[j]["affix_index"],
                        "label_prob": label_prob})
    return records


def _sibling(path, tag):
    """prefs-rlcd.jsonl + "rank1" -> prefs-rlcd.rank1.jsonl."""
    root, ext = os.path.splitext(str(path))
    return f"{root}.{tag}{ext or '.jsonl'}"


def _read_dropped(path, repair=False):
    """The dropped-id log -> {id: reason}. A partial last line is ignored (its batch is simply redone), and
    with repair=True also cut off the file, so that appending continues on a fresh line."""
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    if repair and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    lines = data.decode("utf-8").split("\n")[:-1]                 # complete lines only
    return {d["id"]: d["reason"] for d in (json.loads(x) for x in lines if x.strip())}


def merge_shards(out_path, world_size):
    """Rank 0, after every rank finished: shard files (+ an earlier merged file) -> out_path ordered by id,
    one record per id; the dropped-id logs are merged the same way. Shards are removed. Returns the records."""
    records, dropped = {}, _read_dropped(_sibling(out_path, "dropped"))
    if os.path.isfile(out_path):
        records.update({r["id"]: r for r in read_records(out_path, repair=True)})
    for r in range(world_size):
        shard = _sibling(out_path, f"rank{r}")
        if os.path.isfile(shard):
            records.update({rec["id"]: rec for rec in read_records(shard, repair=True)})
        dropped.update(_read_dropped(_sibling(shard, "dropped")))
    # write both files atomically, then remove the shards
    for path, rows in ((out_path, [records[i] for i in sorted(records)]),
                       (_sibling(out_path, "dropped"), [{"id": i, "reason": dropped[i]} for i in sorted(dropped)])):
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(f"{path}.tmp", path)
    for r in range(world_size):
        for p in (_sibling(out_path, f"rank{r}"), _sibling(_sibling(out_path, f"rank{r}"), "dropped")):
            if os.path.isfile(p):
                os.remove(p)
    return [records[i] for i in sorted(records)]


@torch.no_grad()
def simulate(cfg, model, tokenizer, prompts, out_path, resume=False, rank=None, world_size=None,
             max_records=None, sft_path=None, progress=True):
    """Simulate preference pairs for `prompts` (ids = list indices) and append them to out_path as produced.

    One process: writes out_path directly. Several ranks (torchrun, or rank / world_size given by hand): rank r
    takes the batches b with b % world_size == r and writes out_path's ".rank{r}" shard; under torchrun rank 0
    then merges them into out_path (called by hand, `merge_shards` does it). Ids dropped after max_retries go
    to a ".dropped" log. resume=True keeps what the files hold (a partial last line is cut off) and redoes only
    batches with missing ids. max_records stops after writing that many records (an interruption, for tests).
    sft_path: where rank 0 writes the context-distillation view (prompt, o+) at the end (rlcd only).
    Returns a summary dict."""
    if cfg.method not in METHODS or cfg.task not in TASKS:
        raise ValueError(f"RLCDConfig: method '{cfg.method}' / task '{cfg.task}' unknown (expected one of "
                         f"{METHODS} / {tuple(TASKS)})")
    if cfg.max_new_tokens >= model.config.max_position_embeddings:
        raise ValueError(f"RLCDConfig.max_new_tokens: {cfg.max_new_tokens} leaves no room for a prompt in the "
                         f"model's context ({model.config.max_position_embeddings})")
    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    shard_path = out_path if world_size == 1 else _sibling(out_path, f"rank{rank}")
    dropped_path = _sibling(shard_path, "dropped")
    was_training = model.training
    model.eval()
    # 1. what is already done: records and dropped ids in this rank's files (and the merged file)
    done = {}
    if resume:
        for path in {shard_path, out_path}:
            if os.path.isfile(path):
                for rec in read_records(path, repair=(path == shard_path)):
                    if (rec["method"], rec["task"]) != (cfg.method, cfg.task):
                        raise ValueError(f"{path}: holds {rec['method']}/{rec['task']} records, not "
                                         f"{cfg.method}/{cfg.task}; resume with the same method and task")
                    done[rec["id"]] = "record"
        done.update(_read_dropped(dropped_path, repair=True))
        done.update(_read_dropped(_sibling(out_path, "dropped")))
    else:
        # a fresh run: forget this rank's files (rank 0 also the merged ones)
        stale = [shard_path, dropped_path] + ([out_path, _sibling(out_path, "dropped")] if rank == 0 else [])
        for path in stale:
            if os.path.isfile(path):
                os.remove(path)
    # 2. this rank's batches that still miss an id
    B = cfg.batch_size
    batches = [b for b in range(rank, (len(prompts) + B - 1) // B, world_size)
               if any(i not in done for i in range(b * B, min((b + 1) * B, len(prompts))))]
    todo = sum(1 for b in batches for i in range(b * B, min((b + 1) * B, len(prompts))) if i not in done)
    bar = tqdm(total=todo, unit="pairs", desc=f"simulate {cfg.method}", disable=not progress or rank != 0)
    totals = {"records": 0, "resampled": 0, "too_long": 0, "rejected": 0}
    stopped, t0 = False, time.time()
    for b in batches:
        # 3. a whole batch is regenerated even if some ids are done: its random streams depend on all of it
        ids = list(range(b * B, min((b + 1) * B, len(prompts))))
        plans = [plan_example(cfg, prompts[i], i) for i in ids]
        outputs, dropped, n_resampled = _sample_batch(cfg, model, tokenizer, plans, b)
        records = [r for r in _make_records(cfg, model, tokenizer, prompts, ids, plans, outputs)
                   if r["id"] not in done]
        # 4. append the new records (flushed), then the batch's dropped ids; max_records interrupts mid-batch
        if max_records is not None and totals["records"] + len(records) >= max_records:
            records, stopped = records[:max_records - totals["records"]], True
        write_records(shard_path, records)
        totals["records"] += len(records)
        if stopped:
            break
        with open(dropped_path, "a", encoding="utf-8") as f:
            for j, reason in sorted(dropped.items()):
                if ids[j] not in done:
                    f.write(json.dumps({"id": ids[j], "reason": reason}) + "\n")
                    totals[reason] += 1
        totals["resampled"] += n_resampled
        bar.set_postfix(dropped=totals["too_long"] + totals["rejected"], resampled=totals["resampled"], refresh=False)
        bar.update(sum(i not in done for i in ids))
    bar.close()
    elapsed = time.time() - t0
    # 5. under torchrun: wait for every rank, then rank 0 merges the shards into out_path
    if world_size > 1 and dist.world_size() > 1:
        dist.barrier()
        if rank == 0:
            merge_shards(out_path, world_size)
        dist.barrier()
    # 6. the context-distillation view: (plain prompt, o+) of every RLCD record
    if sft_path and cfg.method == "rlcd" and rank == 0 and os.path.isfile(out_path):
        write_sft_data(read_records(out_path), sft_path)
    model.train(was_training)
    return {"method": cfg.method, "task": cfg.task, "resumed_ids": len(done), **totals, "stopped": stopped,
            "seconds": elapsed, "pairs_per_s": (totals["records"] / elapsed if elapsed > 0 else 0.0)}
