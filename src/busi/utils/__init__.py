"""Helpers every stage uses: atomic writes (:mod:`.atomic`), file digests (:mod:`.digests`),
project folders (:mod:`.paths`) and progress bars (:mod:`.progress`); and :func:`lazy_surface`, with
which each stage package names its public surface without importing it (``import busi.inference``
must not load TensorFlow)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any


def lazy_surface(package: str, surface: Mapping[str, str | tuple[str, str | None]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for a package whose public names live in its
    modules, imported on first use: ``surface`` maps each name to the module that defines it
    under that name, or to ``(module, attribute)`` (attribute None: the module itself). The
    package's modules are attributes too, so ``busi.evaluation.plots.roc_curves`` needs no
    import."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name in surface:
            where = surface[name]
            module, attribute = (where, name) if isinstance(where, str) else where
            found = importlib.import_module(module)
            value = found if attribute is None else getattr(found, attribute)
        elif importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")  # busi.inference.bundle.X works
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(surface))

    return __getattr__, __dir__, sorted(surface)
