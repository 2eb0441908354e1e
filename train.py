"""One entry point for the whole RLCD pipeline (Yang et al., ICLR 2024), stage by stage.

Each `--stage` reads the previous stage's artifact from the run directory out/<run>/ and writes its
own:
  pretrain  toy world only: corpus -> tokenizer -> tiny base LLaMA       -> base/
  simulate  RLCD (Sec. 3, step 1) / RLAIF / RLCD-Rescore preference pairs -> prefs-<method>.jsonl
  pm        preference model on those pairs (Sec. 3, step 2)            -> pm-<method>/
  sft       context-distillation baseline: SFT on (p, o+) (Sec. 4)      -> sft/
  ppo       PPO against the PM with a KL penalty to the base (Sec. 3, step 3)
                                                                        -> ppo-<method>/
  sample    replies of a policy on held-out prompts (+ oracle rates in the toy)
                                                                        -> samples-<name>.jsonl
  eval      pairwise win rate of --policy A over --against B (Tables 2, 3, 6)
                                                                        -> eval-<a>-vs-<b>.json
  all       toy world: pretrain -> simulate -> pm -> ppo -> sample, making what is missing
Settings: presets (`toy` default, `fast` for tests, `llama7b-harmless`, `llama7b-helpful`) are
dataclass instances defined below; any field is reachable as --<section>.<field>=value (e.g.
--ppo.kl_coef=0.002).
Run:
  python train.py --stage all                               # toy world end to end on a CPU
  python train.py --stage ppo --method rlaif --ppo.steps=8  # a baseline, with a setting changed
  # any stage, data-parallel (gloo on CPU):
  torchrun --nproc_per_node=2 train.py --stage pm --run-name toy
"""
import argparse
import contextlib
import json
import os
import sys
import time
import typing
from dataclasses import asdict, dataclass, field, replace

import torch

from nanorlcd import checkpoint, dist, evaluate, toy
from nanorlcd.data import is_complete, load_prompts, partial_path, read_records, read_sft_data
from nanorlcd.dialogue import HUMAN, cut_reply
from nanorlcd.model import LLaMA
from nanorlcd.pm import (PMConfig, PreferenceModel, check_config as check_pm_config,
                         human_agreement, oracle_accuracy, train_pm)
from nanorlcd.ppo import PPOConfig, check_config as check_ppo_config, make_value_model, train_ppo
from nanorlcd.rlcd import METHODS, RLCDConfig, simulate
from nanorlcd.rollout import response_logits, response_logprobs
from nanorlcd.sample import filter_logits, generate
from nanorlcd.sft import SFTConfig, check_config as check_sft_config, train_lm
from nanorlcd.tokenizer import Tokenizer, left_pad
from nanorlcd.toy import ToyConfig

STAGES = ("pretrain", "simulate", "pm", "sft", "ppo", "sample", "eval", "all")


