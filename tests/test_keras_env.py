"""`import busi` must give Keras 2 to TensorFlow and segmentation-models, in either import order.

Each case runs in a fresh Python process, since the Keras choice is made once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "SM_FRAMEWORK")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


CHECK = (
    "import tensorflow as tf, segmentation_models as sm\n"
    "assert tf.keras.__name__.startswith('tf_keras'), tf.keras.__name__\n"
    "assert sm.framework() == 'tf.keras'\n"
    "print('keras2 ok')\n"
)


@pytest.mark.slow
def test_busi_first_gives_keras2():
    result = _run("import busi\nimport sys\nassert 'tensorflow' not in sys.modules\n" + CHECK)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "keras2 ok" in result.stdout


@pytest.mark.slow
def test_tensorflow_imported_first_but_keras_untouched_still_works():
    result = _run("import tensorflow\nimport busi\n" + CHECK)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "keras2 ok" in result.stdout


@pytest.mark.slow
def test_keras3_already_bound_raises_a_clear_error():
    result = _run("import tensorflow as tf\ntf.keras.layers\nimport busi\n")
    assert result.returncode != 0
    assert "busi needs Keras 2" in result.stderr
    assert "import busi` before `import tensorflow`" in result.stderr



def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, **values}


DEVICES = "import busi\nimport tensorflow as tf\nprint(tf.config.list_physical_devices('CPU'))\n"


@pytest.mark.slow
def test_tensorflow_start_up_noise_is_off_by_default():
    result = subprocess.run([sys.executable, "-c", DEVICES], capture_output=True, text=True,
                            env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CPU" in result.stdout
    assert result.stderr.strip() == "", result.stderr[-2000:]


@pytest.mark.slow
def test_tensorflow_logs_come_back_with_a_low_log_level():
    """TF_CPP_MIN_LOG_LEVEL=0 set by the user wins: TensorFlow's own lines (I/W/E + date) show."""
    import re

    result = subprocess.run([sys.executable, "-c", DEVICES], capture_output=True, text=True,
                            env=_env(TF_CPP_MIN_LOG_LEVEL="0"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^[IWE]\d{4} ", result.stderr, re.MULTILINE), result.stderr[-2000:]


def test_filtered_stderr_drops_the_noise_and_keeps_other_lines(capfd):
    from busi._keras import _filtered_stderr

    with _filtered_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\nI0000 00:00:17.1 42 cudart_stub.cc:31] Could not find "
                    b"cuda drivers on your machine, GPU will not be used.\nreal problem here\n")
    err = capfd.readouterr().err
    assert err == "real problem here\n"
