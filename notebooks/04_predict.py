# %% [markdown]
# # 04 · Segment new images
#
# **Purpose.** Load saved `.h5` weights and segment images the model has not seen: one binary
# mask and one overlay per image, at the image's own size.
#
# **Inputs.** Weights from `02_train` (`weights/<RUN_NAME>.h5`, or any busi `.h5`; on a fresh
# clone with nothing trained, the model shipped in `weights/`), and an image or a folder of
# images (PNG, JPEG, BMP; gray or colour). Without `INPUTS`, a few test images of the model's split
# are copied to a demo folder (this needs the dataset, see `01_data`).
#
# **Outputs.** `<stem>_pred.png` (mask, 0/255) and `<stem>_overlay.png` per image in
# `OUTPUT_DIR`. Research software: the masks are not for clinical decisions.

# %% [markdown]
# **Parameters.** This cell is tagged `parameters` (the papermill convention): the test suite
# inserts a cell after it with tiny values, so the same notebook runs at full size for you and in
# seconds in CI.

# %% tags=["parameters"]
RUN_NAME = "unet-resnet34"
RUN_DIR = None  # the run that made the weights: None: runs/<RUN_NAME> (on Drive with USE_DRIVE)
WEIGHTS_DIR = None  # None: weights/ (on Drive with USE_DRIVE)
USE_DRIVE = False  # Colab: the run and the weights are on Google Drive
WEIGHTS = None  # a .h5 file; None: <WEIGHTS_DIR>/<RUN_NAME>.h5 from 02_train, else the shipped one
# For images from other scanners: WEIGHTS = "weights/lite0-joint-cpu.h5" (BUSI + BUS-BRA) and INPUTS
INPUTS = None  # an image or a folder of images; None: N_DEMO test images of the run
OUTPUT_DIR = None  # None: predictions/ in the run folder
DATA = None  # the dataset, for the demo images, if not where the run's config says
N_DEMO = 6  # demo images copied when INPUTS is None
N_SHOW = 6  # overlays shown

# %% [markdown]
# `import busi` comes before anything of TensorFlow: it switches TensorFlow to Keras 2 (tf-keras),
# which segmentation-models needs. `%autoreload 2` picks up edits to the package without
# restarting the kernel.

# %%
# %load_ext autoreload
# %autoreload 2
# %matplotlib inline
from pathlib import Path

from IPython.display import display

import busi

# %% [markdown]
# The weights file and the run that made it:

# %%
run_dir, weights_dir = busi.notebook.locations(RUN_NAME, RUN_DIR, WEIGHTS_DIR, USE_DRIVE)
weights = Path(WEIGHTS) if WEIGHTS else busi.notebook.weights_or_shipped(
    weights_dir / f"{RUN_NAME}.h5")
weights

# %% [markdown]
# ## Load the weights
#
# The `.h5` file holds the whole model, normalisation included: it takes gray images replicated
# to 3 channels, float32 in [0, 255], at the size it was trained at. `open_model` checks the file
# against its record before TensorFlow reads it (the sidecar `<name>.json` that
# `busi.publish_weights` writes, or the run's `state.json`): a damaged or replaced file is refused.

# %%
model = busi.inference.predictor.open_model(weights)
model

# %% [markdown]
# ## Settings
#
# The record also holds the input size, the resize mode and the post-processing chosen on the
# validation images; `busi.predict` uses them. Weights no record covers get predict's defaults
# (letterbox, threshold 0.5).

# %%
model.settings

# %% [markdown]
# ## The images

# %%
# The split of the weights' own run: from their sidecar if they have one, else the run folder.
source = weights if weights.with_suffix(".json").is_file() else run_dir
inputs = Path(INPUTS) if INPUTS else busi.notebook.demo_inputs(
    source, run_dir / "demo_inputs", n=N_DEMO, data=DATA)
output_dir = Path(OUTPUT_DIR) if OUTPUT_DIR else run_dir / "predictions"
inputs, output_dir

# %% [markdown]
# ## Segment
#
# Masks are written at each image's original size; an unreadable file is skipped with a warning
# and its `error` column says why.

# %%
results = busi.predict(model, inputs, output_dir)
results[["input", "height", "width", "lesion_pixels", "max_probability", "error"]]

# %% [markdown]
# ## Overlays
#
# The predicted mask in red on each image:

# %%
for row in results.dropna(subset=["pred"]).head(N_SHOW).itertuples():
    image, mask = busi.data.read_image(row.input), busi.data.read_mask(row.pred)
    display(busi.plots.overlay(image, pred=mask, title=Path(row.input).name))

# %% [markdown]
# The files written:

# %%
sorted(path.name for path in output_dir.iterdir())