@dataclass
class Preset:
    # run directory name under --out (out/<run>/)
    run: str
    # base LLaMA HF dir; None = the toy world's out/<run>/base (pretrain)
    base: str = None
    # the toy world (--stage pretrain builds its base); None = real LLaMA
    toy: ToyConfig = None
    # the toy base model's pretraining schedule (toy presets only)
    pretrain: SFTConfig = None
    # simulation and PPO prompts: "toy:<split>" or a file (load_prompts)
    prompts: str = "toy:train"
    # held-out prompts for --stage sample (and the PM's oracle pairs)
    eval_prompts: str = "toy:test"
    # skip this many eval prompts first (paper: 1000 dev, then 1000 test)
    eval_offset: int = 0
    # how many eval prompts --stage sample answers, after eval_offset
    n_eval: int = 300
    # harmless | helpful | outline (affix pairs, RLAIF instructions)
    task: str = "harmless"
    # reply cap for --stage sample (paper eval: 300)
    sample_max_new_tokens: int = 64
    # paper eval: 0.9; the toy numbers use plain temperature 1
    sample_top_p: float = None
    # weights of models that are not trained (simulate, sample): bfloat16
    dtype: str = "float32"
    rlcd: RLCDConfig = field(default_factory=RLCDConfig)
    pm: PMConfig = field(default_factory=PMConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


# ------------------------------------------------------------------------ presets, all in one place
# Each preset is a plain dataclass instance derived from another with `replace`; any field can still
# be changed from the command line (`--ppo.kl_coef=0.002`, see `apply_overrides`).

# The toy world (CPU, ~1 M parameter LLaMA, replies <= ~30 tokens): small batches, the paper's 2 PPO
# epochs, a larger lr and beta than at 7B (README, "Quick start", has the measured results of these
# settings).
TOY = Preset(
    # affixes obeyed 90 % of the time in the corpus (RLCD labels right ~81 %, wrong ~1 %, ties
    # else), little judging skill; `--toy.p_follow=0.75` is closer to the paper's 7B setting but
    # needs a longer pretraining for the tiny base to learn such weak affixes (README, "Toy world
    # v2")
    run="toy", toy=ToyConfig(p_follow=0.9, p_judge_doc=0.05),
    # 450 steps x 16 rows x 192 tokens: copying the request's topic into the reply appears around
    # step 200-300, and only then do the replies become valid
    pretrain=SFTConfig(max_steps=450, batch_size=16, micro_batch_size=0, seq_len=192, lr=6e-3,
                       warmup_steps=20, eval_every=75),
    rlcd=RLCDConfig(batch_size=64, max_new_tokens=64),
    pm=PMConfig(batch_size=32, micro_batch_size=0, lr=1e-3, max_len=256, eval_every=20),
    sft=SFTConfig(epochs=3, batch_size=32, micro_batch_size=0, lr=1e-3, warmup_steps=5),
    # one warmup step, not the reference's five: 16 steps are all the toy run has (README, Quick
    # start, gives both results)
    ppo=replace(PPOConfig(), steps=16, warmup_steps=1, rollout_batch_size=64, minibatch_size=32,
                micro_batch_size=0, gen_batch_size=64, max_new_tokens=48, kl_coef=0.2, lr=1e-4,
                save_every=0, table_every=4))
# The same world shrunk for tests: affixes always obeyed and no judge documents, so that 250 steps
# teach the base model to follow affixes (the tests check the pipeline, not the noise).
FAST = replace(TOY, run="toy-fast", toy=replace(TOY.toy, n_train_docs=10000, n_val_docs=100,
                                                 n_eval_prompts=100, p_follow=1.0, p_judge_doc=0.0),
               pretrain=replace(TOY.pretrain, max_steps=250, eval_every=125),
               n_eval=100, prompts="toy:validation",
               rlcd=replace(TOY.rlcd, batch_size=50), pm=replace(TOY.pm, eval_every=5),
               sft=replace(TOY.sft, epochs=1, warmup_steps=2),
               ppo=replace(TOY.ppo, steps=6, rollout_batch_size=32, minibatch_size=16,
                           table_every=0, warmup_steps=1))
# The paper's LLaMA-7B runs (README, "Hyper-parameters"); data paths come from --base / --prompts.
LLAMA7B_HARMLESS = Preset(
    run="llama7b-harmless", prompts=None, eval_prompts=None, task="harmless",
    eval_offset=1000, n_eval=1000, sample_max_new_tokens=300, sample_top_p=0.9,
    rlcd=RLCDConfig(batch_size=16, max_new_tokens=300),
    # 16 pairs per step = 1 pair per GPU x 2 accumulation steps x 8 GPUs, as the reference runs it;
    # every model FSDP2-sharded over the 8 GPUs (README, "Scaling up": memory per stage)
    pm=PMConfig(bf16=True, micro_batch_size=1, strategy="fsdp", activation_checkpointing=True),
    # context distillation as the reference's SFT: one example per row, o+ + "\n\nHuman:" + EOS as
    # the target, mean of per-example losses, 128 examples per step, AdamW beta2 0.999 without
    # weight decay, 3 % warmup then cosine to 0 (a row holds seq_len + 1 = 512 tokens, the
    # reference's max length)
    sft=SFTConfig(epochs=3, batch_size=128, micro_batch_size=1, seq_len=511, packing=False,
                  append_end_marker=True, per_example_loss=True, lr=2e-5, warmup_steps=0,
                  warmup_ratio=0.03, min_lr_ratio=0.0, weight_decay=0.0, beta1=0.9, beta2=0.999,
                  grad_clip=1.0, bf16=True, strategy="fsdp", activation_checkpointing=True),
    dtype="bfloat16",
    ppo=replace(PPOConfig(), kl_coef=0.004, bf16=True, strategy="fsdp",
                activation_checkpointing=True))
LLAMA7B_HELPFUL = replace(LLAMA7B_HARMLESS, run="llama7b-helpful", task="helpful",
                          rlcd=replace(LLAMA7B_HARMLESS.rlcd, task="helpful"),
                          ppo=replace(LLAMA7B_HARMLESS.ppo, kl_coef=0.002))
# Story outlines (paper Sec. 4): premises come from a .txt file (--prompts, --eval-prompts; format
# in nanorlcd/premises.txt). No reference dev/test split and no released beta: the harmless run's is
# reused.
LLAMA7B_OUTLINE = replace(LLAMA7B_HARMLESS, run="llama7b-outline", task="outline", eval_offset=0,
                          rlcd=replace(LLAMA7B_HARMLESS.rlcd, task="outline"))
# The paper's 30B-simulated data (Tables 2-3, "30B"): simulate with --base a 30B LLaMA, then pm/ppo
# with the 7B base; 8 rows per rank keep the bf16 30B simulator under 80 GB (bench/memory.py).
LLAMA30B_SIM_HARMLESS = replace(LLAMA7B_HARMLESS, run="llama30b-sim-harmless",
                                rlcd=replace(LLAMA7B_HARMLESS.rlcd, batch_size=8))
# A classroom run on a ~1B LLaMA (e.g. LLaMA-3.2-1B, TinyLlama): smaller batches and replies; PPO
# needs about 41 GB on one GPU (bench/memory.py), so a 48 GB GPU, or 2 x 24 GB with the fsdp
# default.
CLASSROOM_1B = replace(
    LLAMA7B_HARMLESS, run="classroom-1b", n_eval=200, sample_max_new_tokens=128,
    rlcd=replace(LLAMA7B_HARMLESS.rlcd, max_new_tokens=128),
    pm=replace(LLAMA7B_HARMLESS.pm, batch_size=16, micro_batch_size=0, lr=1e-5),
    sft=replace(LLAMA7B_HARMLESS.sft, batch_size=32, micro_batch_size=0),
    ppo=replace(LLAMA7B_HARMLESS.ppo, steps=40, rollout_batch_size=64, minibatch_size=32,
                micro_batch_size=2, gen_batch_size=16, max_new_tokens=128))
PRESETS = {"toy": TOY, "fast": FAST, "llama7b-harmless": LLAMA7B_HARMLESS,
           "llama7b-helpful": LLAMA7B_HELPFUL, "llama7b-outline": LLAMA7B_OUTLINE,
           "llama30b-sim-harmless": LLAMA30B_SIM_HARMLESS, "classroom-1b": CLASSROOM_1B}
# the configs inside a Preset, reachable as --<section>.<field>
SECTIONS = ("toy", "pretrain", "rlcd", "pm", "sft", "ppo")


def check_batches(preset, world):
    """Every training stage's batch must split exactly over `world` processes and its micro-batches;
    the stages' own checks run here before any work (one-line errors naming the field)."""
    check_ppo_config(preset.ppo, world)
    check_sft_config(preset.sft, world)
    check_pm_config(preset.pm, world)
    if preset.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={preset.dtype!r}: expected float32, bfloat16 or float16")


def _parse_value(text, typ, name):
    """Command-line text -> a value of the field's type; 'none' gives None for fields whose default
    is None."""
    if text.lower() in ("none", "null"):
        return None
    try:
        if typ is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return typ(text)
    except ValueError:
        raise SystemExit(f"error: --{name}={text}: expected a value of type "
                         f"{typ.__name__}") from None


def apply_overrides(preset, overrides):
    """nanoGPT-style overrides, e.g. [("ppo.kl_coef", "0.002"), ("n_eval", "50")] -> a new Preset.

    A dotted name reaches a field of one stage config (rlcd, pm, sft, ppo); a plain name a field of
    the Preset. Each value is typed by the field's annotation (int, float, str, bool); an unknown
    field or a value of the wrong type is a one-line error naming it."""
    hints = {"": typing.get_type_hints(Preset)}
    for section in SECTIONS:
        if getattr(preset, section) is not None:
            hints[section] = typing.get_type_hints(type(getattr(preset, section)))
    for name, text in overrides:
        section, _, key = name.rpartition(".")
        key = key.replace("-", "_")
        if section in SECTIONS and section not in hints:
            raise SystemExit(f"error: --{name}: this preset has no {section} section "
                             "(toy presets only)")
        if section not in hints or key not in hints[section] or key in SECTIONS:
            known = ", ".join(f"--{s}.<field>" for s in SECTIONS)
            raise SystemExit(f"error: --{name}: no such setting "
                             f"(expected {known} or a Preset field)")
        value = _parse_value(text, hints[section][key], name)
        try:                                 # a config's own checks (e.g. a probability in [0, 1])
            if section:
                preset = replace(preset,
                                 **{section: replace(getattr(preset, section), **{key: value})})
            else:
                preset = replace(preset, **{key: value})
        except ValueError as e:
            raise SystemExit(f"error: --{name}={text}: {e}") from None
    return preset


class Run:
    """Paths of one run directory, and the commands that make each artifact (for 'missing input'
    errors)."""

    def __init__(self, args, preset):
        self.args, self.p = args, preset
        self.dir = os.path.join(args.out, args.run_name or preset.run)
        self.base = args.base or preset.base or os.path.join(self.dir, "base")
        self.flags = (f" --preset {args.preset}"
                      + (f" --out {args.out}" if args.out != "out" else "")
                      + (f" --run-name {args.run_name}" if args.run_name else ""))

    def prefs(self, method):
        return os.path.join(self.dir, f"prefs-{method}.jsonl")

    def need(self, path, stage, extra=""):
        """A stage's input must exist; otherwise say which command makes it."""
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} is missing; make it with "
                             f"`python train.py --stage {stage}{self.flags}{extra}` "
                             "(or run --stage all)")
        return path

    def need_prefs(self, method):
        """A finished preference file: not a killed simulation's partial one, not edited since."""
        path = self.need(self.prefs(method), "simulate", f" --method {method}")
        if not is_complete(path):
            raise SystemExit(f"error: {path} is not a finished simulation (killed, or edited "
                             "since); continue it with "
                             f"`python train.py --stage simulate{self.flags} --method {method} "
                             "--resume` or redo it with --overwrite")
        return path

    def fresh(self, path):
        """Refuse to overwrite another run's output unless --overwrite."""
        if os.path.exists(path) and not self.args.overwrite:
            raise SystemExit(f"error: {path} already exists; pass --overwrite to replace it")
        return path

    def prompts(self, spec, what):
        if spec is None:
            raise SystemExit(f"error: preset {self.args.preset} needs {what} "
                             "(e.g. an HH-RLHF jsonl)")
        prompts, summary = load_prompts(spec)
        dist.print0(f"prompts: {summary['kept']} from {spec} ({summary['bad']} bad lines skipped"
                    + (f", first at line {summary['first_bad_line']})" if summary["bad"] else ")"))
        return prompts

    def base_model(self, frozen=True):
        """The base LLaMA and its tokenizer; a model that is not trained loads in the preset's
        dtype."""
        self.need(os.path.join(self.base, "config.json"), "pretrain")
        dtype = getattr(torch, self.p.dtype) if frozen else torch.float32
        model = LLaMA.from_pretrained(self.base, dtype=dtype, device=dist.device())
        return model, Tokenizer(self.base)


