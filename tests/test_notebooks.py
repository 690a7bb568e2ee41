"""The notebooks: committed clean, and executed top to bottom in order with tiny parameters.

Execution follows papermill's convention without needing papermill: a cell with the test's
values is inserted after the cell tagged ``parameters``. The notebooks run in one temporary
folder, in order, because each uses what the one before wrote (02 trains and saves weights,
03 evaluates that run, 04 predicts with the weights, 05 scores it on BUS-BRA and trains a joint
model). The data is the real BUSI with a small ``limit`` when ``BUSI_DATA`` is set, else the
synthetic BUSI-like folder of ``conftest.py``; likewise BUS-BRA with ``BUSBRA_DATA``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from busi.utils.paths import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
ORDER = ("01_data", "02_train", "03_evaluate", "04_predict", "05_cross_dataset")
CELL_TIMEOUT = 600  # seconds per cell; the tiny runs take a few
TENSORFLOW_IMPORT = re.compile(
    r"^\s*(import|from)\s+(tensorflow|tf_keras|keras|segmentation_models)\b", re.MULTILINE
)


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def parameters_cell(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{nb.metadata.get('name')}: want one cell tagged 'parameters'"
    return tagged[0]


def parameter_names(nb: nbformat.NotebookNode) -> set[str]:
    source = nb.cells[parameters_cell(nb)].source
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def inject(nb: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Insert a cell assigning ``values`` after the parameters cell (as papermill does)."""
    unknown = sorted(set(values) - parameter_names(nb))
    assert not unknown, f"not parameters of the notebook: {unknown}"
    source = "# Parameters\n" + "".join(f"{key} = {value!r}\n" for key, value in values.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters_cell(nb) + 1, cell)
    return nb


# ---------------------------------------------------------------------- committed files


def test_the_notebooks_are_those_of_the_readme():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(ORDER)
    readme = (ROOT / "README.md").read_text()
    for name in ORDER:
        assert f"notebooks/{name}.ipynb" in readme, f"{name} is not in the README"


@pytest.mark.parametrize("name", ORDER)
def test_committed_without_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    for number, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"{name}.ipynb cell {number}"
        assert cell.outputs == [], f"{where} has outputs; clear them before committing"
        assert cell.execution_count is None, f"{where} has an execution count"
        assert "execution" not in cell.metadata, f"{where} has execution timings"


@pytest.mark.parametrize("name", ORDER)
def test_shape_of_a_notebook(name):
    """Header, Colab cell first, a parameters cell of literals, busi before TensorFlow."""
    nb = read(name)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for part in ("**Purpose.**", "**Inputs.**", "**Outputs.**"):
        assert part in nb.cells[0].source, f"{name}: header lacks {part}"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "google.colab" in code[0].source and "%pip install" in code[0].source
    parameters = nb.cells[parameters_cell(nb)].source
    for node in ast.parse(parameters).body:  # literals only, so values can be replaced
        assert isinstance(node, ast.Assign), f"{name}: parameters cell holds {ast.dump(node)}"
        ast.literal_eval(node.value)
    sources = [cell.source for cell in code]
    first_busi = next(i for i, s in enumerate(sources) if re.search(r"^import busi$", s, re.M))
    assert not any(TENSORFLOW_IMPORT.search(s) for s in sources[: first_busi + 1])
    for number, cell in enumerate(nb.cells[1:], start=1):  # prose before each code cell
        if cell.cell_type == "code":
            assert nb.cells[number - 1].cell_type == "markdown", f"{name}: cell {number}"


# ------------------------------------------------------------------------ sources


