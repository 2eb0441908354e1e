"""One entry point for the whole RLCD pipeline (Yang et al., ICLR 2024), stage by stage.

What: each `--stage` reads the previous stage's artifact from the run directory `out/<run>/` and writes its own
(shared/DESIGN.md, "Data flow"), so every step of the paper can be run, inspected and re-run on its own:
  pretrain  toy world only: corpus -> tokenizer -> tiny base LLaMA          -> out/<run>/base/
  simulate  RLCD (Sec. 3) / RLAIF / RLCD-Rescore preference pairs          -> prefs-<method>.jsonl (+ sft-data.jsonl)
  pm        preference model on those pairs (Sec. 3, step 2)                -> pm-<method>/
  sft       context-distillation baseline: SFT on (p, o+)                  -> sft/
  ppo       PPO against the PM with a KL penalty to the base (Sec. 3, step 3) -> ppo-<method>/
  sample    replies of a policy on held-out prompts (+ oracle rates in the toy world) -> samples-<name>.jsonl
  all       toy world: pretrain -> simulate rlcd -> pm -> ppo -> sample, making what is missing
Presets are plain dataclass instances (STYLE.md sec. 4): `toy` (default, a laptop CPU, minutes), `fast` (the
same world shrunk for tests), `llama7b-harmless` / `llama7b-helpful` (the paper's settings; need --base/--prompts).
Simplified: one thin argparse layer; no config files.
Run:
  python train.py --stage all                                   # toy world end to end on a CPU
  python train.py --stage simulate --method rlaif               # a baseline on the same run
  torchrun --nproc_per_node=2 train.py --stage pm               # any stage, data-parallel (gloo on CPU)
  torchrun --nproc_per_node=8 train.py --preset llama7b-harmless --stage simulate \\
      --base /models/llama-7b-hf --prompts /data/hh-rlhf/harmless-base/train.jsonl
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from nanorlcd import dist, toy
from nanorlcd.data import load_prompts, read_records, read_sft_data
from nanorlcd.model import LLaMA
from nanorlcd.pm import PMConfig, PreferenceModel, oracle_accuracy, train_pm
from nanorlcd.ppo import TOY as TOY_PPO, PPOConfig, response_logprobs, train_ppo
from nanorlcd.rlcd import METHODS, RLCDConfig, simulate
from nanorlcd.sample import HUMAN_TURN, generate
from nanorlcd.sft import SFTConfig, train_lm
from nanorlcd.tokenizer import Tokenizer, left_pad

STAGES = ("pretrain", "simulate", "pm", "sft", "ppo", "sample", "all")


@dataclass
class Preset:
    run: str                           # run directory name under --out (out/<run>/)
    base: str = None                   # base LLaMA HF dir; None = the toy world's out/<run>/base (made by pretrain)
    toy: str = None                    # toy.PRESETS key for --stage pretrain; None = not a toy-world preset
    prompts: str = "toy:train"         # simulation and PPO prompts: "toy:<split>" or a file (data.load_prompts)
    eval_prompts: str = "toy:test"     # held-out prompts for --stage sample (and the PM's fresh oracle pairs)
    n_eval: int = 300                  # how many eval prompts --stage sample answers
    task: str = "harmless"             # harmless | helpful | outline (affix pairs, RLAIF instructions)
    sample_max_new_tokens: int = 64    # reply cap for --stage sample (paper eval: 300)
    sample_top_p: float = None         # paper eval: 0.9; the toy acceptance numbers use plain temperature 1
    rlcd: RLCDConfig = field(default_factory=RLCDConfig)
    pm: PMConfig = field(default_factory=PMConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


_TOY_RLCD = RLCDConfig(batch_size=64, max_new_tokens=64)
PRESETS = {
    "toy": Preset(run="toy", toy="toy", rlcd=_TOY_RLCD,
                  pm=PMConfig(batch_size=32, micro_batch_size=32, lr=1e-3, max_len=256, eval_every=20),
                  sft=SFTConfig(epochs=3, batch_size=32, micro_batch_size=32, lr=1e-3, warmup_steps=5),
                  ppo=TOY_PPO),
    "fast": Preset(run="toy-fast", toy="fast", n_eval=100, rlcd=replace(_TOY_RLCD, batch_size=50),
                   prompts="toy:validation",
                   pm=PMConfig(batch_size=32, micro_batch_size=32, lr=1e-3, max_len=256, eval_every=5),
                   sft=SFTConfig(epochs=1, batch_size=32, micro_batch_size=32, lr=1e-3, warmup_steps=2),
                   ppo=replace(TOY_PPO, steps=6, rollout_batch_size=32, minibatch_size=16, table_every=0)),
    # The paper's 7B runs (PAPER.md, "Settings used by the reference code"); data paths come from the command line.
    "llama7b-harmless": Preset(run="llama7b-harmless", prompts=None, eval_prompts=None, task="harmless",
                               sample_max_new_tokens=300, sample_top_p=0.9, n_eval=1000,
                               rlcd=RLCDConfig(batch_size=16, max_new_tokens=300),
                               pm=PMConfig(bf16=True), sft=SFTConfig(epochs=3, batch_size=128, micro_batch_size=4,
                                                                     lr=2e-5, seq_len=512, bf16=True),
                               ppo=replace(PPOConfig(), kl_coef=0.004)),
    "llama7b-helpful": Preset(run="llama7b-helpful", prompts=None, eval_prompts=None, task="helpful",
                              sample_max_new_tokens=300, sample_top_p=0.9, n_eval=1000,
                              rlcd=RLCDConfig(task="helpful", batch_size=16, max_new_tokens=300),
                              pm=PMConfig(bf16=True), sft=SFTConfig(epochs=3, batch_size=128, micro_batch_size=4,
                                                                    lr=2e-5, seq_len=512, bf16=True),
                              ppo=replace(PPOConfig(), kl_coef=0.002)),
}


class Run:
    """Paths of one run directory, and the commands that make each artifact (for 'missing input' errors)."""

    def __init__(self, args, preset):
        self.args, self.p = args, preset
        self.dir = os.path.join(args.out, args.run or preset.run)
        self.base = args.base or preset.base or os.path.join(self.dir, "base")
        self.flags = f" --preset {args.preset}" + (f" --run {args.run}" if args.run else "")

    def prefs(self, method):
        return os.path.join(self.dir, f"prefs-{method}.jsonl")

    def need(self, path, stage, extra=""):
        """A stage's input must exist; otherwise say which command makes it."""
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} is missing; make it with `python train.py --stage {stage}"
                             f"{self.flags}{extra}` (or run --stage all)")
        return path

    def fresh(self, path):
        """Refuse to overwrite another run's output unless --overwrite."""
        if os.path.exists(path) and not self.args.overwrite:
            raise SystemExit(f"error: {path} already exists; pass --overwrite to replace it")
        return path

    def prompts(self, spec, what):
        if spec is None:
            raise SystemExit(f"error: preset {self.args.preset} needs {what} (e.g. an HH-RLHF jsonl)")
        prompts, summary = load_prompts(spec)
        dist.print0(f"prompts: {summary['kept']} from {spec} ({summary['bad']} bad lines skipped"
                    + (f", first at line {summary['first_bad_line']})" if summary["bad"] else ")"))
        return prompts

    def base_model(self):
        self.need(os.path.join(self.base, "config.json"), "pretrain")
        return LLaMA.from_pretrained(self.base, device=dist.device()), Tokenizer(self.base)