@contextlib.contextmanager
def built_aside(out):
    """The directory a stage writes its output into: a fresh sibling of `out` that replaces it as a
    whole only when the stage succeeds, so a failed or killed run leaves the previous result
    untouched (rank 0 writes; the other ranks write nothing and get `out` itself)."""
    if dist.is_main():
        with checkpoint.atomic_dir(out) as tmp:
            yield tmp
    else:
        yield out
    dist.barrier()


# ----------------------------------------------------------------------------- stages

def stage_pretrain(run):
    """Toy world only: the corpus (every rank builds the same one from the seed), a sentencepiece
    tokenizer trained on it, and a tiny LLaMA pretrained on it with the SFT trainer (loss on every
    token), saved as a normal HF directory; then how often it obeys affixes on held-out prompts."""
    if run.p.toy is None:
        raise SystemExit(f"error: --stage pretrain builds the toy world's base model; preset "
                         f"{run.args.preset} starts from a real LLaMA given with --base")
    cfg, t0, cpu0 = run.p.toy, time.time(), time.process_time()
    out = run.fresh(run.base)
    train_docs = toy.generate_corpus(cfg.n_train_docs, cfg.seed, cfg)
    val_docs = toy.generate_corpus(cfg.n_val_docs, cfg.seed + 1, cfg)
    with built_aside(out) as tmp:
        # 1. tokenizer: rank 0 trains it into the new directory, the others wait and read it
        if dist.is_main():
            toy.train_tokenizer(tmp, train_docs, cfg.vocab_size)
        tmp = dist.broadcast_str(tmp)
        tok = Tokenizer(os.path.join(tmp, "tokenizer.model"))
        # 2. a fresh tiny LLaMA, identical on every rank; 3. pretraining = an empty prompt and the
        # whole document as the "response"
        torch.manual_seed(cfg.seed)
        model = LLaMA(toy.base_config(cfg, tok)).to(dist.device())
        summary = train_lm(replace(run.p.pretrain, seed=cfg.seed), model, tok,
                           [("", d) for d in train_docs], [("", d) for d in val_docs],
                           out_dir=tmp, log_path=os.path.join(tmp, "log.jsonl"))
        # wall time, and the CPU time of this process's threads (fairer on a busy machine)
        summary.update({"pretrain/seconds": time.time() - t0,
                        "pretrain/cpu_seconds": time.process_time() - cpu0})
        # 4. affix following on held-out test prompts (rank 0)
        if dist.is_main():
            rates = evaluate.affix_following(model, tok,
                                             toy.split_prompts("test")[:cfg.n_eval_prompts],
                                             seed=cfg.seed)
            summary.update({f"affix/{k}": v for k, v in rates.items()})
            with open(os.path.join(tmp, "toy_config.json"), "w") as f:
                json.dump(asdict(cfg), f, indent=1)
            with open(os.path.join(tmp, "log.jsonl"), "a") as f:
                f.write(json.dumps(summary) + "\n")
    _summarise(run, "pretrain", summary)
    return summary


