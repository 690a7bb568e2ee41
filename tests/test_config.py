"""TrainConfig reading, writing and checking."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from busi.config import sections
from busi.config.train_config import CHOICES, TrainConfig
from busi.models import schedules
from busi.utils.paths import PROJ_ROOT


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    config = TrainConfig(name="x", epochs=3, classes=("benign", "malignant"), encoder_weights=None)
    path = config.save(tmp_path / f"config{suffix}")
    assert TrainConfig.load(path) == config


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nlearnig_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown config key\(s\) \['learnig_rate'\]"):
        TrainConfig.load(tmp_path / "c.yaml")


@pytest.mark.parametrize("change", [
    {"architecture": "transformer"}, {"resize": "crop"}, {"classes": ("cyst",)},
    {"epochs": 0}, {"mixed_precision": "float8"},
])
def test_bad_values(change):
    with pytest.raises(ValueError):
        TrainConfig().replace(**change)


def test_none_spellings_of_encoder_weights():
    assert TrainConfig(encoder_weights="none").encoder_weights is None


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        TrainConfig.load(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{epochs: ")
    with pytest.raises(ValueError, match=r"bad\.json:1:2: not valid JSON: Expecting property name"):
        TrainConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("changes, message", [
    ({"train_classes": ["normal"], "classes": ["benign", "malignant"]}, "train_classes"),
    ({"train_classes": []}, "train_classes"),
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"warmup_epochs": 5, "epochs": 5}, "warmup_epochs"),
])
def test_bad_schedule_and_class_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_train_classes_round_trip(tmp_path):
    config = TrainConfig(train_classes=("benign", "malignant"), lr_schedule="cosine")
    path = config.save(tmp_path / "config.yaml")
    assert TrainConfig.load(path) == config


@pytest.mark.parametrize("path", sorted(PROJ_ROOT.joinpath("configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load_and_name_their_run_after_the_file(path):
    config = TrainConfig.load(path)  # a typo in a key or value would raise here
    assert config.name == path.stem.replace("_", "-")


def test_warmup_needs_the_cosine_schedule_and_cosine_decays_downwards():
    with pytest.raises(ValueError, match="warmup_epochs applies to lr_schedule 'cosine', not "
                       "lr_schedule 'plateau'"):
        TrainConfig(warmup_epochs=2)  # plateau schedule
    with pytest.raises(ValueError, match="must not exceed learning_rate"):
        TrainConfig(lr_schedule="cosine", learning_rate=1e-4, min_learning_rate=1e-3)


def test_augmentation_overrides_reach_the_augment_config_and_survive_yaml(tmp_path):
    config = TrainConfig(augmentation={"max_rotation_deg": 20, "scale_range": [0.7, 1.4]})
    loaded = TrainConfig.load(config.save(tmp_path / "c.yaml")).augment_config()
    assert loaded.max_rotation_deg == 20
    assert loaded.scale_range == (0.7, 1.4)  # a list in YAML, the (low, high) tuple here
    assert loaded.contrast_range == TrainConfig().augment_config().contrast_range


@pytest.mark.parametrize(("augmentation", "message"), [
    ({"rotation": 20}, r"unknown augmentation key\(s\) \['rotation'\]"),
    ({"scale_range": [1.4, 0.7]}, "scale_range must satisfy 0 < low <= high"),
    ({"max_shift": 1.5}, "max_shift must be in"),
    ([("max_shift", 0.1)], "augmentation must be a mapping"),
    ({"flip_vertical": "false"}, "flip_vertical must be true or false"),
    ({"scale_range": 0.7}, r"scale_range must be two finite numbers \(low, high\)"),
    ({"gamma_range": [0.7, float("inf")]}, "gamma_range must be two finite numbers"),
    ({"max_rotation_deg": "20"}, "max_rotation_deg must be a finite number"),
])
def test_bad_augmentation_fails_when_the_config_is_made(tmp_path, augmentation, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(augmentation=augmentation)


def test_augmentation_is_kept_in_one_form_so_a_saved_config_equals_itself(tmp_path):
    """A resumed run compares its saved config with the new one: tuples (Python) and lists
    (JSON) of the same range, or a default written out, must not make them differ."""
    given = {"scale_range": (0.7, 1.4), "max_rotation_deg": 10.0}  # 10 is the default
    config = TrainConfig(architecture="classic_unet", augmentation=given)
    assert config.augmentation == {"scale_range": [0.7, 1.4]}
    assert given == {"scale_range": (0.7, 1.4), "max_rotation_deg": 10.0}  # caller's dict intact
    for suffix in (".json", ".yaml"):
        assert TrainConfig.load(config.save(tmp_path / f"c{suffix}")) == config
    assert TrainConfig(architecture="classic_unet", augmentation=None).augmentation == {}


def test_importing_the_config_module_does_not_load_tensorflow():
    """`busi index` and classic U-Net configs must not pay TensorFlow's start-up."""
    code = "import sys, busi.config.train_config; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("text", "message"), [
    ("limit: -5", r"limit must be >= 1 images per split part \(or null: all\), got -5"),
    ("learning_rate: abc", "learning_rate must be a number, got 'abc'"),
    ("batch_size: 2.5", "batch_size must be an integer, got 2.5"),
    ('epochs: "two"', "epochs must be an integer, got 'two'"),
    ('evaluate: "no"', "evaluate must be true or false"),
    ("classes: benign", "classes must be a list of strings, e.g. \\[benign, malignant\\], got "
                        "'benign'"),
    ("augment: 1", "augment must be true or false"),
    ("dropout: 1.0", r"dropout must be in \[0, 1\), got 1.0"),
    ("name: ../elsewhere", "name must be a plain folder name"),
    ("val_fraction: 0.5\ntest_fraction: 0.5", "val_fraction \\+ test_fraction must be below 1"),
    ("learning_rate: .nan", "learning_rate must be a finite number"),
    ("max_minutes: 0", "max_minutes must be > 0"),
])
def test_every_field_is_checked_when_the_config_is_made(tmp_path, text, message):
    """One message naming the file, the field, the value and what is allowed (these values
    trained on the wrong images, died in TensorFlow, or were silently read as true)."""
    (tmp_path / "c.yaml").write_text(text + "\n")
    with pytest.raises(ValueError, match=rf"c\.yaml: {message}"):
        TrainConfig.load(tmp_path / "c.yaml")


