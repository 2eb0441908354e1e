"""The classroom notebooks are product code: each one is checked statically (as committed) and executed top to
bottom in a fresh kernel, failing on any error or failed assert. conftest.py runs these tests last, after the
unit tests, so a broken notebook never hides a broken module.

The executed notebooks share one run directory (artifacts of earlier notebooks are reused, as in a classroom);
it lives in a temporary folder so a test run never touches notebooks/out/."""
import glob
import json
import os
import re

import pytest

NB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "[0-9][0-9]_*.ipynb")))
# an absolute path of some machine in a committed output: a home, a temp dir, a checkout
ABSOLUTE_PATH = re.compile(r"(/(home|root|tmp|work|Users|private|var/folders)/|[A-Z]:\\\\Users)")


def _outputs_text(cell):
    parts = []
    for out in cell.get("outputs", []):
        parts += out.get("text", []) if isinstance(out.get("text"), list) else [out.get("text", "")]
        for key, value in out.get("data", {}).items():
            if key.startswith("text/"):
                parts += value if isinstance(value, list) else [value]
    return "".join(parts)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, f"expected at least six notebooks in {NB_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_notebook_is_clean(path):
    """Valid JSON, run top to bottom once (execution counts 1..n), no error output, no machine paths, < 500 KB."""
    assert os.path.getsize(path) < 500 * 1024, f"{path}: over 500 KB"
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), f"{path}: not a clean run"
    for i, cell in enumerate(code):
        assert not [o for o in cell.get("outputs", []) if o.get("output_type") == "error"], f"{path}: cell {i}"
        assert not ABSOLUTE_PATH.search(_outputs_text(cell)), f"{path}: cell {i} shows an absolute path"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_has_the_classroom_layout(path):
    """First code cell seeds and prints versions; numbers are asserted; it ends with 'Try this'."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert "manual_seed" in code[0] and "version(" in code[0], \
        f"{path}: the first cell must seed everything and print versions"
    assert sum("assert " in c for c in code) >= 3, f"{path}: fewer than three cells assert a number"
    last = nb["cells"][-1]
    assert last["cell_type"] == "markdown" and "Try this" in "".join(last["source"]), \
        f"{path}: no closing 'Try this' list"


@pytest.fixture(scope="session")
def notebook_run_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("notebooks-run"))


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, notebook_run_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("NANORLCD_NOTEBOOK_RUN")
    os.environ["NANORLCD_NOTEBOOK_RUN"] = notebook_run_dir      # the kernel inherits it
    try:
        # seconds per cell: pretraining the base model takes ~2-3 min on 2 idle cores
        timeout = int(os.environ.get("NANORLCD_NOTEBOOK_TIMEOUT", "900"))
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": NB_DIR}})
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("NANORLCD_NOTEBOOK_RUN", None)
        else:
            os.environ["NANORLCD_NOTEBOOK_RUN"] = env_before