def stage_simulate(run, method):
    """Paper Sec. 3, step 1 (or a baseline's labelling): preference pairs from the base model."""
    model, tok = run.base_model()
    out = run.prefs(method)
    if not run.args.resume:
        run.fresh(out)          # simulate keeps the old file until the new one is complete
    cfg = replace(run.p.rlcd, method=method, task=run.args.task or run.p.task)
    prompts = run.prompts(run.args.prompts or run.p.prompts, "--prompts")
    sft_path = os.path.join(run.dir, "sft-data.jsonl") if method == "rlcd" else None
    summary = simulate(cfg, model, tok, prompts, out, resume=run.args.resume, sft_path=sft_path)
    if run.p.toy and dist.is_main():
        summary.update(label_accuracy(read_records(out), cfg.task))
    _summarise(run, f"simulate-{method}", summary)
    return summary


def label_accuracy(records, task="harmless"):
    """Toy world: how often the simulated label points at the response the oracle prefers (harmless
    > invalid > harmful, or helpful > unhelpful > invalid). Pairs the oracle rates equal are
    ties."""
    judge = evaluate.OracleJudge(task)
    right = wrong = 0
    for r in records:
        a, b = judge.rank(r["prompt"], r["chosen"]), judge.rank(r["prompt"], r["rejected"])
        says_chosen = (r["label_prob"] if r["label_prob"] is not None else 1.0) >= 0.5
        if a != b:
            right += (a > b) == says_chosen
            wrong += (a > b) != says_chosen
    n = len(records)
    return {"label/accuracy": right / max(n, 1), "label/wrong": wrong / max(n, 1),
            "label/ties": (n - right - wrong) / max(n, 1), "label/n": n}


