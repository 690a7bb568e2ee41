# %% [markdown]
# # 01 · The BUSI data
#
# **Purpose.** Look at the dataset before anything trains: the classes, the image sizes, the
# masks (some images have several), the duplicate images, and how the train/val/test split keeps
# duplicates apart.
#
# **Inputs.** BUSI, the folder `Dataset_BUSI_with_GT` with `benign/`, `malignant/`, `normal/`
# (Al-Dhabyani et al., *Data in Brief* 2020). It is downloaded from Kaggle if it is not found.
#
# **Outputs.** Tables and figures only; the dataset is only read. Training (`02_train`) makes the
# same split (same function, same seed) and saves it in its run folder.

# %% [markdown]
# **Parameters.** This cell is tagged `parameters` (the papermill convention): the test suite
# inserts a cell after it with tiny values, so the same notebook runs at full size for you and in
# seconds in CI.

# %% tags=["parameters"]
DATA = None  # BUSI folder, or where to download it; None: $BUSI_DATA, data/raw, data/
DOWNLOAD = True  # fetch BUSI from Kaggle (public, no account) if it is not found
N_SAMPLES = 12  # images in the sample grid
SEED = 0  # seed of the sample grid and of the split (training's default seed is 0 too)

# %% [markdown]
# `import busi` comes before anything of TensorFlow: it switches TensorFlow to Keras 2 (tf-keras),
# which segmentation-models needs. `%autoreload 2` picks up edits to the package without
# restarting the kernel.

# %%
# %load_ext autoreload
# %autoreload 2
# %matplotlib inline
import numpy as np
import pandas as pd

import busi

# %% [markdown]
# ## Get the data
#
# Found where it usually is, or downloaded (about 200 MB).

# %%
root = busi.notebook.get_data(DATA, download=DOWNLOAD)
root

# %% [markdown]
# ## The index: one checked row per image
#
# Masks are paired with their image by file name (`X.png`, `X_mask.png`, `X_mask_1.png`, ...),
# whatever their storage (1-bit, gray, RGB, RGBA). An image without a mask, or a mask of another
# size than its image, is reported by name and left out.

# %%
table = busi.data.index(root)
table.head()

# %% [markdown]
# ## Class counts
#
# Images per class and per number of masks: normal images have one empty mask; a few lesion
# images have two or three masks, one per lesion, merged by logical OR.

# %%
pd.crosstab(table["label"], table["mask_count"], margins=True)

# %% [markdown]
# ## Image sizes
#
# Sizes vary, so the model sees a letterboxed (padded, not distorted) copy at a fixed size, and
# evaluation maps its output back to each image's own size.

# %%
table.groupby("label")[["height", "width"]].agg(["min", "median", "max"])

# %% [markdown]
# Lesion area as a fraction of the image: small lesions are where Dice is least forgiving.

# %%
table.groupby("label")["lesion_fraction"].describe().round(3)

# %% [markdown]
# ## Images with their masks
#
# A seeded random sample; the merged mask is drawn as a green contour.

# %%
busi.plots.sample_grid(table, n=N_SAMPLES, seed=SEED)

# %% [markdown]
# ## Images with several masks
#
# Their masks merged into one, as training sees them.

# %%
multi = table[table["mask_count"] > 1]
multi[["id", "label", "mask_count"]]

# %% [markdown]
# Each drawn with its merged mask:

# %%
busi.plots.sample_grid(multi, n=len(multi), ncols=4)

# %% [markdown]
# ## Duplicates
#
# BUSI holds exact copies and near duplicates (the same scan with and without calliper marks, or
# two frames a moment apart). Pairs are found by pixel hash (exact) and by perceptual hash (at
# most 8 bits apart), closest first.

# %%
pairs = busi.data.duplicate_pairs(table)
print(f"{len(pairs)} pairs, {int(pairs['exact'].sum())} exact, "
      f"{int((pairs['label_a'] != pairs['label_b']).sum())} across classes")
pairs.head(10)

# %% [markdown]
# The closest pairs, one pair per row. Their masks can differ: the same lesion outlined twice.

# %%
shown = pairs.head(4)[["id_a", "id_b"]].to_numpy().ravel()
busi.plots.sample_grid(table.set_index("id").loc[shown].reset_index(), n=len(shown), ncols=2)

# %% [markdown]
# Pairs chain into groups (A~B and B~C puts A, B and C together). How many groups of each size:

# %%
table = busi.data.add_groups(table)
table["group"].value_counts().value_counts().sort_index().rename_axis("images in group")

# %% [markdown]
# Groups whose images carry different labels: the same scan filed as benign and as malignant, or
# as normal and as benign. Training leaves them out (`TrainConfig(drop_conflicts=True)`, the
# default, through `busi.data.drop_conflicts`): either label would be a guess.

# %%
conflicts = busi.data.conflicting_groups(table)
conflicts[["id", "label", "group"]]

# %% [markdown]
# ## The split
#
# Stratified by label and grouped by duplicate group (70/10/20 by default), made by the same
# function and settings as training, so this is the split `02_train` will save.

# %%

split = busi.data.make_run_split(busi.TrainConfig(seed=SEED), table)
pd.crosstab(split["label"], split["split"], margins=True)

# %% [markdown]
# What the split does with the duplicates: every group lies in one part, so no scan is in train
# and test at once (`busi.data.load_split` refuses a split file where one does not). Images in
# duplicate groups, per part:

# %%
grouped = split[split["group"].duplicated(keep=False)]
straddling = int((grouped.groupby("group")["split"].nunique() > 1).sum())
print(f"duplicate groups in more than one part: {straddling}")
pd.crosstab(grouped["label"], grouped["split"], margins=True)

# %% [markdown]
# None of the label-conflicting images is in the split:

# %%
int(split["id"].isin(conflicts["id"]).sum())

# %% [markdown]
# What a random image-level split would do instead (the 80/20 split of lesion images of most BUSI
# notebooks): the share of its test images with a near duplicate in its training images. Those
# are scored on scans the model has already seen.

# %%
lesions = table[table["label"] != "normal"]
is_test = np.random.default_rng(SEED).random(len(lesions)) < 0.2
random_split = lesions.assign(split=np.where(is_test, "test", "train"))
print(f"random split: {busi.data.leaked(random_split).mean():.0%} of test images leaked; "
      f"this project's split: {busi.data.leaked(split).mean():.0%}")
