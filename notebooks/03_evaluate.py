# %% [markdown]
# # 03 · Evaluate on the test images
#
# **Purpose.** Score the trained model the way BUSI results should be compared: per image, at
# the original resolution, with the threshold and post-processing chosen on the validation images
# only; Dice and IoU per class and over the lesion images (benign + malignant), normal images as a
# false-positive rate. Then look at overlays and at the worst cases.
#
# **Inputs.** A run folder from `02_train` and the dataset it was trained on.
#
# **Outputs.** In the run folder: `evaluation/` (`postprocess.json`, `per_image_val.csv`,
# `per_image_test.csv`, `summary.json`; with the image-level head also `gate_val.csv`,
# `gate_test.csv`, `gate.png`, `roc.png`) and `figures/` (overlays, worst cases).

# %% [markdown]
# **Parameters.** This cell is tagged `parameters` (the papermill convention): the test suite
# inserts a cell after it with tiny values, so the same notebook runs at full size for you and in
# seconds in CI.

# %% tags=["parameters"]
RUN_NAME = "unet-resnet34"
RUN_DIR = None  # None: runs/<RUN_NAME> (on Drive with USE_DRIVE)
WEIGHTS_DIR = None  # None: weights/ (on Drive with USE_DRIVE)
USE_DRIVE = False  # Colab: the run is on Google Drive
DATA = None  # the dataset, if it is no longer where the run's config says
SPLIT = "test"  # the part to score: "test" (or "val")
N_OVERLAYS = 8  # images in the overlay figure
N_WORST = 6  # worst lesion images shown

# %% [markdown]
# `import busi` comes before anything of TensorFlow: it switches TensorFlow to Keras 2 (tf-keras),
# which segmentation-models needs. `%autoreload 2` picks up edits to the package without
# restarting the kernel.

# %%
# %load_ext autoreload
# %autoreload 2
# %matplotlib inline
import pandas as pd

import busi
import busi.evaluation.classification
import busi.evaluation.report
import busi.inference.run_models
import busi.runs.evaluations

# %% [markdown]
# The run folder `02_train` wrote:

# %%
run_dir, weights_dir = busi.notebook.locations(RUN_NAME, RUN_DIR, WEIGHTS_DIR, USE_DRIVE)
run_dir

# %% [markdown]
# ## Evaluate
#
# Post-processing (threshold, flip test-time augmentation, removal of small components) is chosen
# on the validation images, then the test images are scored once with it.

# %%
summary = busi.evaluate(run_dir, split=SPLIT, data=DATA)
summary["postprocess"]

# %% [markdown]
# ## The metrics
#
# Means over the images of each class and over all lesion images; `missed` counts lesion images
# with an empty prediction (Dice 0). Normal images have no lesion: they count only as false
# positives (any predicted pixel).

# %%
pd.DataFrame(summary["splits"][SPLIT]).T.round(3)

# %% [markdown]
# Per image (`evaluation/per_image_<split>.csv`):

# %%
per_image = busi.runs.evaluations.per_image(busi.RunFolder(run_dir), SPLIT)
per_image.head()

# %% [markdown]
# ## Distributions
#
# Dice and IoU of the lesion images, per class:

# %%
lesions = per_image[per_image["label"].isin(busi.data.LESION_CLASSES)]
lesions.boxplot(column=["dice", "iou"], by="label", figsize=(8, 3.5));

# %% [markdown]
# ## Is there a lesion, is it malignant
#
# A model trained with the image-level head (`image_head: true`; `busi.models.heads`) also says
# whether an image shows a lesion and whether it is malignant. Its lesion probability gates the
# mask: an image below the threshold chosen on validation gets an empty mask. Shown here: the two
# AUCs, accuracy and the confusion matrix with bootstrap 95% intervals, the ROC curves, and what the
# gate costs in lesion Dice for what it saves on normal images, across thresholds.

# %%
classification = summary["splits"][SPLIT].get("classification")
if classification is None:
    print("this model has no image-level head (image_head: true in a config adds one)")
else:
    print(busi.evaluation.report.classification_table(classification))
    evaluation = busi.runs.evaluations.evaluation_dir(busi.RunFolder(run_dir))
    busi.plots.gate_curves({part: pd.read_csv(evaluation / f"gate_{part}.csv")
                            for part in dict.fromkeys(("val", SPLIT))},
                           summary["postprocess"].get("gate"))
    probabilities = per_image[["p_normal", "p_benign", "p_malignant"]].to_numpy()
    points = busi.evaluation.classification.roc_points(per_image["label"], probabilities)
    busi.plots.roc_curves(points)

# %% [markdown]
# ## Overlays
#
# The model's masks at original size, post-processed as chosen on validation: ground truth in
# green, prediction in red.

# %%
images, masks = busi.inference.run_models.run_predictions(busi.RunFolder(run_dir), SPLIT, data=DATA)

# %% [markdown]
# The first `N_OVERLAYS` images of the part (the figure is saved in `figures/`):

# %%
busi.plots.overlays(images, masks, ids=list(images["id"][:N_OVERLAYS]),
                    path=busi.RunFolder(run_dir).figures / f"overlays_{SPLIT}.png")

# %% [markdown]
# ## The worst cases
#
# The lesion images with the lowest Dice: missed lesions, shadows taken for lesions, partial
# masks. They say more about the model than its mean.

# %%
busi.plots.worst_cases(per_image, images, masks, n=N_WORST,
                       path=busi.RunFolder(run_dir).figures / f"worst_{SPLIT}.png")

# %% [markdown]
# ## Save the weights with these settings
#
# The weights in the weights folder get a sidecar `<RUN_NAME>.json` with the post-processing chosen
# on validation and these test metrics, so `04_predict` and `busi predict` use the same settings.

# %%
busi.publish_weights(run_dir, weights_dir, RUN_NAME)
