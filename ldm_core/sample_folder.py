"""The files of a sample folder: what `ldm generate` writes and `ldm eval-samples` and the demo read.

Defined once here, below both the workflows that write them and the evaluation that reads them.
"""

from __future__ import annotations

import re

GRID_FILE = "grid.png"  # all images in one picture; never scored
LABELS_FILE = "labels.json"  # the class each image was generated for (class-conditional samples only)
SCORES_FILE = "eval.json"  # `ldm eval-samples`' default output, beside the images it scores
# image_{i:05d}.png: five digits or more (100000 images and up get six).
IMAGE_NAME = re.compile(r"image_\d{5,}\.png")


def image_file_name(i: int) -> str:
    """The file name of generated image i (zero-padded, so names sort in image order)."""
    return f"image_{i:05d}.png"
