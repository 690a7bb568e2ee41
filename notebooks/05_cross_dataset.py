# %% [markdown]
# # 05 · A second dataset: BUS-BRA
#
# **Purpose.** How far does a model trained on BUSI carry? BUS-BRA (Gómez-Flores et al., Medical
# Physics 2024: 1875 images of 1064 patients, four scanners, Brazil, every image a biopsy-proven
# lesion) at a glance, its patient-grouped split, the BUSI model scored on it with the
# post-processing chosen on BUSI validation, a joint model trained on both, and the failure cases
# of the two models side by side.
#
# **Inputs.** BUSI and BUS-BRA (`Images/`, `Masks/`, `bus_data.csv`, from Zenodo record
# 10.5281/zenodo.7730709; set `BUSBRA_DATA` or `BUSBRA`), and a run trained on BUSI alone
# (`02_train`).
#
# **Outputs.** `<BUSI run>/evaluation-busbra/` (per-image scores and summary on BUS-BRA), a joint
# run folder `runs/<JOINT_RUN_NAME>/` with `evaluation/` (BUSI test) and `evaluation-busbra/`
# (BUS-BRA test), and the figure `figures/busbra_failures.png` in the joint run.

# %% [markdown]
# **Parameters.** This cell is tagged `parameters` (the papermill convention): the test suite
# inserts a cell after it with tiny values, so the same notebook runs at full size for you and in
# seconds in CI.

# %% tags=["parameters"]
BUSI = None  # BUSI folder; None: $BUSI_DATA, data/raw, data/
BUSBRA = None  # BUS-BRA folder; None: $BUSBRA_DATA, data/raw/BUS-BRA, data/
BUSI_RUN = "runs/unet-resnet34"  # a run trained on BUSI alone (02_train)
PART = "test"  # BUS-BRA images for the BUSI model: "test" (as the joint model) or "all"
JOINT_RUN_NAME = "unet-resnet34-busi-busbra"
JOINT_RUN_DIR = None  # None: runs/<JOINT_RUN_NAME> (on Drive with USE_DRIVE)
USE_DRIVE = False  # Colab: keep the joint run on Google Drive
ARCHITECTURE = "unet"  # as in 02_train
ENCODER = "resnet34"
ENCODER_WEIGHTS = "imagenet"  # None: from scratch (no download)
BASE_FILTERS = 32  # classic_unet only
IMAGE_SIZE = 256
EPOCHS = 50
BATCH_SIZE = 8
LIMIT = None  # images per split part, for quick runs; None: all
N_SAMPLES = 8  # BUS-BRA images shown
N_FAILURES = 4  # failure cases shown side by side

# %% [markdown]
# `import busi` comes before anything of TensorFlow: it switches TensorFlow to Keras 2 (tf-keras),
# which segmentation-models needs. `%autoreload 2` picks up edits to the package without
# restarting the kernel.

# %%
# %load_ext autoreload
# %autoreload 2
# %matplotlib inline
from pathlib import Path

import pandas as pd

import busi
import busi.inference.run_models
import busi.runs.evaluations

# %% [markdown]
# ## BUS-BRA at a glance
#
# Indexed and checked like BUSI (a missing mask, an image not in `bus_data.csv`, a mask of the
# wrong size are each named by file). Every image has a lesion: benign or malignant, no normal
# images. The index keeps the patient (`Case`) and the scanner.

# %%
busbra_root = busi.data.datasets.get("busbra").locate(BUSBRA)
table = busi.data.add_groups(busi.data.datasets.load("busbra", busbra_root))
print(f"{len(table)} images of {table['patient'].nunique()} patients")
table.groupby(["device", "label"]).size().unstack(fill_value=0)

# %% [markdown]
# Images per patient (views `l`, `r`, `s` of the same lesion):

# %%
table.groupby("patient").size().value_counts().sort_index().rename("patients")

# %% [markdown]
# Image sizes and lesion size (fraction of the image), beside BUSI's: BUS-BRA images are
# smaller and cropped to the breast, their lesions take a larger share of the image.

# %%
busi_table = busi.data.datasets.load("busi", BUSI)
columns = ["height", "width", "lesion_fraction"]
lesions = busi_table[busi_table["label"] != "normal"]
pd.concat({"BUSI lesions": lesions[columns].describe(), "BUS-BRA": table[columns].describe()},
          axis=1).round(3)

# %% [markdown]
# A few BUS-BRA images with their lesion contours (green):

# %%
busi.plots.sample_grid(table, n=N_SAMPLES, seed=0)

# %% [markdown]
# ## Groups and split
#
# A group must never straddle two parts of a split: all views of a patient, and any near
# duplicates (perceptual hash within 8 bits, as for BUSI), even across patients.

