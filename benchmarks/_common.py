"""What every benchmark prints first: the command that reproduces it and the cores it had."""

from __future__ import annotations

import os
import shlex
import sys


def command_line(data_given: bool) -> str:
    """The command as run, with BUSI_DATA in front when the data came from the environment."""
    command = shlex.join([sys.executable, *sys.argv])
    if not data_given and os.environ.get("BUSI_DATA"):
        command = f"BUSI_DATA={shlex.quote(os.environ['BUSI_DATA'])} {command}"
    return command


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def print_header(data_given: bool) -> int:
    """Print the command that reproduces the run and the cores it had; return the core count."""
    cores = usable_cores()
    print(f"command: {command_line(data_given)}")
    print(f"cpu: {cores} usable cores")
    return cores
