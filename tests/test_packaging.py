"""What pip installs: requirements.txt is pyproject's dependency list, and the install the README
gives for the tests is the one CI makes, so a newcomer's run skips only what CI skips."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_requirements_txt_is_the_dependency_list_of_pyproject():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = [line for line in lines if line and not line.startswith("#")]
    assert listed == PROJECT["dependencies"]  # an extra (jupyter) belongs in its extra


def test_the_tests_extra_holds_every_extra_the_suite_uses():
    extras = PROJECT["optional-dependencies"]
    (self_reference,) = extras["tests"]
    named = set(re.fullmatch(r"busi\[(.*)\]", self_reference).group(1).split(","))
    # notebooks (Jupyter, papermill) is for people; the suite runs notebooks with nbclient (dev)
    assert named == set(extras) - {"tests", "notebooks"}


def test_readme_and_ci_install_the_tests_extra():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert 'pip install -e ".[tests]" && python -m pytest' in quick_start
    installs = re.findall(r'pip install .*-e "\.\[(.*?)\]"', (ROOT / ".ci" / "run").read_text())
    assert installs == ["tests"]
