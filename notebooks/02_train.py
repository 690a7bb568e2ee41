# %% [markdown]
# # 02 · Train the U-Net
#
# **Purpose.** Train a U-Net with a ResNet34 encoder (segmentation-models, ImageNet weights) with
# Dice + focal loss, watch the loss, IoU and F-score (Dice) curves, and keep the best weights.
#
# **Inputs.** BUSI (see `01_data`).
#
# **Outputs.** A run folder `runs/<RUN_NAME>/` (config, split, history, `best.h5`, `last.h5`,
# TensorBoard logs, `figures/curves.png`) and the best weights as `weights/<RUN_NAME>.h5`. With
# `USE_DRIVE = True` in Colab both go to Google Drive (`MyDrive/busi/`). Running the notebook
# again on the same run folder resumes training where it stopped.

# %% [markdown]
# **Parameters.** This cell is tagged `parameters` (the papermill convention): the test suite
# inserts a cell after it with tiny values, so the same notebook runs at full size for you and in
# seconds in CI.

# %% tags=["parameters"]
DATA = None  # BUSI folder; None: $BUSI_DATA, data/raw, data/, else downloaded to data/raw
RUN_NAME = "unet-resnet34"
RUN_DIR = None  # None: runs/<RUN_NAME> (on Drive with USE_DRIVE); an existing run resumes
WEIGHTS_DIR = None  # None: weights/ (on Drive with USE_DRIVE)
USE_DRIVE = False  # Colab: keep the run and the weights on Google Drive
ARCHITECTURE = "unet"  # "unet" (segmentation-models) or "classic_unet" (from scratch)
ENCODER = "resnet34"  # or "efficientnet-lite0": ImageNet weights from busi[pretrained], no download
ENCODER_WEIGHTS = "imagenet"  # None: train the encoder from scratch (no download)
BASE_FILTERS = 32  # classic_unet only
IMAGE_SIZE = 256
EPOCHS = 50
BATCH_SIZE = 8
LEARNING_RATE = 1e-4
MAX_MINUTES = None  # time budget of this session (Colab sessions end): run again to continue
LIMIT = None  # images per split part, for quick runs; None: all

# %% [markdown]
# `import busi` comes before anything of TensorFlow: it switches TensorFlow to Keras 2 (tf-keras),
# which segmentation-models needs. `%autoreload 2` picks up edits to the package without
# restarting the kernel.

# %%
# %load_ext autoreload
# %autoreload 2
# %matplotlib inline

import busi

# %% [markdown]
# ## The data
#
# Found, or downloaded if this is a fresh machine (a new Colab session, say).

# %%
root = busi.notebook.get_data(DATA)
root

# %% [markdown]
# ## Where the run and the weights go

# %%
run_dir, weights_dir = busi.notebook.locations(RUN_NAME, RUN_DIR, WEIGHTS_DIR, USE_DRIVE)
run_dir, weights_dir

# %% [markdown]
# ## The settings
#
# One `TrainConfig` describes the run; it is saved as `config.json` in the run folder. The split
# is made with the seed of the config (the one `01_data` shows). Evaluation is left to
# `03_evaluate`, so `evaluate=False` here.

# %%
config = busi.TrainConfig(
    name=RUN_NAME, data=str(root), run_dir=str(run_dir), architecture=ARCHITECTURE, encoder=ENCODER,
    encoder_weights=ENCODER_WEIGHTS, base_filters=BASE_FILTERS, image_size=IMAGE_SIZE,
    epochs=EPOCHS, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, loss="dice_focal",
    max_minutes=MAX_MINUTES, limit=LIMIT, evaluate=False,
)
config.to_dict()

# %% [markdown]
# ## Train
#
# A progress bar per epoch. `best.h5` is saved whenever the validation IoU improves, `last.h5`
# (with the optimizer state, for resuming) after every epoch; early stopping and learning-rate
# reduction watch the validation IoU too. With `MAX_MINUTES` set, no epoch starts that would end
# past the budget, and a message says where training stopped; run the cell again to continue.

# %%
run = busi.train(config)
run

# %% [markdown]
# ## Curves
#
# The per-epoch history (`history.csv` in the run folder):

# %%
history = busi.RunFolder(run).read_history()
history.tail()

# %% [markdown]
# Loss, IoU and F-score (Dice) on the training and validation images; the dashed line marks the
# epoch of `best.h5`. These are batch-level training metrics; the reported numbers are computed
# per image at the original resolution in `03_evaluate`.

# %%
busi.plots.training_curves(history, path=busi.RunFolder(run).figures / "curves.png")

# %% [markdown]
# The epoch of the best weights:

# %%
history.loc[history["val_iou_score"].idxmax()]

# %% [markdown]
# ## Save the best weights
#
# `best.h5` is a full Keras model (its first layer does the encoder's normalisation), so the copy
# in the weights folder is all `04_predict` or anyone else needs to segment images. Beside it,
# `<RUN_NAME>.json` keeps the input size, resize mode and (once `03_evaluate` has run) the
# post-processing chosen on validation, tied to these weights by their SHA-1.

# %%
weights = busi.publish_weights(run, weights_dir, RUN_NAME)
weights