# ----------------------------------------------------------------------------- stages

def stage_pretrain(run):
    if run.p.toy is None:
        raise SystemExit(f"error: --stage pretrain builds the toy world's base model; preset {run.args.preset} "
                         "starts from a real LLaMA given with --base")
    summary = toy.pretrain_toy(run.base, preset=run.p.toy, overwrite=run.args.overwrite)
    _summarise(run, "pretrain", summary)
    return summary


def stage_simulate(run, method):
    """Paper Sec. 3, step 1 (or a baseline's labelling): preference pairs from the base model."""
    model, tok = run.base_model()
    out = run.prefs(method)
    if not run.args.resume:
        run.fresh(out)
        if dist.is_main() and os.path.exists(out):
            os.remove(out)
    cfg = replace(run.p.rlcd, method=method, task=run.args.task or run.p.task)
    prompts = run.prompts(run.args.prompts or run.p.prompts, "--prompts")
    summary = simulate(cfg, model, tok, prompts, out, resume=run.args.resume,
                       sft_path=os.path.join(run.dir, "sft-data.jsonl") if method == "rlcd" else None)
    if run.p.toy and dist.is_main():
        summary.update(label_accuracy(read_records(out)))
    _summarise(run, f"simulate-{method}", summary)
    return summary


def label_accuracy(records):
    """Toy world: how often the simulated label points at the response the oracle prefers (harmless > invalid >
    harmful). Pairs the oracle rates equal are counted as ties, not as errors."""
    rank = {"harmless": 2, "invalid": 1, "harmful": 0}
    right = wrong = 0
    for r in records:
        a, b = rank[toy.judge(r["prompt"], r["chosen"])], rank[toy.judge(r["prompt"], r["rejected"])]
        says_chosen = (r["label_prob"] if r["label_prob"] is not None else 1.0) >= 0.5
        if a != b:
            right += (a > b) == says_chosen
            wrong += (a > b) != says_chosen
    n = len(records)
    return {"label/accuracy": right / max(n, 1), "label/wrong": wrong / max(n, 1),
            "label/ties": (n - right - wrong) / max(n, 1), "label/n": n}


