"""`import busi` must give Keras 2 to TensorFlow and segmentation-models, in either import order.

Each case runs in a fresh Python process, since the Keras choice is made once per process.
"""

from __future__ import annotations

import os
import shutil
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
@pytest.mark.parametrize("before", ["", "import importlib.util\n"
                                        "importlib.util.find_spec('tensorflow')\n"],
                         ids=["import", "asked-first"])
def test_tensorflow_start_up_noise_is_off_by_default(before):
    """Also when something first asks whether TensorFlow is installed (the backend check of
    ``busi train``): asking must not use up the quiet first import."""
    code = DEVICES.replace("import busi\n", "import busi\n" + before)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
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


NOISE = (
    "Segmentation Models: using", "Compiled the loaded model", "XNNPACK delegate", "[ERROR:",
    "least populated class",
)

QUIET = """
import warnings
from pathlib import Path

import numpy as np

import busi
from busi.inference import weights
from busi.data import datasets
from busi.data.masks import read_image
from busi.errors import DataError
from busi.runs.folder import environment
from busi.inference.runtimes import tflite_interpreter

environment("0")  # imports segmentation-models
model = busi.classic_unet(input_shape=(32, 32, 3), base_filters=4, depth=2)  # not compiled
weights.save_model(model, Path(TMP) / "m.h5", include_optimizer=False)
tflite_interpreter(model_path=SHIPPED_TFLITE, num_threads=1).allocate_tensors()
(Path(TMP) / "bad.bmp").write_bytes(b"BM" + bytes(60))
try:
    read_image(Path(TMP) / "bad.bmp")
except DataError:
    print("unreadable image reported")
for _ in range(2):  # a warning of busi's, twice: once, without busi's source line
    datasets.load("busi", FOLDER)
"""


@pytest.mark.slow
def test_known_noise_is_dropped_and_busi_warnings_are_one_line_once(tmp_path, busi_folder):
    """The lines the first hour of busi printed for nothing (issue 24), each from where it
    starts: segmentation-models' import notice, TensorFlow's metrics note when an uncompiled
    model is saved (every epoch of a mixed-precision run), LiteRT's XNNPACK notice, OpenCV's
    C++ errors for an unreadable image busi reports itself."""
    from busi.utils.paths import PROJ_ROOT

    folder = tmp_path / "no-normal"  # BUSI without its normal/ folder: busi warns
    for label in ("benign", "malignant"):
        shutil.copytree(busi_folder / label, folder / label)
    code = (f"TMP = {str(tmp_path)!r}\nFOLDER = {str(folder)!r}\nSHIPPED_TFLITE = "
            f"{str(PROJ_ROOT / 'weights' / 'classic-unet-cosine-cpu.int8.tflite')!r}\n" + QUIET)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "OPENCV_LOG_LEVEL", "PYTHONWARNINGS")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "unreadable image reported" in result.stdout
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    warned = [line for line in result.stderr.splitlines() if "no normal images" in line]
    assert len(warned) == 1 and warned[0].startswith("UserWarning: "), result.stderr[-3000:]
    assert "datasets.load" not in result.stderr and ".py:" not in result.stderr
