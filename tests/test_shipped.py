"""The models committed in weights/: each file is the one its sidecar describes, loads safely
and segments an image, so a fresh clone's `busi predict --weights weights/NAME.h5` works."""

from __future__ import annotations

import json

import numpy as np
import pytest

from busi import inference
from busi.digests import file_sha1
from busi.paths import PROJ_ROOT, SHIPPED_MODEL

SHIPPED = sorted((PROJ_ROOT / "weights").glob("*.h5"))


def test_the_default_shipped_model_is_committed():
    assert SHIPPED_MODEL in SHIPPED


@pytest.mark.parametrize("weights", SHIPPED, ids=[path.stem for path in SHIPPED])
def test_a_shipped_model_is_what_its_sidecar_and_card_say(weights):
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    assert sidecar["model"] == weights.name
    assert sidecar["model_sha1"] == file_sha1(weights)
    assert sidecar["not_for_clinical_use"] is True and sidecar["chosen_on"] == "val"
    for name, sha1 in (sidecar.get("exports") or {}).items():
        assert file_sha1(weights.with_name(name)) == sha1, name
    card = weights.with_suffix(".md").read_text()
    assert sidecar["model_sha1"] in card and "not for clinical use" in card


@pytest.mark.parametrize("weights", SHIPPED, ids=[path.stem for path in SHIPPED])
def test_a_shipped_model_loads_safely_and_segments(weights):
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    model = inference.load(weights)  # safe mode: a layer that runs code would be refused
    assert inference.model_input_size(model) in (None, (sidecar["image_size"],) * 2)
    image = np.random.default_rng(0).integers(0, 256, (300, 200)).astype(np.uint8)
    (probs,) = inference.predict_images(model, [image], sidecar["image_size"], sidecar["resize"])
    assert probs.shape == image.shape  # at the image's own size
    assert np.isfinite(probs).all() and 0 <= probs.min() and probs.max() <= 1


EXPORTS = [(weights, weights.with_name(name)) for weights in SHIPPED
           for name in json.loads(weights.with_suffix(".json").read_text()).get("exports") or {}]


@pytest.mark.slow
@pytest.mark.parametrize("weights,export", EXPORTS, ids=[e.name for _, e in EXPORTS])
def test_a_shipped_export_keeps_the_masks_of_its_h5(weights, export, real_table):
    """The issue-10 bar for an export: per-image Dice >= 0.99 with the ``.h5``'s masks on real
    images (mean), with the sidecar's threshold and flips. 24 lesion images spread over BUSI
    (the agreement of two files of one model does not depend on which part they come from;
    ``tools/predict_agrees.py`` checks all test images: 0.998 for lite0-joint's export)."""
    from busi.data.masks import read_image

    sidecar = json.loads(weights.with_suffix(".json").read_text())
    lesions = real_table[real_table["label"] != "normal"].sort_values("image_path")
    images = [read_image(path) for path in lesions["image_path"].iloc[:: len(lesions) // 24][:24]]
    masks = {}
    for path in (weights, export):
        probs = inference.predict_images(inference.load(path), images, sidecar["image_size"],
                                         sidecar["resize"], tta=sidecar["tta"])
        masks[path] = [p >= sidecar["threshold"] for p in probs]
    dice = [2 * (a & b).sum() / max(a.sum() + b.sum(), 1) if a.any() or b.any() else 1.0
            for a, b in zip(masks[weights], masks[export], strict=True)]
    assert np.mean(dice) >= 0.99, sorted(dice)[:3]
