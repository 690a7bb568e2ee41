"""Evaluation stage: scoring a mask (:mod:`.scoring`), a model on a run's parts
(:mod:`.evaluator`, :mod:`.score_tables`), the image-level head (:mod:`.classification`), and
the reports, plots and results table made from them (:mod:`.report`, :mod:`.plots`).

The names below are the package's public surface, imported on first use."""

from __future__ import annotations

from busi.utils import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(__name__, {
    "evaluate": "busi.evaluation.evaluator",
    "score_image": "busi.evaluation.scoring",
    "dice": "busi.evaluation.scoring",
    "score_table": "busi.evaluation.score_tables",
    "summarize": "busi.evaluation.score_tables",
    "classification_summary": "busi.evaluation.classification",
    "write_report": "busi.evaluation.report",
    "results_table": "busi.evaluation.report",
})
