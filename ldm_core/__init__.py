"""The bottom layer both stages share; it imports none of the project's other packages.

- `config/`: typed settings, YAML presets and `key=value` overrides.
- `data/`: everything that turns a `--data` spec into batches (files, sources, crops, loaders, shapes).
- `models/`: pretrained weight files, model folders, the latent scale.
- `images/`: what is measured on or drawn from finished images (metrics, grids).
- `training/`: the run skeleton both trainers use (folder, accelerator, checkpoints, optimisation, stopping).
- `atomic_files.py`, `image_values.py`, `randomness.py`: the few helpers every layer above uses.
"""