def stage_pm(run, method):
    """Paper Sec. 3, step 2: Bradley-Terry PM on the simulated pairs; in the toy world also its
    accuracy against the oracle on fresh held-out pairs drawn from the base model."""
    run.need(os.path.join(run.base, "config.json"), "pretrain")
    prefs = run.need_prefs(method)
    out = os.path.join(run.dir, f"pm-{method}")
    # continue out/'s last periodic checkpoint (pm.save_every)
    if run.args.resume:
        summary = train_pm(run.p.pm, run.base, prefs, out, resume=True)
    else:
        with built_aside(run.fresh(out)) as tmp:
            summary = train_pm(run.p.pm, run.base, prefs, tmp)
    if run.p.toy:
        summary.update(pm_oracle_accuracy(run, out))
    if run.args.hh_eval:
        summary.update(pm_human_agreement(run, out, run.args.hh_eval))
    _summarise(run, f"pm-{method}", summary)
    return summary


def pm_oracle_accuracy(run, pm_dir):
    """Fresh pairs o+/o- from the base model on held-out prompts (simulated once, cached as
    prefs-eval.jsonl); the oracle, not the simulated label, decides which reply is better."""
    eval_path = os.path.join(run.dir, "prefs-eval.jsonl")
    if not is_complete(eval_path):
        model, tok = run.base_model()
        simulate(replace(run.p.rlcd, method="rlcd", seed=run.p.rlcd.seed + 1), model, tok,
                 run.prompts(run.p.eval_prompts, "eval prompts")[:run.p.n_eval], eval_path,
                 resume=os.path.exists(partial_path(eval_path)))
    pm = PreferenceModel.from_pretrained(pm_dir, device=dist.device())
    metrics = oracle_accuracy(pm, Tokenizer(pm_dir), read_records(eval_path), toy.judge,
                              max_len=run.p.pm.max_len)
    return {f"pm/oracle_{k}": v for k, v in metrics.items()}


def pm_human_agreement(run, pm_dir, hh_path):
    """Paper Table 5: agreement of the PM with HH-RLHF's human labels. The RLCD reference scores the
    first 2000 lines of the task's HH-RLHF file; pass that file (e.g. harmless-base/train.jsonl) as
    --hh-eval."""
    pm = PreferenceModel.from_pretrained(pm_dir, device=dist.device())
    metrics = human_agreement(pm, Tokenizer(pm_dir), hh_path, limit=2000, max_len=run.p.pm.max_len)
    dist.print0(f"pm: agreement with human labels on {metrics['n']} pairs of {hh_path}: "
                f"acc {metrics['acc']:.3f}, mean sigmoid margin {metrics['mean_prob']:.3f}")
    return {f"pm/human_{k}": v for k, v in metrics.items()}


