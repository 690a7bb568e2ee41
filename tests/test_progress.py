"""Progress bars where someone watches (terminal, notebook), none in logs (pipes, CI)."""

from __future__ import annotations

import io
import sys

import pytest

from busi.utils import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("BUSI_PROGRESS", raising=False)


def test_bars_only_on_a_terminal_outside_notebooks():
    assert not progress.in_notebook()  # pytest is no kernel
    assert progress.enabled(Terminal())
    assert not progress.enabled(io.StringIO())  # a pipe or a file: a log


def test_the_environment_variable_forces_them(monkeypatch):
    monkeypatch.setenv("BUSI_PROGRESS", "0")
    assert not progress.enabled(Terminal())
    monkeypatch.setenv("BUSI_PROGRESS", "1")
    assert progress.enabled(io.StringIO())


def test_a_log_gets_no_bar_and_keras_one_line_per_epoch(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    for _ in progress.bar(range(3), desc="indexing"):
        pass
    assert sys.stderr.getvalue() == ""
    assert progress.keras_verbose() == 2


def test_a_terminal_gets_a_bar_and_keras_its_bar(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", Terminal())
    for _ in progress.bar(range(3), desc="indexing", file=terminal):
        pass
    assert "indexing: 100%" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert progress.keras_verbose() == 1
