# %% [markdown]
# **Colab.** In Google Colab the next cell clones the repository `REPO` into `/content/busi` (code,
# configs and the shipped model in `weights/`) and installs it with `%pip`; a second run, or a
# restarted runtime, reuses the clone. Elsewhere it does nothing: install the project with
# `pip install -e ".[notebooks]"` instead.

# %%
# Colab only: clone busi (code and shipped model) and install it. Elsewhere this cell does nothing.
import importlib.util
import os
import subprocess
import sys

REPO = "<owner>/busi"  # GitHub owner/name of the repository this notebook comes from
CLONE = "/content/busi"
IN_COLAB = "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ
if IN_COLAB and importlib.util.find_spec("busi") is None:
    if not os.path.isdir(CLONE):
        if REPO.startswith("<"):
            raise RuntimeError(
                "Set REPO in this cell to the GitHub repository this notebook comes from, as "
                "owner/name (the part after 'github/' in this page's Colab address, e.g. "
                "REPO = 'your-name/busi'), then run the cell again.")
        clone = subprocess.run(["git", "clone", "--depth", "1", f"https://github.com/{REPO}",
                                CLONE], capture_output=True, text=True)
        if clone.returncode:
            raise RuntimeError(f"Could not clone https://github.com/{REPO}: "
                               f"{clone.stderr.strip()}. Is REPO right, and the repository "
                               "public?")
    # %pip install -q -e "{CLONE}[pretrained]"
    sys.path.insert(0, f"{CLONE}/src")  # an editable install is seen only after a restart