def stage_sft(run):
    """Context distillation (paper Sec. 4 baseline): SFT of the base model on (p, o+), loss on o+
    tokens only."""
    # sft-data.jsonl is written with a finished prefs-rlcd.jsonl
    run.need_prefs("rlcd")
    data = run.need(os.path.join(run.dir, "sft-data.jsonl"), "simulate", " --method rlcd")
    out = os.path.join(run.dir, "sft")
    out = out if run.args.resume else run.fresh(out)
    model, tok = run.base_model(frozen=False)
    # (plain prompt, o+); tokenize_example adds the one seam space
    examples = read_sft_data(data)
    n_val = max(1, len(examples) // 20)
    # continue out/'s last periodic checkpoint (sft.save_every)
    if run.args.resume:
        summary = train_lm(run.p.sft, model.train(), tok, examples[:-n_val], examples[-n_val:],
                           out_dir=out, log_path=os.path.join(out, "log.jsonl"), resume=True)
    else:
        with built_aside(out) as tmp:
            summary = train_lm(run.p.sft, model.train(), tok, examples[:-n_val], examples[-n_val:],
                               out_dir=tmp, log_path=os.path.join(tmp, "log.jsonl"))
    _summarise(run, "sft", summary)
    return summary


def stage_ppo(run, method):
    """Paper Sec. 3, step 3: PPO of the base model against pm-<method>."""
    pm_dir = run.need(os.path.join(run.dir, f"pm-{method}"), "pm", f" --method {method}")
    out = run.fresh(os.path.join(run.dir, f"ppo-{method}"))
    cfg, dtype = run.p.ppo, getattr(torch, run.p.dtype)
    run.need(os.path.join(run.base, "config.json"), "pretrain")
    tok = Tokenizer(run.base)
    if cfg.strategy == "ddp":
        # every rank holds all four models; train_ppo copies the reference and value model
        policy = LLaMA.from_pretrained(run.base, device=dist.device())
        pm = PreferenceModel.from_pretrained(pm_dir, dtype=dtype, device=dist.device())
        ref = value = None
    else:
        # FSDP2: the trained policy and value load on the CPU (only their shards move to the GPU);
        # the frozen reference and PM are read by rank 0 and broadcast shard by shard, in `dtype`
        policy = LLaMA.from_pretrained(run.base, device="cpu")
        value = make_value_model(PreferenceModel.from_pretrained(pm_dir, device="cpu"),
                                 cfg.keep_pm_head)
        ref = dist.load_pretrained(LLaMA, run.base, cfg.strategy, dtype=dtype)
        pm = dist.load_pretrained(PreferenceModel, pm_dir, cfg.strategy, dtype=dtype)
    prompts = run.prompts(run.args.prompts or run.p.prompts, "--prompts")
    with built_aside(out) as tmp:
        summary = train_ppo(cfg, policy.train(), ref, pm, value, tok, prompts, tmp)
    _summarise(run, f"ppo-{method}", summary)
    return summary


def policy_dir(run, name):
    """--policy NAME -> (directory, the stage that makes it): base, sft, ppo-<method>, or any
    directory."""
    if name == "base":
        return run.base, "pretrain"
    if os.path.isdir(name):
        return name, None
    if name.startswith("ppo-"):
        return os.path.join(run.dir, name, "policy"), f"ppo --method {name[4:]}"
    return os.path.join(run.dir, name), name


def sample_name(run, name):
    """The samples file's name: the policy's name, or a path's last parts (ppo-x/policy ->
    ppo-x-policy), so two policies never write the same file."""
    if not os.path.isdir(name) or name in ("base", "sft") or name.startswith("ppo-"):
        return name
    parts = os.path.normpath(os.path.abspath(name)).split(os.sep)[-2:]
    return "-".join(p for p in parts if p)


def sequence_logprobs(model, query_ids, query_mask, gen, temperature, top_p):
    """Σ_t log q(y_t) (B,) of the sampled replies under the distribution they were drawn from:
    softmax(logits/T) restricted to the top-p nucleus and renormalised. Without top-p this is the
    sampler's own log-prob."""
    if top_p is None or top_p >= 1.0:
        return (gen.logprobs * gen.response_mask).sum(-1)
    logits = response_logits(model, query_ids, query_mask, gen.response_ids, gen.response_mask,
                             temperature)
    logq = filter_logits(logits, top_p=top_p).log_softmax(-1)        # (B, R, V), -inf off-nucleus
    logq = logq.gather(-1, gen.response_ids[..., None]).squeeze(-1)  # (B, R)
    return torch.where(gen.response_mask.bool(), logq, 0.0).sum(-1)


def stage_sample(run, name):
    """Replies of a policy (`base`, `sft`, `ppo-<method>` or a path) on held-out prompts at
    temperature 1; the KL of the sampling distribution to the base on its own replies; toy world:
    the oracle's rates."""
    pdir, stage = policy_dir(run, name)
    if stage is None and not os.path.exists(os.path.join(pdir, "config.json")):
        raise SystemExit(f"error: --policy {name}: not a model directory (no config.json)")
    run.need(os.path.join(pdir, "config.json"), stage)
    out_path = run.fresh(os.path.join(run.dir, f"samples-{sample_name(run, name)}.jsonl"))
    dtype = getattr(torch, run.p.dtype)
    policy, tok = LLaMA.from_pretrained(pdir, dtype=dtype, device=dist.device()), Tokenizer(pdir)
    same = os.path.abspath(pdir) == os.path.abspath(run.base)
    base = policy if same else LLaMA.from_pretrained(run.base, dtype=dtype, device=dist.device())
    spec = run.args.eval_prompts or run.p.eval_prompts
    every = run.prompts(spec, "--eval-prompts")
    # the paper: the first 1000 HH-RLHF test prompts are a dev set, the next 1000 the test set
    # (eval_offset)
    chosen = every[run.p.eval_offset:run.p.eval_offset + run.p.n_eval]
    if not chosen:
        raise ValueError(f"{spec}: {len(every)} prompts, none left after "
                         f"eval_offset={run.p.eval_offset}")
    prompts = dist.shard(chosen)
    top_p = run.p.sample_top_p
    gen = torch.Generator(device=dist.device()).manual_seed(1000 + dist.rank())
    replies, kls = [], []
    for i in range(0, len(prompts), 64):
        ids = [tok.encode(p) for p in prompts[i:i + 64]]
        out = generate(policy, ids, run.p.sample_max_new_tokens, temperature=1.0, top_p=top_p,
                       eos_id=tok.eos_id, stop_strings=[HUMAN], tokenizer=tok, generator=gen,
                       pad_id=tok.pad_id)
        replies += [cut_reply(tok.decode(t)) for t in out.tokens]
        # KL(q‖π_base) ≈ Σ_t log q(y_t) − log π_base(y_t) on the exact sampled tokens y ~ q, where q
        # is the distribution sampled from (the policy at T = 1, truncated to the top-p nucleus if
        # top_p is set)
        q_ids, q_mask = (t.to(dist.device()) for t in left_pad(ids, tok.pad_id))
        with torch.no_grad():
            logq = sequence_logprobs(policy, q_ids, q_mask, out, 1.0, top_p)
            base_lp = response_logprobs(base, q_ids, q_mask, out.response_ids, out.response_mask,
                                        1.0)
        kls += (logq - (base_lp * out.response_mask).sum(-1)).tolist()        # (B,)
    rows = dist.gather([{"prompt": p, "response": r, "kl": k}
                        for p, r, k in zip(prompts, replies, kls)])
    summary = {"n": len(rows), "kl_to_base": sum(r["kl"] for r in rows) / len(rows),
               "eval_offset": run.p.eval_offset, "top_p": top_p}
    if run.p.toy:
        labels = [toy.judge(r["prompt"], r["response"]) for r in rows]
        summary.update({f"oracle/{k}": labels.count(k) / len(labels)
                        for k in ("harmless", "harmful", "invalid")})
    if dist.is_main():
        write_jsonl_atomic(out_path, rows)
    _summarise(run, f"sample-{name}", summary)
    return summary


def write_jsonl_atomic(path, rows):
    """Write rows to path through a temporary file and a rename: a reader sees the old file or the
    new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def stage_eval(run, name_a, name_b):
    """Pairwise win rate of policy A's replies over policy B's on the same prompts (paper Tables 2,
    3, 6), both read from their samples files, judged by the toy oracle, a preference model or an LM
    judge (--judge)."""
    paths = []
    for name in (name_a, name_b):
        path = os.path.join(run.dir, f"samples-{sample_name(run, name)}.jsonl")
        paths.append(run.need(path, f"sample --policy {name}"))
    spec = run.args.judge or ("oracle" if run.p.toy else None)
    if spec is None:
        raise SystemExit("error: --stage eval on a real preset needs --judge "
                         "(a preference-model or LM dir)")
    task = run.args.task or run.p.task
    result = evaluate.compare(paths[0], paths[1], evaluate.load_judge(spec, task, dist.device()),
                              column=task)
    dist.print0(evaluate.markdown_table([result["row"]]))
    summary = {k: result[k] for k in ("rate", "lo", "hi", "n", "wins", "ties", "losses", "mean_p")}
    summary.update(judge=spec, task=task)
    if dist.is_main():
        out = os.path.join(run.dir,
                           f"eval-{sample_name(run, name_a)}-vs-{sample_name(run, name_b)}.json")
        write_jsonl_atomic(out, [{**summary, "row": result["row"]}])
    _summarise(run, f"eval-{name_a}-vs-{name_b}", summary)
    return summary


def _summarise(run, stage, summary):
    """One line on stdout and one JSON line in out/<run>/summary.jsonl per finished stage
    (rank 0)."""
    if not dist.is_main():
        return
    os.makedirs(run.dir, exist_ok=True)
    line = {"stage": stage, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **_jsonable(summary)}
    with open(os.path.join(run.dir, "summary.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"[{stage}] " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in line.items() if k not in ("stage", "time")
                                     and not isinstance(v, (dict, list))))


def _jsonable(d):
    plain = (int, float, str, bool, list, dict, type(None))
    return {k: v for k, v in d.items() if isinstance(v, plain)}


def stage_all(run):
    """Toy world end to end; makes each missing artifact, reuses the ones already there (a killed
    simulation is continued where it stopped)."""
    if run.p.toy is None:
        raise SystemExit("error: --stage all runs the toy world; run the stages of a real preset "
                         "one by one")
    t0, prefs = time.time(), run.prefs("rlcd")

    def simulate_rlcd():
        run.args.resume = os.path.exists(partial_path(prefs))
        if os.path.exists(prefs) and not is_complete(prefs):
            raise SystemExit(f"error: {prefs} is not a finished simulation (edited, or made by an "
                             "older version); redo it with "
                             f"`python train.py --stage simulate{run.flags} --overwrite`")
        stage_simulate(run, "rlcd")

    steps = [("pretrain", os.path.join(run.base, "config.json"), lambda: stage_pretrain(run)),
             ("simulate", prefs, simulate_rlcd),
             ("pm", os.path.join(run.dir, "pm-rlcd", "config.json"), lambda: stage_pm(run, "rlcd")),
             ("ppo", os.path.join(run.dir, "ppo-rlcd", "policy", "config.json"),
              lambda: stage_ppo(run, "rlcd"))]
    for name, path, make in steps:
        done = is_complete(path) if name == "simulate" else os.path.exists(path)
        if done:
            dist.print0(f"[all] {name}: reusing {path}")
        else:
            make()
    run.args.overwrite = True          # the samples below always describe the current policies
    for name in ("base", "ppo-rlcd"):
        stage_sample(run, name)
    dist.print0(f"[all] done in {time.time() - t0:.0f} s")


def parse_args(argv=None):
    """Named flags choose what to run; `--<section>.<field>=value` overrides change how
    (apply_overrides)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="any config field: --rlcd.X=V, --pm.X=V, --sft.X=V, "
                                        "--ppo.X=V or --X=V for a preset field "
                                        "(e.g. --ppo.kl_coef=0.002 --n_eval=50)")
    ap.add_argument("--stage", required=True, choices=STAGES)
    ap.add_argument("--preset", default="toy", choices=sorted(PRESETS),
                    help="settings (default: toy world)")
    ap.add_argument("--out", default="out", help="parent of run directories")
    # not --run: torchrun's own parser takes it as an abbreviation of its --run-path
    ap.add_argument("--run-name", default=None, help="run directory name (default: the preset's)")
    ap.add_argument("--method", default="rlcd", choices=METHODS,
                    help="preference simulation method")
    ap.add_argument("--task", default=None,
                    choices=("harmless", "helpful", "harmless_helpful", "outline"),
                    help="affixes and instructions (simulate); the judge's question (eval)")
    ap.add_argument("--base", default=None, help="base LLaMA HF directory (real presets)")
    ap.add_argument("--prompts", default=None,
                    help="prompt file (HH-RLHF jsonl, {prompt} jsonl, premises) or toy:<split>")
    ap.add_argument("--eval-prompts", default=None,
                    help="--stage sample: held-out prompts (e.g. HH-RLHF test.jsonl)")
    ap.add_argument("--policy", default="ppo-rlcd",
                    help="--stage sample/eval: base, sft, ppo-<method> or a directory")
    ap.add_argument("--against", default="base", help="--stage eval: policy B (A is --policy)")
    ap.add_argument("--judge", default=None,
                    help="--stage eval: oracle (toy default), a preference-model dir or an LM dir")
    ap.add_argument("--hh-eval", default=None,
                    help="--stage pm: HH-RLHF jsonl whose first 2000 pairs measure agreement "
                         "with humans")
    ap.add_argument("--resume", action="store_true",
                    help="simulate: continue an interrupted file; pm, sft: continue the last "
                         "periodic checkpoint (--pm.save_every / --sft.save_every)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing output of this stage")
    args, rest = ap.parse_known_args(argv)
    args.overrides = _split_overrides(ap, rest)
    for flag in ("prompts", "eval_prompts", "base"):
        if getattr(args, flag) == "":
            ap.error(f"--{flag.replace('_', '-')}: empty; give a path or leave the flag out")
    return args


