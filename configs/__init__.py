"""The YAML presets of two-stage-ldm: `demo.yaml` at the top, autoencoder presets in `vae/` and U-Net
presets in `unet/`. This folder is a package only so that the presets ship as package data in the
wheel; `ldm_core/config/preset_files.py` reads them with `importlib.resources`, and there is no Python code
here.
"""
