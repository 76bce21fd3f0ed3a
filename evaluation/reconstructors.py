"""What `ldm bench-recon` compares: KL autoencoders read from folders, and a bicubic baseline.

Each reconstructor maps a float batch in [-1, 1] to a float batch in [-1, 1] (quantisation to uint8 is
the caller's, so every row of a table is quantised the same way) and reports the latents it decoded.
Also here: the peak-memory probe and the running latent statistics measured around them.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ldm_core.models.autoencoder_folders import load_frozen_vae, read_vae_folder, vae_downsampling_factor
from ldm_core.models.hub import describe_model_source, hub_repo_id
from ldm_core.randomness import image_generator


class Reconstructor:
    """Interface of a compared model. Subclass it to benchmark any callable autoencoder.

    Attributes:
        name: the row label in the tables.
        factor: spatial down-sampling factor f of the latent (used for the bicubic baseline).
    """

    name: str = "model"
    factor: int = 8

    def load(self, device: torch.device) -> None:
        """Bring the weights to `device` (called just before the model's pass)."""

    def unload(self) -> None:
        """Free the weights (called after the model's pass)."""

    def reconstruct(self, x: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Float images in [-1, 1] (B, 3, H, W) -> (reconstructions, decoded latents or None)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Facts for the JSON `meta` block."""
        return {"kind": type(self).__name__, "factor": self.factor}


class BicubicReconstructor(Reconstructor):
    """No-learning baseline: bicubic down-sampling by f (antialiased) and bicubic up-sampling back."""

    def __init__(self, factor: int = 8):
        self.factor = factor
        self.name = f"bicubic-f{factor}"

    def reconstruct(self, x, indices):
        small = F.interpolate(x, scale_factor=1.0 / self.factor, mode="bicubic", align_corners=False,
                              antialias=True)
        return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False), None

    def describe(self) -> dict:
        return {"kind": "baseline", "factor": self.factor, "path": None, "weights_sha256": None,
                "method": "torch bicubic resize, antialiased down by f, then up to the input size"}


class VAEReconstructor(Reconstructor):
    """A diffusers `AutoencoderKL` from one of our run folders (`<run>/vae/`) or any diffusers folder.

    Parameters:
        path: a run folder holding `vae/`, or a folder with the autoencoder's `config.json` and weights
            (a local copy of Stable Diffusion's VAE works unchanged; so does a full pipeline folder).
        dtype: fp32 (the protocol's default), bf16 or fp16.
        latent: "mode" (posterior mode) or "sample" (one draw, seeded per image from `seed` and the
            image's global index, so results do not depend on batching or on the number of processes).
    """

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, path: str | Path, dtype: str = "fp32", latent: str = "mode", seed: int = 0):
        from evaluation.report import printable_name  # report imports this module

        self.path = Path(path)
        # Everything that can be wrong with the folder is found now, before any model of the run is loaded:
        # a config that is not an AutoencoderKL's (a U-Net folder, a JSON list, not JSON) or weights that
        # do not match it (`ldm_core.models.autoencoder_folders.read_vae_folder`).
        self.folder, self.config = read_vae_folder(self.path)
        self.factor = vae_downsampling_factor(self.config)
        # A model fetched from the Hub is named by its id (its folder is a commit hash in the cache).
        self.name = printable_name(hub_repo_id(self.path) or self.path.resolve().name)
        self.dtype, self.latent, self.seed = dtype, latent, seed
        self.weights = sorted(p for p in self.folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        self.vae = None

    def load(self, device):
        self.vae, _ = load_frozen_vae(self.folder, torch_dtype=self.DTYPES[self.dtype])
        self.vae.to(device)

    def unload(self):
        self.vae = None

    def reconstruct(self, x, indices):
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        if self.latent == "mode":
            z = posterior.mode()
        else:
            generators = [image_generator(self.seed, int(i)) for i in indices]
            z = posterior.sample(generator=generators)
        return self.vae.decode(z).sample.float(), z.float()

    def describe(self) -> dict:
        from evaluation.report import printable_name  # report imports this module

        return {"kind": "AutoencoderKL", "path": printable_name(self.path), "vae_folder": printable_name(self.folder),
                "source": printable_name(describe_model_source(self.folder)),
                "factor": self.factor, "latent_channels": self.config.get("latent_channels"),
                "config_scaling_factor": self.config.get("scaling_factor"),
                "weights_sha256": {p.name: sha256_file(p) for p in self.weights}}






def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (identifies weight files in results.json)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()




class PeakMemory:
    """Peak memory of a model's load and encode+decode, above what was in use before it loaded.

    On CUDA: `torch.cuda.max_memory_allocated`. On CPU: the process RSS (psutil), sampled every 5 ms
    while loading and while encoding/decoding; an approximation that also counts allocator caching.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._baseline = None

    @staticmethod
    def describe(device: torch.device) -> str:
        if torch.device(device).type == "cuda":
            return "torch.cuda.max_memory_allocated during load and encode+decode, minus allocated before load"
        return "CPU: psutil RSS sampled every 5 ms during load and encode+decode, minus RSS before load"

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        import psutil

        return psutil.Process().memory_info().rss

    @contextlib.contextmanager
    def loading(self):
        self._baseline = self._current()
        with self.measuring():
            yield

    @contextlib.contextmanager
    def measuring(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self._record(torch.cuda.max_memory_allocated(self.device))
            return
        stop = threading.Event()

        def sample():
            while not stop.wait(0.005):
                self._record(self._current())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self._record(self._current())

    def _record(self, value: int) -> None:
        self.peak_bytes = max(self.peak_bytes, int(value) - (self._baseline or 0))