# %%
pairs = busi.data.duplicate_pairs(table)
crossing = table.groupby("group")["patient"].nunique() > 1
print(f"near-duplicate pairs: {len(pairs)}, groups: {table['group'].nunique()}, "
      f"groups spanning several patients: {int(crossing.sum())}")

# %% [markdown]
# busi's split (grouped, stratified by label, seed 0) and, as an alternative, the authors'
# 5-fold partition (fold 1 as test, validation drawn grouped from the rest): no patient in two
# parts in either.

# %%
ours = busi.data.make_split(table, seed=0)
authors = busi.data.busbra.authors_split(busbra_root, table, fold=1)
for name, split in (("busi split", ours), ("authors' fold 1", authors)):
    parts = split.merge(table[["id", "patient"]], on="id")
    print(f"{name}: {split['split'].value_counts().to_dict()}, patients in two parts: "
          f"{int((parts.groupby('patient')['split'].nunique() > 1).sum())}")

# %% [markdown]
# ## The BUSI model on BUS-BRA
#
# Threshold and post-processing stay those chosen on the BUSI validation images: tuning them on
# BUS-BRA would report a best case, not what a user of the BUSI model gets. Results go to
# `evaluation-busbra/` in the BUSI run.

# %%
busi_run = Path(BUSI_RUN)
on_busi = busi.evaluate(busi_run)
on_busbra = busi.evaluate(busi_run, dataset="busbra", split=PART, data=busbra_root)
pd.DataFrame({"BUSI test": on_busi["splits"]["test"]["lesion"],
              f"BUS-BRA {PART}": on_busbra["splits"][PART]["lesion"]}).T.round(3)

# %% [markdown]
# ## The joint model
#
# One config names both datasets: each is split on its own (the BUSI part is the split of a
# BUSI-only run), training uses both train parts, validation monitors both val parts, and each
# test part is reported apart, never pooled into one number that hides a dataset.

# %%
joint_dir, _ = busi.notebook.locations(JOINT_RUN_NAME, JOINT_RUN_DIR, None, USE_DRIVE)
config = busi.TrainConfig(
    name=JOINT_RUN_NAME, run_dir=str(joint_dir), datasets=["busi", "busbra"],
    data=None if BUSI is None else str(BUSI), data_paths={"busbra": str(busbra_root)},
    architecture=ARCHITECTURE, encoder=ENCODER, encoder_weights=ENCODER_WEIGHTS,
    base_filters=BASE_FILTERS, image_size=IMAGE_SIZE, epochs=EPOCHS, batch_size=BATCH_SIZE,
    limit=LIMIT, evaluate=False,
)
joint_run = busi.train(config)
joint = {name: busi.evaluate(joint_run, dataset=name) for name in config.datasets}

# %% [markdown]
# Lesion figures on each test part (BUS-BRA: the same test part for both models when
# `PART` is "test"):

# %%
pd.DataFrame({
    "BUSI model, BUSI test": on_busi["splits"]["test"]["lesion"],
    f"BUSI model, BUS-BRA {PART}": on_busbra["splits"][PART]["lesion"],
    "joint model, BUSI test": joint["busi"]["splits"]["test"]["lesion"],
    "joint model, BUS-BRA test": joint["busbra"]["splits"]["test"]["lesion"],
}).T[["n", "dice_mean", "dice_median", "iou_mean", "missed"]].round(3)

# %% [markdown]
# ## Failure cases side by side
#
# The BUS-BRA test images on which the BUSI model does worst, with the joint model's masks on the
# same images: ground truth green, prediction red.

# %%
busi_rows, busi_masks = busi.inference.run_models.run_predictions(
    busi.RunFolder(busi_run), PART, data=busbra_root, dataset="busbra")
joint_rows, joint_masks = busi.inference.run_models.run_predictions(
    busi.RunFolder(joint_run), "test", dataset="busbra")
per_image = {
    "BUSI model": busi.runs.evaluations.per_image(busi.RunFolder(busi_run), PART,
                                                    dataset="busbra"),
    "joint model": busi.runs.evaluations.per_image(busi.RunFolder(joint_run), "test",
                                                     dataset="busbra"),
}
common = per_image["BUSI model"][per_image["BUSI model"]["id"].isin(joint_rows["id"])]
worst = list(common.sort_values("dice", kind="mergesort")["id"].head(N_FAILURES))
scores = {name: dict(zip(frame["id"], frame["dice"], strict=True))
          for name, frame in per_image.items()}
busi.plots.side_by_side(busi_rows, {"BUSI model": busi_masks, "joint model": joint_masks},
                        worst, scores=scores,
                        path=busi.RunFolder(joint_run).figures / "busbra_failures.png")
