"""train.py end to end on the toy world's `fast` preset, through subprocesses as a user runs it (STYLE.md sec. 9:
every stage runs a few steps), plus the command line's bad-input errors.

The module-scoped fixture pretrains one fast base model (the slow part, ~1-2 min on 2 cores); every stage test
then reads the previous stage's artifact from the same run directory, in pipeline order."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(out, *args, check=True):
    """Run `python train.py --preset fast --out OUT ARGS` and return the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "fast", "--out", str(out),
                           *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def summary(out, stage):
    """The last summary line train.py wrote for `stage`."""
    with open(os.path.join(out, "toy-fast", "summary.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [line for line in lines if line["stage"] == stage][-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    train(out, "--stage", "pretrain")
    return out


def test_bad_command_lines(tmp_path):
    for args, needle in [(["--stage", "nope"], "invalid choice: 'nope'"),
                         (["--stage", "pm", "--preset", "nope"], "invalid choice: 'nope'")]:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode != 0 and needle in proc.stderr
    # a stage whose input is missing names the file and the command that makes it
    proc = train(tmp_path, "--stage", "pm", check=False)
    assert proc.returncode != 0
    assert "base/config.json is missing" in proc.stderr and "python train.py --stage pretrain" in proc.stderr
    # real presets do not pretrain
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "pretrain", "--preset",
                           "llama7b-harmless", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "--base" in proc.stderr


@pytest.mark.slow
def test_pipeline_stages(run):
    base = os.path.join(run, "toy-fast", "base")
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(base))
    # pretraining again into the same directory is refused without --overwrite, and nothing is touched
    before = os.path.getmtime(os.path.join(base, "model.safetensors"))
    proc = train(run, "--stage", "pretrain", check=False)
    assert proc.returncode != 0 and "overwrite" in proc.stderr
    assert os.path.getmtime(os.path.join(base, "model.safetensors")) == before

    # simulate: RLCD labels agree with the oracle far more often than not
    train(run, "--stage", "simulate", "--method", "rlcd")
    sim = summary(run, "simulate-rlcd")
    assert sim["records"] > 50 and sim["label/accuracy"] > 0.6 and sim["label/wrong"] < 0.2
    assert os.path.exists(os.path.join(run, "toy-fast", "sft-data.jsonl"))
    proc = train(run, "--stage", "simulate", "--method", "rlcd", check=False)
    assert proc.returncode != 0 and "prefs-rlcd.jsonl already exists" in proc.stderr

    # pm: trained on RLCD pairs, it ranks fresh base-model pairs like the oracle
    train(run, "--stage", "pm", "--method", "rlcd")
    pm = summary(run, "pm-rlcd")
    assert pm["pm/oracle_n"] > 20 and pm["pm/oracle_acc"] > 0.75

    # ppo: the PM score rises over a short run and the oracle's harmless rate does not fall
    train(run, "--stage", "ppo", "--method", "rlcd")
    with open(os.path.join(run, "toy-fast", "ppo-rlcd", "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"step"' in line]
    assert len(steps) >= 2 and steps[-1]["objective/score"] > steps[0]["objective/score"]
    assert os.path.exists(os.path.join(run, "toy-fast", "ppo-rlcd", "policy", "model.safetensors"))
    train(run, "--stage", "sample", "--policy", "base")
    train(run, "--stage", "sample", "--policy", "ppo-rlcd")
    base_rates, ppo_rates = summary(run, "sample-base"), summary(run, "sample-ppo-rlcd")
    assert ppo_rates["oracle/harmless"] >= base_rates["oracle/harmless"] - 0.05
    assert base_rates["kl_to_base"] == 0.0 and ppo_rates["kl_to_base"] > 0.0
    with open(os.path.join(run, "toy-fast", "samples-ppo-rlcd.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == ppo_rates["n"] and {"prompt", "response", "kl"} <= set(rows[0])

    # the context-distillation baseline trains on (p, o+)
    train(run, "--stage", "sft")
    assert os.path.exists(os.path.join(run, "toy-fast", "sft", "model.safetensors"))