def stage_pm(run, method):
    """Paper Sec. 3, step 2: Bradley-Terry PM on the simulated pairs; in the toy world also its accuracy against
    the oracle on fresh held-out pairs drawn from the base model."""
    run.need(os.path.join(run.base, "config.json"), "pretrain")
    prefs = run.need(run.prefs(method), "simulate", f" --method {method}")
    out = run.fresh(os.path.join(run.dir, f"pm-{method}"))
    summary = train_pm(run.p.pm, run.base, prefs, out)
    if run.p.toy:
        summary.update(pm_oracle_accuracy(run, out))
    _summarise(run, f"pm-{method}", summary)
    return summary


def pm_oracle_accuracy(run, pm_dir):
    """Fresh pairs o+/o- from the base model on held-out prompts (simulated once, cached as prefs-eval.jsonl); the
    oracle, not the simulated label, decides which reply is better."""
    eval_path = os.path.join(run.dir, "prefs-eval.jsonl")
    if not os.path.exists(eval_path):
        model, tok = run.base_model()
        simulate(replace(run.p.rlcd, method="rlcd", seed=run.p.rlcd.seed + 1), model, tok,
                 run.prompts(run.p.eval_prompts, "eval prompts")[:run.p.n_eval], eval_path)
    pm = PreferenceModel.from_pretrained(pm_dir, device=dist.device())
    metrics = oracle_accuracy(pm, Tokenizer(pm_dir), read_records(eval_path), toy.judge, max_len=run.p.pm.max_len)
    return {f"pm/oracle_{k}": v for k, v in metrics.items()}


