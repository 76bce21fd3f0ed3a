"""Scores of samples drawn during Stage B's training: a signal beside the loss that needs no pretrained network.

Every `sampling.metrics_every` steps Stage B draws `sampling.metrics_images` samples from fixed noise and
hands them to a `SampleScorer`, built once per run from held-out images (the reference) and as many
training images (the floor's set): the sliced Wasserstein distance of the samples to the held-out images
(evaluation/swd.py), the same distance for the training images (the floor: what real images score at this
sample count), and, on builtin:shapes, the exact scorer's share of valid samples. Stage B imports none of
this (it may import only ldm_core); `workflows/train_unet.py` passes `SampleScorer` in.
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation.swd import PatchDescriptors, swd


class SampleScorer:
    """Scores sample batches against a fixed reference set.

    Parameters:
        reference: uint8 (N, 3, R, R) held-out images.
        floor_images: uint8 (M, 3, R, R) other real images (training images), scored as samples are.
        exact_shapes: also report the shapes scorer's validity (the data is builtin:shapes).
    """

    def __init__(self, reference: np.ndarray, floor_images: np.ndarray, exact_shapes: bool = False):
        self.reference = self._descriptors(reference)
        self.floor = swd(self._descriptors(floor_images), self.reference)
        self.exact_shapes = exact_shapes

    @staticmethod
    def _descriptors(images: np.ndarray) -> PatchDescriptors:
        collected = PatchDescriptors()
        collected.add(torch.from_numpy(np.ascontiguousarray(images)))
        return collected

    def __call__(self, samples: np.ndarray) -> dict[str, float]:
        """{"swd", "swd_floor"} (x1e3, mean over pyramid levels) and, for the shapes, "valid" (a fraction)."""
        scores = {"swd": swd(self._descriptors(samples), self.reference)["mean"], "swd_floor": self.floor["mean"]}
        if self.exact_shapes:
            from evaluation.shapes_score import score_images

            scores["valid"] = float(score_images(samples)["validity"])
        return scores