def test_checked_values_come_in_one_form(tmp_path):
    """YAML reads 1e-4 (no dot) as a string, Python gives ints for floats and 2.0 for ints."""
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nbatch_size: 4.0\nmax_minutes: 26\n")
    config = TrainConfig.load(tmp_path / "c.yaml")
    assert (config.learning_rate, config.batch_size, config.max_minutes) == (1e-4, 4, 26.0)
    assert type(config.batch_size) is int and type(config.learning_rate) is float
    assert TrainConfig(data=tmp_path).data == str(tmp_path)  # a Path from Python


@pytest.mark.parametrize(("text", "where"), [
    ("epochs: 3\nclasses: [benign\n", r"c\.yaml:3:1: not valid YAML: while parsing a flow "
                                      "sequence expected ',' or ']'"),
    ("epochs: 3\n  seed: 1\n", r"c\.yaml:2:7: not valid YAML: mapping values are not allowed"),
])
def test_yaml_errors_name_the_file_line_and_column(tmp_path, text, where):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=where):
        TrainConfig.load(tmp_path / "c.yaml")


def test_bad_set_values_fail_before_a_run_folder_is_made(tmp_path, capsys):
    from busi.cli import main

    run = tmp_path / "run"
    code = main(["train", "--run-dir", str(run), "--architecture", "classic_unet",
                 "--set", "learning_rate=abc"])
    assert code == 2 and not run.exists()
    assert "learning_rate must be a number, got 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize(("changes", "message"), [
    ({"val_fraction": 0}, "val_fraction must be in"),
    ({"test_fraction": 0}, "test_fraction must be in"),
    ({"test_fraction": 0.7}, "test_fraction must be in"),
    ({"val_fraction": 0.6, "test_fraction": 0.2}, "too large for test_fraction"),
    ({"datasets": ["busi", "busbra"], "authors_fold": 9}, "authors_fold must be in 1..5"),
    ({"data_paths": {"busi": 3}}, "data_paths must be a mapping of names to strings"),
    ({"encoder_weights": "imagenett"}, "encoder_weights must be imagenet or none"),
])
def test_values_that_used_to_fail_after_the_run_folder_existed(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_data_paths_given_as_paths_are_saved_as_strings(tmp_path):
    config = TrainConfig(data_paths={"busi": tmp_path})
    assert config.data_paths == {"busi": str(tmp_path)}
    config.save(tmp_path / "config.json")  # JSON: a Path would not serialise
    assert TrainConfig.load(tmp_path / "config.json") == config


def test_checking_any_config_does_not_load_tensorflow():
    """The encoder list is plain data (busi.models.encoders.ENCODERS): checking a U-Net config, the
    default, no longer imports segmentation-models and TensorFlow to learn the names."""
    code = ("import sys\nfrom busi.config.train_config import TrainConfig\n"
            "TrainConfig(encoder='efficientnetb3'); TrainConfig(encoder='efficientnet-lite0')\n"
            "print('tensorflow' in sys.modules, 'segmentation_models' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_choices_come_from_the_registries():
    from busi.config.train_config import CHOICES, MONITORS
    from busi.data.geometry import MODES
    from busi.models import architectures as models
    from busi.models import losses
    from busi.models.encoders import ENCODERS

    assert CHOICES["architecture"] == tuple(models.ARCHITECTURES)
    assert CHOICES["resize"] == MODES == ("letterbox", "stretch")
    assert CHOICES["loss"] == tuple(losses.LOSSES)
    assert CHOICES["optimizer"] == tuple(losses.OPTIMIZERS)
    assert "val_iou_score" in MONITORS and "f1-score" in MONITORS
    with pytest.raises(ValueError, match="choose one of busi's and segmentation-models' "
                       "encoders: efficientnet-lite0, .*resnet34"):
        TrainConfig(encoder="resnet17")
    with pytest.raises(ValueError, match="encoder applies to architecture 'unet', not "
                       "architecture 'classic_unet'"):
        TrainConfig(architecture="classic_unet", encoder="resnet17")  # it has no encoder
    assert set(ENCODERS) >= {"efficientnet-lite0", "resnet34", "efficientnetb7"}


@pytest.mark.parametrize(("extra", "devices"), [({}, None), (None, None),
                                                 ({"devices": ["/cpu:0"]}, ("/cpu:0",))])
def test_configs_saved_with_extra_still_load_and_resume(tmp_path, extra, devices):
    """Runs saved ``extra: {}`` (its one key, devices, is a field now): their config.json must
    load and equal the same settings written today, or they could not be resumed."""
    import json

    saved = TrainConfig(encoder_weights=None).to_dict()
    del saved["devices"]
    (tmp_path / "config.json").write_text(json.dumps({**saved, "extra": extra}))
    loaded = TrainConfig.load(tmp_path / "config.json")
    assert loaded.devices == devices
    assert loaded == TrainConfig(encoder_weights=None, devices=devices)
    assert "extra" not in loaded.to_dict()


def test_unused_extra_keys_are_dropped_with_a_warning(caplog):
    config = TrainConfig.from_dict({"extra": {"note": "first try"}})
    assert config == TrainConfig()
    assert "extra keys ['note'] are not used" in caplog.text
    with pytest.raises(ValueError, match="devices given twice"):
        TrainConfig.from_dict({"devices": ["/gpu:0"], "extra": {"devices": ["/gpu:1"]}})


@pytest.mark.parametrize("name, text, where", [
    ("c.yaml", "epochs: 3\nseed: 1\nepochs: 5\n", r"c\.yaml:3:1"),
    ("c.yaml", "augmentation:\n  speckle: false\n  speckle: true\n", r"c\.yaml:3:3"),
    ("c.json", '{"epochs": 3, "seed": 1, "epochs": 5}', r"c\.json"),
])
def test_a_key_given_twice_is_an_error_not_the_last_one_winning(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    key = "speckle" if "speckle" in text else "epochs"
    with pytest.raises(ValueError, match=rf"{where}: not valid .*key '{key}' is given twice"):
        TrainConfig.load(tmp_path / name)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    (tmp_path / "c.yaml").write_text("augmentation:\n  <<: {speckle: false}\n  speckle: true\n")
    assert TrainConfig.load(tmp_path / "c.yaml").augment_config().speckle is True


# --- settings by component: sections in files, options owned by registries ----------------------


def test_a_config_file_is_written_in_sections_without_the_options_of_choices_not_made(tmp_path):
    config = TrainConfig(architecture="classic_unet", lr_schedule="cosine", warmup_epochs=2,
                         epochs=5, seed=3, data="somewhere")
    written = json.loads(config.save(tmp_path / "config.json").read_text())
    assert set(written) == {"name", "seed", "data", "model", "optimisation", "runtime"}
    assert written["data"]["root"] == "somewhere" and written["seed"] == 3
    assert written["optimisation"]["warmup_epochs"] == 2
    # what only the unet architecture or the plateau schedule take is left out
    assert not {"encoder", "encoder_weights", "decoder_filters"} & set(written["model"])
    assert not {"reduce_lr_patience", "reduce_lr_factor"} & set(written["optimisation"])
    assert "image_head_weight" not in written["model"]  # no head
    assert TrainConfig.load(tmp_path / "config.json") == config
    yaml_path = config.save(tmp_path / "config.yaml")
    assert yaml.safe_load(yaml_path.read_text())["model"]["architecture"] == "classic_unet"
    assert TrainConfig.load(yaml_path) == config


def test_flat_configs_of_older_run_folders_and_sidecars_still_load():
    """The shim: a flat mapping (every run folder and sidecar written before sections, and
    ``--set``) gives the same config as its sectioned form."""
    for name in ("classic-unet-cosine-cpu", "lite0-joint-cpu"):
        flat = json.loads((PROJ_ROOT / "weights" / f"{name}.json").read_text())["config"]
        assert "model" not in flat  # written flat, before sections
        old = TrainConfig.from_dict({**flat, "data": None, "data_paths": {}})
        assert TrainConfig.from_dict(old.to_sections()) == old
        assert old.architecture == flat["architecture"] and old.epochs == flat["epochs"]
    full = TrainConfig(encoder="efficientnet-lite0", image_head=True).to_dict()
    assert TrainConfig.from_dict(full) == TrainConfig.from_dict(sections.nest(full))


@pytest.mark.parametrize(("values", "message"), [
    ({"model": {"epochs": 3}}, "unknown model key 'epochs'; epochs belongs in optimisation"),
    ({"runtime": {"seed": 1}}, "seed is a top-level key"),
    ({"optimisation": {"epochs": 3}, "epochs": 4}, "optimisation.epochs is given twice"),
    ({"model": ["unet"]}, "model must be a mapping"),
    ({"data": {"root": "x"}, "bogus": 1}, "unknown config key"),
])
def test_a_misplaced_or_doubled_section_key_is_named(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize(("values", "message"), [
    ({"optimizer": "adam", "weight_decay": 1e-4},
     "weight_decay applies to optimizer 'adamw', not optimizer 'adam'"),
    ({"lr_schedule": "cosine", "reduce_lr_patience": 3},
     "reduce_lr_patience applies to lr_schedule 'plateau', not lr_schedule 'cosine'"),
    ({"architecture": "classic_unet", "decoder_filters": [8, 8, 8, 8, 8]},
     "decoder_filters applies to architecture 'unet'"),
    ({"architecture": "unet", "depth": 3}, "depth applies to architecture 'classic_unet'"),
    ({"image_head_weight": 0.3}, "image_head_weight applies to image_head true, not "
                                 "image_head false"),
])
def test_an_option_of_a_choice_not_made_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


def test_every_registry_option_is_a_config_field_in_a_section():
    """A component's options are fields the sections place, or its settings could not be
    written; adding a schedule, optimizer or architecture is its entry with its options."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(sections.fields()) == known
    for _, choice, options in TrainConfig().components():
        assert choice in options
        assert set().union(*options.values()) <= known
    assert set(schedules.SCHEDULES) == set(CHOICES["lr_schedule"])
    rates = [schedules.schedule("cosine").make(
        TrainConfig(lr_schedule="cosine", epochs=4, warmup_epochs=1, learning_rate=1.0,
                    min_learning_rate=0.0), {}).rate(e) for e in range(4)]
    assert rates[0] == 0.5 and rates[1] == 1.0 and rates[-1] == 0.0  # warm-up, peak, end
