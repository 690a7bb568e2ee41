"""One writer per run folder: a second writer is refused, a dead writer's lock is taken over,
and the temporary files of a killed write are cleaned when the run is opened again."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import busi
from busi.cli import main
from busi.config.train_config import TrainConfig
from busi.runs.lock import RunLockedError, run_lock

HOLD = textwrap.dedent("""
    import sys, time
    from busi.runs.lock import run_lock
    with run_lock(sys.argv[1], "training"):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path / "run"`` (as a running training does)."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   p for p in sys.path if p)})
    try:
        assert process.stdout.readline().strip() == "held"
        yield run, process
    finally:
        process.kill()
        process.wait()


def test_a_second_writer_is_refused_with_the_holders_pid_and_host(holder, busi_folder, capsys):
    run, process = holder
    config = TrainConfig(name="r", data=str(busi_folder), run_dir=str(run),
                         architecture="classic_unet", base_filters=4, depth=2, image_size=32,
                         epochs=1, evaluate=False)
    with pytest.raises(RunLockedError, match=rf"another busi process is writing into this run "
                                             rf"folder: PID {process.pid} on host "
                                             rf"{socket.gethostname()} \(training"):
        busi.train(config)
    assert not (run / "config.json").exists()  # the refused run wrote nothing
    assert main(["train", "--run-dir", str(run), "--architecture", "classic_unet",
                 "--data", str(busi_folder)]) == 2
    assert f"PID {process.pid}" in capsys.readouterr().err


def test_a_killed_writers_lock_is_taken_over_with_a_notice(holder, caplog):
    run, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    with caplog.at_level(logging.WARNING, logger="busi.runs.lock"), run_lock(run, "evaluation"):
        pass
    assert f"taking over the stale lock of PID {process.pid}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="busi.runs.lock"), run_lock(run, "evaluation"):
        pass  # released cleanly the last time: no notice
    assert "stale" not in caplog.text


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with run_lock(tmp_path, "training"), run_lock(tmp_path, "evaluation"):
        pass
    with run_lock(tmp_path, "training"):  # released after the outer block
        pass


def test_temp_files_of_a_killed_write_are_removed_when_the_run_is_opened(tmp_path, caplog):
    leftovers = [tmp_path / ".best.h5.k2j_9x1a.h5", tmp_path / "evaluation" /
                 ".summary.json.abcdefgh.json", tmp_path / ".history.csv.0a1b2c3d.csv"]
    kept = [tmp_path / "best.h5", tmp_path / ".gitignore", tmp_path / ".notes.txt.old",
            tmp_path / "evaluation" / "summary.json"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")  # a run folder (only those are cleaned)
    with caplog.at_level(logging.WARNING, logger="busi.runs.lock"), run_lock(tmp_path, "training"):
        pass
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in kept)
    assert "removed 3 temporary file(s)" in caplog.text and ".best.h5.k2j_9x1a.h5" in caplog.text


def test_temp_file_cleanup_leaves_dotfiles_and_hidden_folders_alone(tmp_path):
    from busi.utils.atomic import leftover_temp_file, remove_leftover_temp_files

    keep = [tmp_path / ".bashrc.original", tmp_path / ".git" / ".best.h5.abcd1234.h5"]
    gone = tmp_path / "evaluation" / ".summary.json.k2j3h4g5.json"
    for path in (*keep, gone):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert not leftover_temp_file(keep[0]) and leftover_temp_file(gone)
    assert remove_leftover_temp_files(tmp_path) == [gone]
    assert all(path.exists() for path in keep)


def test_a_parent_of_runs_is_not_cleaned(tmp_path):
    from busi.runs.lock import run_lock

    (tmp_path / "other-run").mkdir()
    in_flight = tmp_path / "other-run" / ".last.h5.abcd1234.h5"  # another run's write
    in_flight.write_text("x")
    with run_lock(tmp_path, "training"):  # not a run folder: no config.json, not empty
        pass
    assert in_flight.exists()