def make_notebooks():
    """tools/make_notebooks.py as a module (tools/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "tools" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebooks_are_made_from_their_sources():
    tool = make_notebooks()
    assert [path.stem for path in tool.sources()] == list(ORDER)
    assert tool.stale() == [], "edit the .py sources, then run python tools/make_notebooks.py"


def test_a_notebook_that_differs_from_its_source_is_named(tmp_path, capsys):
    tool = make_notebooks()
    for path in [*NOTEBOOK_DIR.glob("*.py"), *NOTEBOOK_DIR.glob("*.ipynb")]:
        shutil.copy(path, tmp_path / path.name)
    assert tool.stale(tmp_path) == []
    # a cell edited in the notebook only, and a cell edited in the source only
    nb = nbformat.read(tmp_path / "03_evaluate.ipynb", as_version=4)
    nb.cells[-1].source += "\nprint('edited in Jupyter')"
    nbformat.write(nb, tmp_path / "03_evaluate.ipynb")
    source = tmp_path / "05_cross_dataset.py"
    source.write_text(source.read_text().replace("N_FAILURES = 4", "N_FAILURES = 5", 1))
    assert tool.stale(tmp_path) == ["03_evaluate.ipynb", "05_cross_dataset.ipynb"]
    assert tool.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "03_evaluate.ipynb differs" in err and "05_cross_dataset.ipynb differs" in err
    assert "01_data" not in err
    assert tool.main(["--dir", str(tmp_path)]) == 0  # written again from the sources
    assert tool.stale(tmp_path) == []
    assert "N_FAILURES = 5" in nbformat.read(tmp_path / "05_cross_dataset.ipynb", 4).cells[4].source


# ------------------------------------------------------------------------------ Colab


def tool_repo() -> str:
    """``REPO`` of the Colab setup cell (notebooks/_colab_setup.py), as the tool reads it."""
    return make_notebooks().repo()


def test_the_repository_name_is_the_tools_in_every_notebook_and_badge():
    repo = tool_repo()
    readme = (ROOT / "README.md").read_text()
    badges = re.findall(r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/main/"
                        r"notebooks/(\w+)\.ipynb", readme)
    assert sorted(name for _, name in badges) == sorted(ORDER)
    assert {owner_name for owner_name, _ in badges} == {repo}
    for name in ORDER:
        first = next(cell for cell in read(name).cells if cell.cell_type == "code")
        assert f'REPO = "{repo}"' in first.source, name


class _FakeShell:
    def __init__(self):
        self.magics = []

    def run_line_magic(self, name, line, *args, **kwargs):
        self.magics.append(f"%{name} {line}")


def run_colab_cell(monkeypatch, tmp_path, in_colab: bool, repo: str | None = None, git=None):
    """Execute the first code cell of 01_data as IPython would (its %pip line transformed),
    as if in Colab (or not), with busi not installed, git replaced by ``git`` and the clone
    going to tmp_path. Returns the fake shell (its magics) and the cell's namespace."""
    import importlib.util
    import subprocess
    import sys
    import types

    from IPython.core.inputtransformer2 import TransformerManager

    source = next(c for c in read("01_data").cells if c.cell_type == "code").source
    source = source.replace('CLONE = "/content/busi"', f"CLONE = {str(tmp_path / 'busi')!r}")
    if repo is not None:
        source = re.sub(r'^REPO = ".*?"', f"REPO = {repo!r}", source, flags=re.M)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    # a "google" module that is no package (protobuf-like): find_spec("google.colab") raises
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "busi" else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", git or pytest.fail)
    monkeypatch.setattr(sys, "path", list(sys.path))
    shell = _FakeShell()
    namespace = {"get_ipython": lambda: shell}
    exec(TransformerManager().transform_cell(source), namespace)
    return shell, namespace


def test_colab_cell_does_nothing_outside_colab(monkeypatch, tmp_path):
    shell, _ = run_colab_cell(monkeypatch, tmp_path, in_colab=False)
    assert shell.magics == [] and not (tmp_path / "busi").exists()


def test_colab_cell_asks_for_the_repository_while_it_is_a_placeholder(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match=r"Set REPO in this cell .* owner/name"):
        run_colab_cell(monkeypatch, tmp_path, in_colab=True, repo="<owner>/busi")


def test_colab_cell_explains_a_failed_clone(monkeypatch, tmp_path):
    import subprocess

    def git(command, **kwargs):
        return subprocess.CompletedProcess(command, 128, "", "fatal: repository not found\n")

    with pytest.raises(RuntimeError, match=r"Could not clone https://github.com/alice/busi: "
                       r"fatal: repository not found\. Is REPO right"):
        run_colab_cell(monkeypatch, tmp_path, in_colab=True, repo="alice/busi", git=git)


def test_colab_cell_clones_then_installs_with_pip_magic(monkeypatch, tmp_path):
    import subprocess
    import sys

    calls = []

    def git(command, **kwargs):
        calls.append(command)
        Path(command[-1]).mkdir()
        return subprocess.CompletedProcess(command, 0, "", "")

    shell, _ = run_colab_cell(monkeypatch, tmp_path, in_colab=True, repo="alice/busi", git=git)
    clone = str(tmp_path / "busi")
    assert calls == [["git", "clone", "--depth", "1", "https://github.com/alice/busi", clone]]
    assert shell.magics == ['%pip install -q -e "{CLONE}[pretrained]"']  # IPython expands {CLONE}
    assert sys.path[0] == f"{clone}/src"


# ------------------------------------------------------------------------------ execution


