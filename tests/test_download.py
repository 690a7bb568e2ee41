"""Finding the dataset folder and the offline download error."""

from __future__ import annotations

import shutil

import pytest

import busi
from busi.errors import DataError


def test_locate_accepts_root_parent_and_nested_download(busi_folder, tmp_path):
    assert busi.data.locate(busi_folder) == busi_folder.resolve()
    assert busi.data.locate(busi_folder.parent) == busi_folder.resolve()
    nested = tmp_path / "download" / "Dataset_BUSI_with_GT" / "Dataset_BUSI_with_GT"
    shutil.copytree(busi_folder, nested)
    assert busi.data.locate(tmp_path / "download") == nested.resolve()
    assert busi.data.locate(tmp_path) == nested.resolve()


def test_locate_reads_env(busi_folder, monkeypatch):
    monkeypatch.setenv("BUSI_DATA", str(busi_folder))
    assert busi.data.locate() == busi_folder.resolve()


def test_locate_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("BUSI_DATA", raising=False)
    with pytest.raises(DataError) as error:
        busi.data.locate(tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(error.value)
    assert "BUSI_DATA" in str(error.value)


def test_download_offline_fails_fast_with_manual_steps(tmp_path, monkeypatch):
    import kagglehub

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.kaggle.com'")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(DataError) as error:
        busi.data.download(tmp_path / "dest")
    text = str(error.value)
    assert "aryashah2k/breast-ultrasound-images-dataset" in text
    assert "Dataset_BUSI_with_GT" in text and "BUSI_DATA" in text


def test_a_long_download_error_is_shortened_between_words(tmp_path, monkeypatch):
    import kagglehub

    reason = " ".join(f"word{i:03d}" for i in range(100))  # 799 characters

    def offline(*args, **kwargs):
        raise ConnectionError(reason)

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(DataError) as error:
        busi.data.download(tmp_path / "dest")
    shown = str(error.value).split("ConnectionError: ", 1)[1].split("\n", 1)[0]
    assert shown.endswith(" ...") and len(shown) <= 400
    assert all(word.startswith("word") and len(word) == 7 for word in shown[:-4].split())


def test_download_reuses_an_existing_copy(busi_folder, monkeypatch):
    import kagglehub

    monkeypatch.setattr(kagglehub, "dataset_download", pytest.fail)
    assert busi.data.download(busi_folder.parent) == busi_folder.resolve()


def test_download_returns_the_root_of_what_kagglehub_fetched(busi_folder, tmp_path, monkeypatch):
    import kagglehub

    fetched = tmp_path / "cache" / "versions" / "1"
    shutil.copytree(busi_folder, fetched / "Dataset_BUSI_with_GT" / "Dataset_BUSI_with_GT")
    monkeypatch.setattr(kagglehub, "dataset_download", lambda *a, **k: str(fetched))
    found = busi.data.download(tmp_path / "dest")
    assert found == (fetched / "Dataset_BUSI_with_GT" / "Dataset_BUSI_with_GT").resolve()
