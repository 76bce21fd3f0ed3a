"""Latent cache (posterior mean/std on disk) and latent statistics, against on-the-fly encoding."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldm_core.models.latent_scale import (apply_scaling_factor, measure_latent_stats, scale_latents,
                                   unscale_latents)
from stage_b_diffusion.latent_cache import ImagesToEncode, LatentCache, load_or_build_latent_cache


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4,
                         layers_per_block=1, sample_size=32)


def images(n: int = 5, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def encode(vae, u8: np.ndarray):
    with torch.no_grad():
        post = vae.eval().encode(torch.from_numpy(np.ascontiguousarray(u8)).float() / 127.5 - 1).latent_dist
    return post.mean, post.std


class CountingVAE:
    """Counts encode calls of a wrapped VAE (everything else is passed through)."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


def test_cache_equals_on_the_fly_encoding_with_flips(tmp_path):
    vae, u8 = tiny_vae(), images()
    cache = load_or_build_latent_cache(vae, u8, flip=True, cache_dir=tmp_path, batch_size=2, progress=False)
    mean, std = encode(vae, u8)
    assert cache.mean.shape == (10, 4, 4, 4) and cache.mean.dtype == torch.float32
    torch.testing.assert_close(cache.mean[:5], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.std[:5], std, rtol=1e-5, atol=1e-5)
    fmean, fstd = encode(vae, u8[..., ::-1])
    torch.testing.assert_close(cache.mean[5:], fmean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.std[5:], fstd, rtol=1e-5, atol=1e-5)
    # The encoder is not flip-equivariant, so the flipped entry is not just a flipped latent.
    assert not torch.allclose(cache.mean[5:], mean.flip(-1), atol=1e-3)