def _parameters(tmp_path: Path, data: Path, busbra: Path, limit: int | None) -> dict[str, dict]:
    run = dict(RUN_NAME="ci", RUN_DIR=str(tmp_path / "runs" / "ci"))
    return {
        "01_data": dict(DATA=str(data), DOWNLOAD=False, N_SAMPLES=4),
        "02_train": dict(
            run, DATA=str(data), WEIGHTS_DIR=str(tmp_path / "weights"),
            ARCHITECTURE="classic_unet", BASE_FILTERS=4, ENCODER_WEIGHTS=None, IMAGE_SIZE=32,
            EPOCHS=1, BATCH_SIZE=4, LIMIT=limit,
        ),
        "03_evaluate": dict(run, DATA=str(data), WEIGHTS_DIR=str(tmp_path / "weights"),
                            N_OVERLAYS=4, N_WORST=2),
        "04_predict": dict(
            run, WEIGHTS_DIR=str(tmp_path / "weights"), DATA=str(data),
            OUTPUT_DIR=str(tmp_path / "predictions"), N_DEMO=3, N_SHOW=2,
        ),
        "05_cross_dataset": dict(
            BUSI=str(data), BUSBRA=str(busbra), BUSI_RUN=run["RUN_DIR"], PART="test",
            JOINT_RUN_NAME="ci-joint", JOINT_RUN_DIR=str(tmp_path / "runs" / "ci-joint"),
            ARCHITECTURE="classic_unet", BASE_FILTERS=4, ENCODER_WEIGHTS=None, IMAGE_SIZE=32,
            EPOCHS=1, BATCH_SIZE=4, LIMIT=limit, N_SAMPLES=4, N_FAILURES=2,
        ),
    }


@pytest.mark.slow
def test_notebooks_run_in_order(tmp_path, busi_folder, busbra_folder, monkeypatch):
    from nbclient import NotebookClient

    real = os.environ.get("BUSI_DATA")
    data = Path(real) if real else busi_folder
    busbra = Path(os.environ.get("BUSBRA_DATA") or busbra_folder)
    parameters = _parameters(tmp_path, data, busbra, limit=12 if real else None)
    # Nothing may land in the project's runs/ or weights/ even if a notebook ignored a value.
    monkeypatch.setenv("BUSI_RUNS", str(tmp_path / "default-runs"))
    monkeypatch.setenv("BUSI_WEIGHTS", str(tmp_path / "default-weights"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    seconds = {}
    for name in ORDER:
        nb = inject(read(name), parameters[name])
        start = time.perf_counter()
        client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        try:
            client.execute()
        finally:
            nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")  # to look at after a failure
        seconds[name] = round(time.perf_counter() - start, 1)
    print("notebook seconds:", seconds)

    run = tmp_path / "runs" / "ci"
    for produced in ("best.h5", "history.csv", "figures/curves.png", "evaluation/summary.json",
                     "evaluation/per_image_test.csv", "figures/overlays_test.png",
                     "figures/worst_test.png"):
        assert (run / produced).is_file(), produced
    assert (tmp_path / "weights" / "ci.h5").is_file()
    sidecar = json.loads((tmp_path / "weights" / "ci.json").read_text())
    assert sidecar["chosen_on"] == "val" and sidecar["metrics"]["test"]  # refreshed by 03
    masks = sorted((tmp_path / "predictions").glob("*_pred.png"))
    assert len(masks) == 3 and len(list((tmp_path / "predictions").glob("*_overlay.png"))) == 3
    assert not (tmp_path / "default-runs").exists() and not (tmp_path / "default-weights").exists()
    predict = nbformat.read(tmp_path / "04_predict.executed.ipynb", as_version=4)
    figures = [output for cell in predict.cells if cell.cell_type == "code"
               for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 2, "04_predict should show N_SHOW overlays"
    joint = tmp_path / "runs" / "ci-joint"
    for produced in (run / "evaluation-busbra" / "summary.json",
                     joint / "evaluation" / "per_image_test.csv",
                     joint / "evaluation-busbra" / "per_image_test.csv",
                     joint / "figures" / "busbra_failures.png"):
        assert produced.is_file(), produced


@pytest.mark.slow
def test_predict_notebook_runs_on_a_fresh_clone_with_the_shipped_model(tmp_path, busi_folder):
    """Nothing trained, no run folder: 04 falls back to the model in weights/. With the real
    data it takes its demo images from the split that the model's sidecar makes again; without
    it (the sidecar's dataset fingerprint cannot match the synthetic folder) it is given two
    images, as a user with their own images would."""
    from nbclient import NotebookClient

    real = os.environ.get("BUSI_DATA")
    params = dict(
        RUN_NAME="never-trained", RUN_DIR=str(tmp_path / "runs" / "never-trained"),
        WEIGHTS_DIR=str(tmp_path / "no-weights"), DATA=str(Path(real) if real else busi_folder),
        OUTPUT_DIR=str(tmp_path / "predictions"), N_DEMO=2, N_SHOW=1,
    )
    if not real:
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        for path in sorted((busi_folder / "malignant").glob("malignant ([0-9]).png"))[:2]:
            shutil.copy(path, inputs / path.name)
        params["INPUTS"] = str(inputs)
    nb = inject(read("04_predict"), params)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    printed = "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert f"using the shipped {SHIPPED_MODEL.name}" in printed
    assert len(list((tmp_path / "predictions").glob("*_pred.png"))) == 2