def _split_overrides(ap, rest):
    """['--ppo.kl_coef=0.1', '--n_eval', '5'] -> [('ppo.kl_coef', '0.1'), ('n_eval', '5')]."""
    pairs, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or len(item) == 2:
            ap.error(f"unrecognized argument: {item}")
        name, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 == len(rest) or rest[i + 1].startswith("--"):
                ap.error(f"--{name}: expected a value (--{name}=VALUE)")
            value, i = rest[i + 1], i + 1
        pairs.append((name, value))
        i += 1
    return pairs


def main(argv=None):
    args = parse_args(argv)
    preset = apply_overrides(PRESETS[args.preset], args.overrides)
    run = Run(args, preset)
    dist.init()
    # every setting checked before any work (one line on failure)
    try:
        check_batches(preset, dist.world_size())
    except ValueError as e:
        dist.cleanup()
        raise SystemExit(f"error: {e}") from None
    if dist.is_main():
        try:
            os.makedirs(run.dir, exist_ok=True)
            if not os.access(run.dir, os.W_OK):
                raise PermissionError(f"{run.dir} is not writable")
        except OSError as e:             # a read-only --out, or a file where a directory should be
            dist.cleanup()
            raise SystemExit(f"error: --out {args.out}: cannot write the run directory "
                             f"({e})") from None
        dist.print0(f"run {run.dir} | stage {args.stage} | preset {args.preset} "
                    f"| world {dist.world_size()}"
                    + "".join(f" | {k}={v}" for k, v in args.overrides))
        # the resolved config of every run, overrides applied
        with open(os.path.join(run.dir, f"config-{args.stage}.json"), "w") as f:
            json.dump({"args": vars(args), "preset": asdict(run.p)}, f, indent=1, default=str)
    stage = {"pretrain": lambda: stage_pretrain(run),
             "simulate": lambda: stage_simulate(run, args.method),
             "pm": lambda: stage_pm(run, args.method), "sft": lambda: stage_sft(run),
             "ppo": lambda: stage_ppo(run, args.method),
             "sample": lambda: stage_sample(run, args.policy),
             "eval": lambda: stage_eval(run, args.policy, args.against),
             "all": lambda: stage_all(run)}[args.stage]
    try:
        stage()
    # bad input, or a run that diverged (non-finite loss, KL past its bound): one line naming it
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