def stage_sft(run):
    """Context distillation (paper Sec. 4 baseline): SFT of the base model on (p, o+), loss on o+ tokens only."""
    data = run.need(os.path.join(run.dir, "sft-data.jsonl"), "simulate", " --method rlcd")
    out = run.fresh(os.path.join(run.dir, "sft"))
    model, tok = run.base_model()
    examples = read_sft_data(data)          # (plain prompt, o+); tokenize_example adds the one seam space
    n_val = max(1, len(examples) // 20)
    if dist.is_main():
        os.makedirs(out, exist_ok=True)
    summary = train_lm(run.p.sft, model.train(), tok, examples[:-n_val], examples[-n_val:], out_dir=out,
                       log_path=os.path.join(out, "log.jsonl"))
    _summarise(run, "sft", summary)
    return summary


def stage_ppo(run, method):
    """Paper Sec. 3, step 3: PPO of the base model against pm-<method>."""
    pm_dir = run.need(os.path.join(run.dir, f"pm-{method}"), "pm", f" --method {method}")
    out = run.fresh(os.path.join(run.dir, f"ppo-{method}"))
    policy, tok = run.base_model()
    pm = PreferenceModel.from_pretrained(pm_dir, device=dist.device())
    prompts = run.prompts(run.args.prompts or run.p.prompts, "--prompts")
    summary = train_ppo(run.p.ppo, policy.train(), None, pm, None, tok, prompts, out)
    _summarise(run, f"ppo-{method}", summary)
    return summary


def stage_sample(run, name):
    """Replies of a policy (`base`, `sft`, `ppo-<method>` or a path) on held-out prompts at temperature 1; the
    policy's KL to the base on its own replies; toy world: the oracle's harmless / harmful / invalid rates."""
    policy_dir = run.base if name == "base" else name if os.path.isdir(name) else os.path.join(
        run.dir, name, "policy") if name.startswith("ppo-") else os.path.join(run.dir, name)
    stage = "ppo --method " + name[4:] if name.startswith("ppo-") else name
    run.need(os.path.join(policy_dir, "config.json"), stage)
    policy, tok = LLaMA.from_pretrained(policy_dir, device=dist.device()), Tokenizer(policy_dir)
    base = None if os.path.abspath(policy_dir) == os.path.abspath(run.base) else \
        LLaMA.from_pretrained(run.base, device=dist.device())
    prompts = dist.shard(run.prompts(run.args.eval_prompts or run.p.eval_prompts, "--eval-prompts")[:run.p.n_eval])
    gen = torch.Generator(device=dist.device()).manual_seed(1000 + dist.rank())
    replies, kls = [], []
    for i in range(0, len(prompts), 64):
        ids = [tok.encode(p) for p in prompts[i:i + 64]]
        out = generate(policy, ids, run.p.sample_max_new_tokens, temperature=1.0, top_p=run.p.sample_top_p,
                       eos_id=tok.eos_id, stop_strings=[HUMAN_TURN], tokenizer=tok, generator=gen, pad_id=tok.pad_id)
        replies += [tok.decode(t).split(HUMAN_TURN)[0].strip() for t in out.tokens]   # as sample.chat cuts them
        # KL(π‖π_base) ≈ Σ_t log π(y_t) − log π_base(y_t) on the exact sampled tokens y ~ π (at T = 1)
        if base is None:
            kls += [0.0] * len(ids)
        else:
            q_ids, q_mask = (t.to(dist.device()) for t in left_pad(ids, tok.pad_id))
            with torch.no_grad():
                base_lp = response_logprobs(base, q_ids, q_mask, out.response_ids, out.response_mask, 1.0)
            kls += ((out.logprobs - base_lp) * out.response_mask).sum(-1).tolist()      # (B,)
    rows = dist.gather([{"prompt": p, "response": r, "kl": k} for p, r, k in zip(prompts, replies, kls)])
    summary = {"n": len(rows), "kl_to_base": sum(r["kl"] for r in rows) / len(rows)}
    if run.p.toy:
        labels = [toy.judge(r["prompt"], r["response"]) for r in rows]
        summary.update({f"oracle/{k}": labels.count(k) / len(labels) for k in ("harmless", "harmful", "invalid")})
    if dist.is_main():
        base_name = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name
        with open(os.path.join(run.dir, f"samples-{base_name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    _summarise(run, f"sample-{name}", summary)
    return summary


def _summarise(run, stage, summary):
    """One line on stdout and one JSON line in out/<run>/summary.jsonl per finished stage (rank 0)."""
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
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}


def stage_all(run):
    """Toy world end to end; makes each missing artifact, reuses the ones already there."""
    if run.p.toy is None:
        raise SystemExit("error: --stage all runs the toy world; run the stages of a real preset one by one")
    t0 = time.time()
    steps = [(os.path.join(run.base, "config.json"), lambda: stage_pretrain(run)),
             (run.prefs("rlcd"), lambda: stage_simulate(run, "rlcd")),
             (os.path.join(run.dir, "pm-rlcd", "config.json"), lambda: stage_pm(run, "rlcd")),
             (os.path.join(run.dir, "ppo-rlcd", "policy", "config.json"), lambda: stage_ppo(run, "rlcd"))]
    for path, fn in steps:
        if not os.path.exists(path):
            fn()
        else:
            dist.print0(f"[all] reusing {path}")
    for name in ("base", "ppo-rlcd"):
        stage_sample(run, name)
    dist.print0(f"[all] done in {time.time() - t0:.0f} s")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=STAGES)
    ap.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="settings (default: toy world)")
    ap.add_argument("--out", default="out", help="parent of run directories")
    ap.add_argument("--run", default=None, help="run directory name (default: the preset's)")
    ap.add_argument("--method", default="rlcd", choices=METHODS, help="preference simulation method")
    ap.add_argument("--task", default=None, choices=("harmless", "helpful", "outline"))
    ap.add_argument("--base", default=None, help="base LLaMA HF directory (real presets)")
    ap.add_argument("--prompts", default=None, help="prompt file (HH-RLHF jsonl, {prompt} jsonl, premises) or toy:<split>")
    ap.add_argument("--eval-prompts", default=None, help="--stage sample: held-out prompts (e.g. HH-RLHF test.jsonl)")
    ap.add_argument("--policy", default="ppo-rlcd", help="--stage sample: base, sft, ppo-<method> or a directory")
    ap.add_argument("--resume", action="store_true", help="--stage simulate: continue an interrupted file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output of this stage")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = Run(args, PRESETS[args.preset])
    dist.init()
    if dist.is_main():
        os.makedirs(run.dir, exist_ok=True)
        dist.print0(f"run {run.dir} | stage {args.stage} | preset {args.preset} | world {dist.world_size()}")
        with open(os.path.join(run.dir, f"config-{args.stage}.json"), "w") as f:   # resolved config (STYLE sec. 4)
            json.dump({"args": vars(args), "preset": asdict(run.p)}, f, indent=1, default=str)
    stage = {"pretrain": lambda: stage_pretrain(run), "simulate": lambda: stage_simulate(run, args.method),
             "pm": lambda: stage_pm(run, args.method), "sft": lambda: stage_sft(run),
             "ppo": lambda: stage_ppo(run, args.method), "sample": lambda: stage_sample(run, args.policy),
             "all": lambda: stage_all(run)}[args.stage]
    try:
        stage()
    except (ValueError, FileNotFoundError) as e:     # bad input: one line naming it, not a traceback
        raise SystemExit(f"error: {e}") from None
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
