"""Damaged or foreign ``.tflite`` and ``.onnx`` files are refused with the file named, before a
runtime in this process reads them.

A runtime given a damaged file does not always raise: LiteRT's interpreter reads the flatbuffer
with the offsets it holds, and a file cut short or overwritten in the wrong place can take the
whole process down with a segmentation fault (``busi predict`` exiting 139 with no word), or
fail with a message that names no file ("No subgraph in the model."). Validating the flatbuffer
by hand in Python would mean re-implementing the TFLite schema verifier, and a file can pass
that and still crash the kernels that read its tensors. So :func:`check_tflite` checks the
header cheaply (for the plain "not a TFLite file" message) and then builds the interpreter,
allocates its tensors and runs it once on zeros in a child process: whatever the damage, only
the child dies, and the parent reports the file and the cause. It costs about a second, and is
skipped for a file whose digest matched its record (:mod:`busi.inference.bundle`): those bytes were
checked when they were exported.

ONNX runtimes parse the protobuf in C++ and raise Python errors for damaged files;
:func:`check_onnx` parses it with the ``onnx`` package first so the message names the file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from busi.errors import DataError
from busi.inference.runtimes import available

TFLITE_IDENTIFIER = b"TFL3"
"""The flatbuffer file identifier of TFLite models (bytes 4 to 8)."""

CHILD_TIMEOUT_S = 300

_CHILD = """
import sys
import numpy as np
from busi.inference.runtimes import tflite_interpreter
interpreter = tflite_interpreter(model_path=sys.argv[1], num_threads=1)
details = interpreter.get_input_details()
outputs = interpreter.get_output_details()
if len(details) != 1 or len(outputs) not in (1, 2):
    sys.exit(f"it has {len(details)} inputs and {len(outputs)} outputs; a busi model has one "
             "input and one output (two with the image-level head)")
shape = [1, *[int(v) for v in details[0]["shape"][1:]]]
interpreter.resize_tensor_input(details[0]["index"], shape)
interpreter.allocate_tensors()
interpreter.set_tensor(details[0]["index"], np.zeros(shape, details[0]["dtype"]))
interpreter.invoke()
"""


def check_tflite_header(path: Path) -> None:
    """Raise DataError unless ``path`` starts like a TFLite flatbuffer: the identifier "TFL3"
    at bytes 4..8 and a root table offset inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or head[4:8] != TFLITE_IDENTIFIER:
        raise DataError(f"{path}: not a TFLite model (no 'TFL3' identifier at bytes 4-8): a "
                        "damaged file, or another format under a .tflite name")
    root = int.from_bytes(head[:4], "little")
    if not 8 <= root < size:
        raise DataError(f"{path}: damaged TFLite file: its root table offset ({root}) lies "
                        f"outside the file ({size} bytes); a truncated download or copy?")


def check_tflite(path: str | os.PathLike) -> None:
    """Raise DataError (the file and the cause named) unless LiteRT can load and run ``path``,
    found in a child process (module docstring)."""
    path = Path(path)
    check_tflite_header(path)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as error:
        raise DataError(f"{path}: the TFLite interpreter did not finish loading and running it "
                        f"once in {CHILD_TIMEOUT_S} s; a damaged file?") from error
    if done.returncode == 0:
        return
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        raise DataError(f"{path}: damaged TFLite file: the interpreter crashed ({name}) "
                        "reading it; a truncated or corrupted download or copy?")
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    cause = lines[-1] if lines else f"exit status {done.returncode}"
    raise DataError(f"{path}: damaged or unsupported TFLite file: {cause}")


def check_onnx(path: str | os.PathLike) -> None:
    """Raise DataError unless ``path`` parses as an ONNX model with a graph (skipped when the
    ``onnx`` package is not installed: the runtime's own error is then wrapped by the
    caller)."""
    path = Path(path)
    if not available("onnx"):
        return
    import onnx  # optional: busi[fast]

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: any means unreadable
        raise DataError(f"{path}: damaged or not an ONNX model: {error}") from error
    if not proto.graph.node or not proto.graph.input or not proto.graph.output:
        raise DataError(f"{path}: damaged or not an ONNX model: it holds no graph")


__all__ = ["TFLITE_IDENTIFIER", "check_onnx", "check_tflite", "check_tflite_header"]
