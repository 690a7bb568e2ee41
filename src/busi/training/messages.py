"""What a run tells its user at the start and when its time budget stops it: enough to see a
wrong dataset or setting at once, to not take a long first epoch for a hang, and to know how to
go on."""

from __future__ import annotations

import pandas as pd

from busi.config.train_config import TrainConfig
from busi.data import datasets
from busi.data.cache import Cache
from busi.models import architectures as models
from busi.runs.folder import RunFolder


def start_message(config: TrainConfig, run: RunFolder, parts: dict[str, pd.DataFrame],
                  done: int, finished: bool, cache: Cache | None = None) -> str:
    """What a run says before reading images and building the model: the folder, the data and
    its part sizes, the model, the epochs and the budget, so that a wrong dataset or setting
    shows at once and a long first epoch is not taken for a hang."""
    if finished:
        state = f"all {done} epochs done" if done >= config.epochs else "stopped early"
    else:
        state = f"resuming after epoch {done} of {config.epochs}" if done else "new run"
    lines = [f"run folder: {run.root} ({state})"]
    for name in config.datasets:
        adapter = datasets.get(name)
        sizes = ", ".join(
            f"{part} {len(rows if 'dataset' not in rows else rows[rows['dataset'] == name])}"
            for part, rows in parts.items())
        where = (f"from the cache {cache.path} ({cache.codec})" if cache is not None
                 else f"at {adapter.locate(config.data_path(name))}")
        lines.append(f"data: {adapter.title} {where}: {sizes} images")
    if config.train_classes is not None:
        lines.append(f"training on {', '.join(config.train_classes)} images only")
    if config.limit:
        lines.append(f"limit: {config.limit} images per part (a quick try)")
    lines.append(f"model: {models.model_label(config)}; {config.image_size} px, batch "
                 f"{config.batch_size}")
    budget = (f"time budget {config.max_minutes:g} min (the same command resumes a stopped run)"
              if config.max_minutes else "no time budget")
    lines.append(f"epochs: {config.epochs}; {budget}")
    return "\n".join(lines)


def time_budget_message(config: TrainConfig, run: RunFolder, done_before: int) -> str:
    """What a run stopped by its time budget tells the user: how far it got, how to go on,
    and that evaluation was skipped (it runs once training has finished)."""
    history = run.read_history()
    done = int(run.read_state().get("epoch", done_before))
    budget = f"{config.max_minutes:g} min"
    seconds = history["seconds"].dropna() if "seconds" in history else pd.Series(dtype=float)
    epoch = format_duration(float(seconds.max())) if len(seconds) else "unknown"
    skipped = "; evaluation skipped" if config.evaluate else ""
    if done == done_before:
        return (
            f"stopped by the time budget ({budget}) before epoch {done + 1} of {config.epochs}: "
            f"an epoch takes about {epoch}, more than the budget allows; raise max_minutes "
            f"(e.g. --set max_minutes=...) to continue{skipped}"
        )
    message = (
        f"stopped by the time budget ({budget}) after {done - done_before} epoch(s) "
        f"(epoch {done} of {config.epochs}; the slowest took {epoch}); run the same command "
        f"(or train again with the same config) to continue{skipped}"
    )
    if done - done_before == 1 and len(seconds) and seconds.iloc[-1] > 60 * config.max_minutes:
        message += (". That epoch alone took longer than the whole budget: an epoch is never "
                    "cut short; raise max_minutes to train more than one epoch per session")
    return message


def format_duration(seconds: float) -> str:
    """A duration as people say it: "45 s", "6.2 min" (time-budget messages)."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


__all__ = ["format_duration", "start_message", "time_budget_message"]
