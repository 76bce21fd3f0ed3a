"""FID plumbing shared by `ldm bench-recon` (rFID) and `ldm eval-samples` (sample FID).

The feature extractor is torch-fidelity's InceptionV3 (pool3, 2048 features) as wrapped by
torchmetrics' `NoTrainInceptionV3`, built from the weights file `ldm_core.models.pretrained.find_weights`
gives (a path given, torch hub's cache, or torch-fidelity's file downloaded there on first use and checked
before it is kept); `feature_extractor_weights_path` is always given, so neither library downloads by itself. Resizing to 299 uses torch-fidelity's TF1-compatible bilinear
interpolation (`antialias=False`): torchmetrics >= 1.8 defaults to an antialiased resize that gives
numbers not comparable with published FIDs (docs/reconstruction-protocol.md). Images are fed as
uint8, because torchmetrics' `normalize=True` path truncates floats instead of rounding them.

Statistics are running sums (torchmetrics' FID states: feature sum, outer-product sum, count, in
float64), so memory does not grow with the number of images, and shards computed by several processes
are merged by adding their states; the result equals a single-process run up to float rounding.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from ldm_core.models.pretrained import INCEPTION_FID_FILE, WeightsFileError, expected_weights, find_weights, load_state_dict

FID_FEATURES = 2048
FID_IMPL = ("torchmetrics 1.9 FrechetInceptionDistance with torch-fidelity InceptionV3 "
            f"({INCEPTION_FID_FILE}), pool3 2048-d features, TF1-compatible bilinear resize to 299 "
            "(antialias=False), uint8 input")
# Two tensors of torch-fidelity's FeatureExtractorInceptionV3 ("inception-v3-compat") and their shapes: the
# first convolution and the 1008-way classifier, so another network's file is refused before it is built.
_INCEPTION_LANDMARKS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}
_STATE_KEYS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples",
               "fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


def load_fid_inception(weights_path: Optional[str | os.PathLike] = None,
                       device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the FID Inception network from its weights file, downloaded on first use.

    Parameters:
        weights_path: explicit path of `weights-inception-2015-12-05-6726825d.pth`; otherwise torch hub's
            checkpoint cache, where it is downloaded when absent (offline: an error instead).
        device: where the network runs.

    Raises:
        MissingWeightsError: the file is absent and cannot be fetched now; the message says how and where.
        WeightsFileError: the file is not the FID Inception weights (random bytes, text, Python objects,
            another network's tensors, a cut download); the message names it and what it should be.
    """
    path = find_weights(INCEPTION_FID_FILE, weights_path, option_hint="--fid-weights PATH",
                        check=check_inception_file)
    check_inception_file(path)
    should = f"It should be {expected_weights(INCEPTION_FID_FILE)}."
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FID_FEATURES)],
                                 feature_extractor_weights_path=str(path), antialias=False)
    except RuntimeError as err:  # torch's strict load_state_dict: missing, unexpected or reshaped tensors
        detail = " ".join(str(err).split())
        raise WeightsFileError(f"The weights file {path} does not fit the FID Inception network "
                               f"({detail[:240]}{'...' if len(detail) > 240 else ''}). {should}") from None
    net.num_features = FID_FEATURES  # spares torchmetrics a dummy forward pass to infer it
    return net.to(device)


def check_inception_file(path: str | os.PathLike) -> None:
    """Refuse a file that is not torch-fidelity's Inception weights (WeightsFileError naming it): it must be a
    state dict of tensors only (torch-fidelity reads it with a full unpickler) with the network's first
    convolution and 1008-way classifier in their shapes. Its publisher states no hash, so this is the check a
    download gets before it is kept."""
    should = f"It should be {expected_weights(INCEPTION_FID_FILE)}."
    state = load_state_dict(Path(path), expected=expected_weights(INCEPTION_FID_FILE))
    for key, shape in _INCEPTION_LANDMARKS.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            found = "is missing" if value is None else (
                f"has shape {tuple(value.shape)}, not {shape}" if isinstance(value, torch.Tensor) else "is not a tensor")
            raise WeightsFileError(f"The weights file {path} is not the FID Inception network: its tensor {key!r} "
                                   f"{found}. {should}")


class FIDStatistics:
    """Running Inception statistics of a reference set and a compared set, mergeable across shards.

    Parameters:
        feature_net: a module mapping uint8 images (B, 3, H, W) to features (B, D); normally
            `load_fid_inception()`. Any other network is for structural tests only: its numbers are
            not FIDs.
        device: where features are computed.
    """

    def __init__(self, feature_net: torch.nn.Module, device: str | torch.device = "cpu"):
        self.metric = FrechetInceptionDistance(
            feature=feature_net, reset_real_features=False, normalize=False,
            # Shards are merged explicitly (merge_state) so one code path serves 1 and N processes.
            sync_on_compute=False).to(device)
        self.device = torch.device(device)

    def update(self, images: torch.Tensor, *, real: bool) -> None:
        """Add uint8 images (B, 3, H, W) to the reference (`real=True`) or compared statistics."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FID expects uint8 images (B, 3, H, W); got {images.dtype} "
                             f"{tuple(images.shape)}.")
        self.metric.update(images.to(self.device), real=real)

    def state(self) -> dict:
        """The running sums on the CPU (picklable, for gathering across processes)."""
        return {key: getattr(self.metric, key).detach().cpu().clone() for key in _STATE_KEYS}

    def merge(self, state: dict, *, real: bool = True, fake: bool = True) -> None:
        """Add another shard's sums (or only its reference / compared half) to these statistics."""
        prefixes = (("real_",) if real else ()) + (("fake_",) if fake else ())
        for key in _STATE_KEYS:
            if key.startswith(prefixes):
                current = getattr(self.metric, key)
                setattr(self.metric, key, current + state[key].to(current.device, current.dtype))

    def counts(self) -> tuple[int, int]:
        return (int(self.metric.real_features_num_samples), int(self.metric.fake_features_num_samples))

    def compute(self) -> float:
        """The Frechet distance between the two Gaussians; needs at least 2 images on each side."""
        n_real, n_fake = self.counts()
        if n_real < 2 or n_fake < 2:
            raise ValueError(f"FID needs at least 2 images on each side; got {n_real} reference and "
                             f"{n_fake} compared images.")
        # torchmetrics records the output dtype only inside update(); a merged-only state lacks it.
        if not hasattr(self.metric, "orig_dtype"):
            self.metric.orig_dtype = torch.float32
        with warnings.catch_warnings():  # merged states count as updated; torchmetrics cannot tell
            warnings.filterwarnings("ignore", message=".*compute.*called before the ``update``")
            return float(self.metric.compute())


__all__ = ["FID_FEATURES", "FID_IMPL", "FIDStatistics", "load_fid_inception"]
