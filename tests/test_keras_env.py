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
