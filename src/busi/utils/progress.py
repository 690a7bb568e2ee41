"""Progress bars for the steps that take more than a few seconds (indexing, prediction,
evaluation, training), shown where someone watches and off where output is a log.

Shown in a terminal and in a Jupyter or Colab kernel; off when output goes to a pipe or a file
(CI logs stay short). ``BUSI_PROGRESS=1`` or ``0`` forces them on or off. Bars come from tqdm:
a widget in notebooks where ipywidgets is installed (Colab, the ``notebooks`` extra), else text
(what ``tqdm.auto`` does, without its warning when ipywidgets is missing); training uses Keras'
own bar.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.std import tqdm


def in_notebook() -> bool:
    """True inside a Jupyter or Colab kernel (ipykernel shows output that is not a TTY)."""
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    ipython = shell.get_ipython()
    return ipython is not None and "IPKernelApp" in ipython.config


def enabled(stream: TextIO | None = None) -> bool:
    """Whether to draw progress on ``stream`` (default stderr): ``BUSI_PROGRESS`` if set, else
    in a notebook kernel or when the stream is a terminal."""
    forced = os.environ.get("BUSI_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        terminal = False
    return terminal or in_notebook()


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
        unit: str = "img", **kwargs: Any) -> tqdm:
    """A tqdm bar, disabled (drawing nothing) where :func:`enabled` says so."""
    kind = tqdm
    if in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as kind  # optional: ipywidgets, in notebooks only
    return kind(iterable, total=total, desc=desc, unit=unit, disable=not enabled(),
                dynamic_ncols=True, **kwargs)


def keras_verbose() -> int:
    """``verbose`` for Keras' ``fit``: 1 (its progress bar, on stdout) where someone watches,
    else 2 (one line per epoch)."""
    return 1 if enabled(sys.stdout) else 2


__all__ = ["bar", "enabled", "in_notebook", "keras_verbose"]