def test_cache_is_reused_and_a_truncated_file_is_rebuilt(tmp_path):
    vae, u8 = CountingVAE(tiny_vae()), images()
    first = load_or_build_latent_cache(vae, u8, flip=False, cache_dir=tmp_path, batch_size=5, progress=False)
    assert vae.calls == 1
    files = list(tmp_path.glob("latents-*/shard-*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob("**/*.tmp"))
    again = load_or_build_latent_cache(vae, u8, flip=False, cache_dir=tmp_path, batch_size=5, progress=False)
    assert vae.calls == 1 and torch.equal(again.mean, first.mean) and torch.equal(again.std, first.std)

    files[0].write_bytes(files[0].read_bytes()[:-100])
    rebuilt = load_or_build_latent_cache(vae, u8, flip=False, cache_dir=tmp_path, batch_size=5, progress=False)
    assert vae.calls == 2 and torch.equal(rebuilt.mean, first.mean)
    load_or_build_latent_cache(vae, u8, flip=False, cache_dir=tmp_path, batch_size=5, progress=False)
    assert vae.calls == 2  # the rebuilt file is valid again


def test_cache_key_follows_weights_images_and_flip(tmp_path):
    u8 = images()
    load_or_build_latent_cache(tiny_vae(0), u8, flip=False, cache_dir=tmp_path, progress=False)
    load_or_build_latent_cache(tiny_vae(1), u8, flip=False, cache_dir=tmp_path, progress=False)
    load_or_build_latent_cache(tiny_vae(0), u8[:4], flip=False, cache_dir=tmp_path, progress=False)
    load_or_build_latent_cache(tiny_vae(0), u8, flip=True, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("latents-*/shard-*.npy"))) == 4
    # Measuring the latent scale must not invalidate the cache.
    vae = CountingVAE(tiny_vae(0))
    vae.vae.register_to_config(scaling_factor=0.5)
    load_or_build_latent_cache(vae, u8, flip=False, cache_dir=tmp_path, progress=False)
    assert vae.calls == 0


def test_draw_reparameterises_and_selects_flips():
    mean = torch.arange(4 * 2 * 2 * 2, dtype=torch.float32).view(4, 2, 2, 2)
    std = torch.full_like(mean, 0.5)
    cache = LatentCache.from_tensors(mean, std, num_images=2)
    idx = torch.tensor([1, 0, 1])
    flip = torch.tensor([False, True, True])
    assert torch.equal(cache.draw(idx, torch.Generator(), mode="mode", flip=flip), mean[[1, 2, 3]])
    z = cache.draw(idx, torch.Generator().manual_seed(3), flip=flip)
    eps = torch.randn((3, 2, 2, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mean[[1, 2, 3]] + 0.5 * eps)
    g = torch.Generator().manual_seed(3)
    assert not torch.equal(cache.draw(idx, g), cache.draw(idx, g))  # fresh eps on every call
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        cache.draw(torch.tensor([2]), g)
    no_flips = LatentCache.from_tensors(mean[:2], std[:2], num_images=2)
    with pytest.raises(ValueError, match="flip=True"):
        no_flips.draw(idx, g, flip=flip)


def test_bad_images_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, 3, R, R\)"):
        load_or_build_latent_cache(tiny_vae(), images().astype(np.float32), flip=False, cache_dir=tmp_path)


@pytest.mark.parametrize("sample", [False, True])
def test_scaling_factor_is_one_over_the_latent_std(sample):
    vae, u8 = tiny_vae(), images(6)
    stats = measure_latent_stats(vae, u8, max_images=5, batch_size=2, sample=sample, seed=4)
    assert stats.num_images == 5
    # Independent computation: encode the same 5 images, draw eps per batch in the same order.
    g = torch.Generator().manual_seed(4)
    zs = []
    for start in range(0, 5, 2):
        mean, std = encode(vae, u8[start:min(start + 2, 5)])
        zs.append(mean + std * torch.randn(mean.shape, generator=g) if sample else mean)
    z = torch.cat(zs).double()
    assert stats.std == pytest.approx(z.flatten().std().item(), rel=1e-5)
    assert stats.scaling_factor == pytest.approx(1.0 / z.flatten().std().item(), rel=1e-5)
    np.testing.assert_allclose(stats.channel_mean, z.mean(dim=(0, 2, 3)).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.channel_std, z.transpose(0, 1).flatten(1).std(dim=1).numpy(), rtol=1e-4)
    assert set(stats.to_json()) == {"channel_mean", "channel_std", "std", "scaling_factor", "num_images"}


def test_scaling_factor_is_saved_with_the_vae(tmp_path):
    vae = tiny_vae()
    stats = measure_latent_stats(vae, images(3), max_images=3, sample=False)
    apply_scaling_factor(vae, stats)
    vae.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config.scaling_factor == pytest.approx(stats.scaling_factor)
    z = torch.randn(2, 4, 4, 4)
    scaled = scale_latents(z, loaded.config)
    torch.testing.assert_close(scaled, z * stats.scaling_factor)
    torch.testing.assert_close(unscale_latents(scaled, loaded.config), z)


def test_shards_split_the_cache_and_a_killed_encoding_keeps_finished_shards(tmp_path):
    vae, u8 = tiny_vae(), images(7)
    whole = load_or_build_latent_cache(vae, u8, flip=True, cache_dir=tmp_path / "one", progress=False)

    class Killed(Exception):
        pass

    read = ImagesToEncode.from_array(u8, batch_size=2)
    calls = []

    def dies_in_third_shard(start, stop):
        calls.append(start)
        if start == 6:
            raise Killed
        yield from read.read(start, stop)

    killed = ImagesToEncode(read.count, read.resolution, read.fingerprint, dies_in_third_shard)
    with pytest.raises(Killed):
        load_or_build_latent_cache(vae, killed, flip=True, cache_dir=tmp_path / "sharded", shard_size=3, progress=False)
    assert len(list((tmp_path / "sharded").glob("latents-*/shard-*.npy"))) == 2  # shards [0, 3) and [3, 6) kept
    calls.clear()

    def counted(start, stop):
        calls.append(start)
        yield from read.read(start, stop)

    again = ImagesToEncode(read.count, read.resolution, read.fingerprint, counted)
    sharded = load_or_build_latent_cache(vae, again, flip=True, cache_dir=tmp_path / "sharded", shard_size=3,
                                         progress=False)
    assert calls == [6]  # only the missing shard is encoded again
    torch.testing.assert_close(sharded.mean, whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded.std, whole.std, rtol=1e-5, atol=1e-5)
    idx, flip = torch.tensor([6, 0, 4, 6]), torch.tensor([True, False, True, False])
    torch.testing.assert_close(sharded.draw(idx, torch.Generator(), mode="mode", flip=flip),
                               whole.draw(idx, torch.Generator(), mode="mode", flip=flip), rtol=1e-5, atol=1e-5)


def test_two_processes_encode_disjoint_shards_and_both_read_all(tmp_path):
    vae, u8 = tiny_vae(), images(8)
    read = ImagesToEncode.from_array(u8, batch_size=2)
    encoded = {0: [], 1: []}

    def reader(rank):
        def read_for(start, stop):
            encoded[rank].append(start)
            yield from read.read(start, stop)
        return ImagesToEncode(read.count, read.resolution, read.fingerprint, read_for)

    caches = {}

    def rank1_runs_while_rank0_waits():
        caches[1] = load_or_build_latent_cache(vae, reader(1), flip=False, cache_dir=tmp_path, shard_size=2,
                                               rank=1, world_size=2, progress=False)

    caches[0] = load_or_build_latent_cache(vae, reader(0), flip=False, cache_dir=tmp_path, shard_size=2, rank=0,
                                           world_size=2, wait_for_everyone=rank1_runs_while_rank0_waits, progress=False)
    assert encoded == {0: [0, 4], 1: [2, 6]}
    mean, _ = encode(vae, u8)
    for cache in caches.values():
        torch.testing.assert_close(cache.mean, mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_storage_costs_what_its_mantissa_says(tmp_path, dtype, tolerance):
    """fp16 keeps 11 significant bits (relative error <= 2^-11 ~ 4.9e-4), bf16 8 (<= 2^-8 ~ 3.9e-3)."""
    vae, u8 = tiny_vae(), images(6)
    full = load_or_build_latent_cache(vae, u8, flip=False, cache_dir=tmp_path, progress=False)
    half = load_or_build_latent_cache(vae, u8, flip=False, cache_dir=tmp_path, dtype=dtype, progress=False)
    assert half.shards[0].dtype == (np.float16 if dtype == "float16" else np.uint16)
    assert half.shards[0].nbytes * 2 == full.shards[0].nbytes
    relative = ((half.mean - full.mean).abs() / full.mean.abs().clamp_min(1e-3)).max().item()
    assert 0 < relative < tolerance / 2
    with pytest.raises(ValueError, match="latent_cache_dtype"):
        load_or_build_latent_cache(vae, u8, flip=False, cache_dir=tmp_path, dtype="int8", progress=False)
