"""The run directory the classroom notebooks share, and the one way they make what they need in it.

What: every artifact a notebook reads (the toy base model, preference pairs, a preference model, a
PPO policy) is made by `train.py`'s own stages, with the `fast` preset and the few overrides in
FLAGS, into <RUN>/nb/, where <RUN> is $NANORLCD_NOTEBOOK_RUN or notebooks/out. `build` makes an
artifact only if it is missing, so the notebooks can run in order (each reuses what the earlier
ones made) or any one alone (it makes what it needs first). Changing a setting here changes it for
every notebook; delete notebooks/out/ to rebuild from nothing.
Simplified: one run (`nb`), one process, the CPU.
Run: imported by the notebooks: `from artifacts import build, run_path`.
"""
import contextlib
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # train.py
import train  # noqa: E402

RUN = os.environ.get("NANORLCD_NOTEBOOK_RUN", "out")   # parent of the run directory
NAME = "nb"                                              # the run directory: <RUN>/nb
# Per stage: the overrides on top of the `fast` preset (apply_overrides in train.py)
FLAGS = {
    "pretrain": [],
    "simulate": [],
    # a point per step on the training curve, a held-out point every 2 steps
    "pm": ["--pm.log_every=1", "--pm.eval_every=2"],
    # a short run that reaches its peak lr, the policy saved after every step (harmless-rate curve)
    "ppo": ["--ppo.steps=5", "--ppo.warmup_steps=1", "--ppo.save_every=1"],
}


def run_path(*parts):
    """A path inside the shared run directory."""
    return os.path.join(RUN, NAME, *parts)


# stage (and method) -> the file whose presence means the artifact is complete
def _done_marker(stage, method):
    return {"pretrain": run_path("base", "model.safetensors"),
            "simulate": run_path(f"prefs-{method}.jsonl"),
            "pm": run_path(f"pm-{method}", "config.json"),
            "ppo": run_path(f"ppo-{method}", "policy", "config.json")}[stage]


def build(stage, method="rlcd"):
    """Run `python train.py --stage <stage> --preset fast ...` in this process unless its output
    exists; print the stage's one-line summary (the rest of its log is kept quiet). Returns the
    output's path relative to the run parent, e.g. 'nb/base' (no machine's absolute path)."""
    marker = _done_marker(stage, method)
    shown = os.path.relpath(os.path.dirname(marker) if stage != "simulate" else marker, RUN)
    if os.path.exists(marker):
        print(f"reusing {shown}")
        return shown
    args = ["--stage", stage, "--preset", "fast", "--run-name", NAME, *FLAGS[stage]]
    args += ["--method", method] if stage != "pretrain" else []
    # an interrupted pretraining leaves base/ without its weights: make it again from scratch
    if stage == "pretrain" and os.path.isdir(run_path("base")):
        args.append("--overwrite")
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train.main(args + ["--out", RUN])
    print(f"built {shown}: python train.py {' '.join(args)}")
    for line in log.getvalue().splitlines():
        if line.startswith("["):             # the stage's summary line (train._summarise)
            print(line[:400])
    return shown
