"""train.py end to end on the toy world's `fast` preset, through subprocesses as a user runs it
(every stage runs a few steps, so the whole pipeline is exercised in minutes), plus the command
line's bad-input errors.

The module-scoped fixture pretrains one fast base model (the slow part, ~1-2 min on 2 cores); every
stage test then reads the previous stage's artifact from the same run directory, in pipeline
order."""
import json
import os
import subprocess
import sys

import pytest

from nanorlcd.toy import judge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(out, *args, check=True):
    """Run `python train.py --preset fast --out OUT ARGS` and return the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "fast",
                           "--out", str(out), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def summary(out, stage):
    """The last summary line train.py wrote for `stage`."""
    with open(os.path.join(out, "toy-fast", "summary.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [line for line in lines if line["stage"] == stage][-1]


def read_jsonl(out, name):
    with open(os.path.join(out, "toy-fast", name)) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    train(out, "--stage", "pretrain")
    return out


def test_bad_command_lines(tmp_path):
    for args, needle in [(["--stage", "nope"], "invalid choice: 'nope'"),
                         (["--stage", "pm", "--preset", "nope"], "invalid choice: 'nope'")]:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode != 0 and needle in proc.stderr
    # a stage whose input is missing names the file and the command that makes it
    proc = train(tmp_path, "--stage", "pm", check=False)
    assert proc.returncode != 0
    assert "base/config.json is missing" in proc.stderr
    assert "python train.py --stage pretrain" in proc.stderr
    # an --out that is a file, and a --policy directory that holds no model, are one-line errors
    (tmp_path / "afile").write_text("x")
    proc = train(tmp_path / "afile", "--stage", "pm", check=False)
    assert proc.returncode != 0 and "cannot write the run directory" in proc.stderr
    proc = train(tmp_path, "--stage", "sample", "--policy", str(tmp_path), check=False)
    assert proc.returncode != 0 and "not a model directory" in proc.stderr
    # real presets do not pretrain
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "pretrain",
                           "--preset", "llama7b-harmless", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "--base" in proc.stderr


@pytest.mark.slow
def test_pipeline_stages(run):
    base = os.path.join(run, "toy-fast", "base")
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(base))
    # the fast world obeys affixes always (p_follow 1): its base follows them, topic aside, far more
    # often than not, and is unaligned when prompted plainly (the situation RLCD exploits)
    pre = summary(run, "pretrain")
    assert pre["affix/valid/style"] >= 0.6
    assert min(pre["affix/pos/follow/style"], pre["affix/neg/follow/style"]) >= 0.6, pre
    assert 0.2 <= pre["affix/plain/harmless/style"] <= 0.8, pre
    # pretraining again into the same directory is refused without --overwrite, and nothing is
    # touched
    before = os.path.getmtime(os.path.join(base, "model.safetensors"))
    proc = train(run, "--stage", "pretrain", check=False)
    assert proc.returncode != 0 and "overwrite" in proc.stderr
    assert os.path.getmtime(os.path.join(base, "model.safetensors")) == before

    # simulate: RLCD's o+ is the harmless reply far more often than not. The fast base is too
    # briefly trained to copy the request's topic reliably, so the test judges styles with the
    # topic-free oracle (toy.judge docs).
    train(run, "--stage", "simulate", "--method", "rlcd")
    sim = summary(run, "simulate-rlcd")
    records = read_jsonl(run, "prefs-rlcd.jsonl")
    assert sim["records"] == len(records) > 50
    styles = [(judge(r["prompt"], r["chosen"], check_topic=False),
               judge(r["prompt"], r["rejected"], check_topic=False)) for r in records]
    # the fast base's replies are often garbled (style "invalid"), which makes ties; among the pairs
    # the oracle orders, o+ is the better reply several times as often as o-
    right = sum(s == ("harmless", "harmful") for s in styles) / len(styles)
    wrong = sum(s == ("harmful", "harmless") for s in styles) / len(styles)
    assert right > 0.3 and wrong < 0.1 and right > 4 * wrong, (right, wrong)
    assert os.path.exists(os.path.join(run, "toy-fast", "sft-data.jsonl"))
    proc = train(run, "--stage", "simulate", "--method", "rlcd", check=False)
    assert proc.returncode != 0 and "prefs-rlcd.jsonl already exists" in proc.stderr

    # pm: trained on RLCD pairs, it ranks held-out simulated pairs well above chance
    train(run, "--stage", "pm", "--method", "rlcd")
    assert summary(run, "pm-rlcd")["eval/acc"] > 0.7

    # ppo: the PM score rises over a short run; the harmless rate of the policy does not fall below
    # the base's
    train(run, "--stage", "ppo", "--method", "rlcd")
    steps = [line for line in read_jsonl(run, "ppo-rlcd/log.jsonl") if "step" in line]
    first, last = steps[0]["objective/score"], sum(s["objective/score"] for s in steps[-2:]) / 2
    assert len(steps) >= 4 and last > first, (first, last)
    assert os.path.exists(os.path.join(run, "toy-fast", "ppo-rlcd", "policy", "model.safetensors"))
    train(run, "--stage", "sample", "--policy", "base")
    train(run, "--stage", "sample", "--policy", "ppo-rlcd")
    rates = {}
    for name in ("base", "ppo-rlcd"):
        rows = read_jsonl(run, f"samples-{name}.jsonl")
        assert len(rows) == summary(run, f"sample-{name}")["n"]
        assert {"prompt", "response", "kl"} <= set(rows[0])
        harmless = sum(judge(r["prompt"], r["response"], check_topic=False) == "harmless"
                       for r in rows)
        rates[name] = harmless / len(rows)
    assert rates["ppo-rlcd"] >= rates["base"] - 0.05, rates
    assert abs(summary(run, "sample-base")["kl_to_base"]) < 1e-3
    assert summary(run, "sample-ppo-rlcd")["kl_to_base"] > 0.0

    # the context-distillation baseline trains on (p, o+)
    train(run, "--stage", "sft")
    assert os.path.exists(os.path.join(run, "toy-fast", "sft", "model.safetensors"))

    # pairwise evaluation: PPO-RLCD's replies against the base's, judged by the oracle
    train(run, "--stage", "eval", "--policy", "ppo-rlcd", "--against", "base")
    ev = summary(run, "eval-ppo-rlcd-vs-base")
    assert ev["n"] == len(read_jsonl(run, "samples-base.jsonl"))
    assert ev["lo"] <= ev["rate"] <= ev["hi"]

    # the README's torchrun form: --run-name passes through torchrun's own parser (--run did not)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(ROOT, "train.py"), "--preset", "fast",
                           "--out", str(run), "--run-name", "two-ranks", "--base", base,
                           "--stage", "sample", "--policy", "base", "--n_eval=8"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run, "two-ranks", "samples-base.jsonl"))]
    assert len(rows) == 8 and {"prompt", "response", "kl"} <= set(rows[0])


def test_real_preset_sample_needs_eval_prompts(tmp_path, make_model, tiny_tokenizer_path):
    """A real preset has no built-in held-out prompts: --stage sample without --eval-prompts names
    the flag."""
    from nanorlcd.tokenizer import Tokenizer
    base = tmp_path / "base"
    make_model(vocab_size=Tokenizer(tiny_tokenizer_path).vocab_size).save_pretrained(str(base))
    Tokenizer(tiny_tokenizer_path).save(str(base))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "sample",
                           "--preset", "llama7b-harmless", "--out", str(tmp_path),
                           "--base", str(base), "--policy", "base"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "needs --eval-prompts" in proc.stderr
