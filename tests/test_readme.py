"""The README's Python snippets run as written: "Using the package" (one epoch on a few
synthetic images) and "Loading saved weights elsewhere" (the shipped model)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import busi

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet(heading: str = "## Using the package") -> str:
    """The first Python code block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text.split(heading + "\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


@pytest.mark.slow
def test_using_the_package_snippet_runs(busi_folder, tmp_path, monkeypatch):
    """Only the length of the run is changed: every TrainConfig the snippet makes trains one
    epoch on 4 images of each part (``limit``), in tmp_path (not the project's runs/); model,
    data, split, training, evaluation, publishing and prediction are the README's."""
    real = busi.TrainConfig

    def tiny_config(**values):
        return real(**{**values, "epochs": 1, "limit": 4,
                       "run_dir": str(tmp_path / "runs" / values["name"])})

    monkeypatch.setattr(busi, "TrainConfig", tiny_config)
    monkeypatch.setenv("BUSI_DATA", str(busi_folder))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "new_images").mkdir()
    for path in sorted((busi_folder / "normal").glob("normal ([0-9]).png"))[:2]:
        shutil.copy(path, tmp_path / "new_images")

    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)

    run = namespace["run"]
    assert (run / "evaluation" / "summary.json").is_file()  # train evaluated it already
    assert namespace["weights"] == Path("weights") / "my-run.h5"
    assert len(list((tmp_path / "predictions").glob("*_pred.png"))) == 2


def test_loading_saved_weights_snippet_runs_on_a_fresh_clone(monkeypatch):
    """As written, from the project root: the file it loads is the shipped model, not a run."""
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(readme_snippet("### Loading saved weights elsewhere"), "README.md", "exec"),
         namespace)
    assert Path(namespace["path"]).is_file()
    assert tuple(namespace["model"].input_shape[1:]) == (256, 256, 3)  # Keras 3's, the last


def test_the_sectioned_config_example_is_a_valid_config():
    import yaml

    from busi.config.train_config import TrainConfig

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert blocks, "the README lost its config example"
    config = TrainConfig.from_dict(yaml.safe_load(blocks[0]))
    assert config.encoder == "efficientnet-lite0" and config.warmup_epochs == 1
    assert config.augmentation == {"max_shift": 0.08} and config.max_minutes == 90
