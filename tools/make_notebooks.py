"""Write the committed notebooks from their sources, or check that they match.

Each notebook is written as code: ``notebooks/NN_name.py`` in jupytext's percent format (``# %%``
opens a code cell, ``# %% [markdown]`` a prose cell, ``# %% tags=["parameters"]`` the cell papermill
fills in), so ruff checks it and a diff reads like a diff of code. This script converts each
source to the ``notebooks/NN_name.ipynb`` next to it, the file users open (Colab, Jupyter,
papermill), clean: no outputs, cell ids ``c00``, ``c01``, ... by position, the same notebook
metadata every time.

The Colab setup cells, a note and the cell that clones and installs busi, are written once, in
``notebooks/_colab_setup.py``, and put after the title cell of every notebook. Its ``REPO`` is the
one place the GitHub repository is named: the script also points the README's "Open in Colab"
badges at it. A fork sets ``REPO`` there and runs the script.

    python tools/make_notebooks.py          # write notebooks/*.ipynb and the README's badges
    python tools/make_notebooks.py --check  # exit 1, naming each notebook that differs
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import sys
from pathlib import Path

import jupytext
import nbformat

from busi.utils.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"
COLAB = "_colab_setup.py"
METADATA = {
    "colab": {"provenance": []},
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
}
BADGE = re.compile(r"(colab\.research\.google\.com/github/)[^/\s]+/[^/\s]+(/blob/)")


def sources(folder: Path = NOTEBOOKS) -> list[Path]:
    """The notebook sources of ``folder``: ``NN_name.py``, in order."""
    return sorted(folder.glob("[0-9]*.py"))


def repo(folder: Path = NOTEBOOKS) -> str:
    """``REPO`` of the Colab setup cell: the GitHub ``owner/name`` Colab clones."""
    tree = ast.parse((folder / COLAB).read_text())
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(target, "id", None) == "REPO" for target in node.targets))


def build(source: Path) -> str:
    """The ``.ipynb`` text of one source, with the Colab setup cells after its title cell."""
    nb = jupytext.read(source, fmt="py:percent")
    colab = jupytext.read(source.with_name(COLAB), fmt="py:percent").cells
    nb.cells[1:1] = colab
    nb.metadata = copy.deepcopy(METADATA)
    for number, cell in enumerate(nb.cells):
        cell.id = f"c{number:02d}"
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def badges(text: str, owner_name: str) -> str:
    """``text`` with its "Open in Colab" badges pointing at ``owner_name``."""
    return BADGE.sub(lambda m: f"{m.group(1)}{owner_name}{m.group(2)}", text)


def stale(folder: Path = NOTEBOOKS) -> list[str]:
    """Names of the notebooks of ``folder`` whose ``.ipynb`` is missing or differs from what
    their source makes."""
    names = []
    for source in sources(folder):
        notebook = source.with_suffix(".ipynb")
        if not notebook.is_file() or notebook.read_text() != build(source):
            names.append(notebook.name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a notebook (or a README badge) is stale")
    parser.add_argument("--dir", type=Path, default=NOTEBOOKS,
                        help="the folder of sources and notebooks (default: notebooks/)")
    args = parser.parse_args(argv)
    own = args.dir.resolve() == NOTEBOOKS  # the project's own notebooks: the badges go with them
    if args.check:
        problems = [f"{name} differs from {Path(name).stem}.py" for name in stale(args.dir)]
        readme = README.read_text()
        if own and badges(readme, repo(args.dir)) != readme:
            problems.append(f"the Colab badges of {README.name} do not open REPO of {COLAB}")
        for problem in problems:
            print(f"{problem}; run python tools/make_notebooks.py", file=sys.stderr)
        return 1 if problems else 0
    for source in sources(args.dir):
        atomic_write_text(source.with_suffix(".ipynb"), build(source))
    if own:
        readme = README.read_text()
        if badges(readme, repo(args.dir)) != readme:
            atomic_write_text(README, badges(readme, repo(args.dir)))
    print("wrote", [source.with_suffix(".ipynb").name for source in sources(args.dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
