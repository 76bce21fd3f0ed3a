"""Per-image metrics and FID plumbing, checked against independent computations."""

import math
import urllib.request

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from ldm_core.images import metrics as M
from evaluation.inception import FIDStatistics, load_fid_inception
from ldm_core.image_values import to_model_input, to_uint8
from ldm_core.models.pretrained import INCEPTION_FID_FILE, MissingWeightsError


def _random_u8(n, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def _smooth_u8(n, size=48, seed=0):
    """Smooth colour fields (natural-image-like SSIM values rather than white noise)."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(0, 255, (n, 3, 6, 6)).astype(np.float32))
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def test_identity_gives_psnr_cap_and_ssim_one():
    ref = _smooth_u8(3)
    assert torch.equal(M.psnr_per_image(ref, ref.clone()), torch.full((3,), M.PSNR_CAP_DB, dtype=torch.float64))
    assert torch.allclose(M.ssim_per_image(ref, ref.clone()), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_psnr_of_gaussian_noise_matches_sigma():
    sigma = 8.0
    rng = np.random.default_rng(1)
    ref = torch.full((4, 3, 256, 256), 128, dtype=torch.uint8)  # mid-grey: clipping is negligible
    noisy = (128 + rng.normal(0, sigma, ref.shape)).round().clip(0, 255).astype(np.uint8)
    psnr = M.psnr_per_image(ref, torch.from_numpy(noisy))
    expected = 20 * math.log10(255 / sigma)
    assert psnr.dtype == torch.float64 and psnr.shape == (4,)
    # Rounding to integers adds 1/12 to the variance: well inside 0.1 dB at sigma 8.
    assert torch.all((psnr - expected).abs() < 0.1), (psnr, expected)


def test_psnr_is_per_image_not_pooled():
    ref = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    rec = ref.clone()
    rec[0] += 10  # MSE 100 -> 28.13 dB ; image 1 identical -> cap
    psnr = M.psnr_per_image(ref, rec)
    assert psnr[0].item() == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-9)
    assert psnr[1].item() == M.PSNR_CAP_DB


def test_ssim_matches_scikit_image():
    ref = _smooth_u8(3, seed=2)
    noise = torch.from_numpy(np.random.default_rng(3).normal(0, 20, ref.shape))
    rec = (ref.double() + noise).round().clamp(0, 255).to(torch.uint8)
    ours = M.ssim_per_image(ref, rec)
    for i in range(3):
        theirs = structural_similarity(ref[i].numpy(), rec[i].numpy(), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=255, channel_axis=0)
        assert abs(ours[i].item() - theirs) < 1e-3, (ours[i].item(), theirs)
    assert 0.2 < ours.mean() < 0.99  # a real comparison, not a degenerate value


def test_ssim_uses_fixed_data_range_not_batch_range():
    ref = torch.full((1, 3, 32, 32), 120, dtype=torch.uint8)
    ref[..., :16] = 124
    rec = ref.clone()
    rec[..., 0, 0] = 122
    # With a range inferred from this low-contrast batch (4) the value would be much lower.
    theirs = structural_similarity(ref[0].numpy(), rec[0].numpy(), gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=255, channel_axis=0)
    assert M.ssim_per_image(ref, rec)[0].item() == pytest.approx(theirs, abs=1e-4)


def test_msssim_needs_more_than_160_px():
    assert "160" in M.msssim_unavailable_reason(160, 160)
    assert M.msssim_unavailable_reason(192, 176) is None
    with pytest.raises(ValueError, match="160"):
        M.msssim_per_image(_random_u8(1, 128), _random_u8(1, 128))
    ref = _smooth_u8(1, size=176)
    assert M.msssim_per_image(ref, ref.clone())[0].item() == pytest.approx(1.0, abs=1e-9)


def test_quantisation_round_trip_is_idempotent():
    u8 = _random_u8(2, 16, seed=4)
    assert torch.equal(to_uint8(to_model_input(u8)), u8)
    y = torch.randn(2, 3, 16, 16) * 1.5  # includes out-of-range values, clamped
    once = to_uint8(y)
    assert torch.equal(to_uint8(to_model_input(once)), once)


def test_bad_inputs_are_rejected_with_advice():
    with pytest.raises(ValueError, match="uint8"):
        M.psnr_per_image(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        M.ssim_per_image(_random_u8(1, 16), _random_u8(1, 32))


def test_summary_is_mean_population_std_and_n():
    assert M.summarize([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert M.summarize([]) == {"mean": None, "std": None, "n": 0}


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """An empty torch hub cache and every download path made to fail loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def forbidden(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    monkeypatch.setattr(tfi, "load_state_dict_from_url", forbidden)


@pytest.mark.parametrize("backbone, filename", [("alex", "alexnet-owt-7be5be79.pth"),
                                                ("vgg", "vgg16-397923af.pth")])
def test_missing_lpips_weights_name_the_file(no_download, backbone, filename):
    with pytest.raises(MissingWeightsError, match=filename) as info:
        M.load_lpips(backbone)
    assert "--lpips-weights" in str(info.value) and "hub/checkpoints" in str(info.value)


def test_missing_fid_weights_name_the_file(no_download):
    with pytest.raises(MissingWeightsError, match=INCEPTION_FID_FILE) as info:
        load_fid_inception()
    assert "--fid-weights" in str(info.value)


def test_lpips_loads_a_local_alexnet_file(no_download, tmp_path):
    import torchvision

    torch.manual_seed(0)
    trunk = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(trunk.state_dict(), path)
    model = M.load_lpips("alex", path)
    # Every trunk tensor now equals the file's (lpips keeps torchvision's layer indices as names).
    assert torch.equal(model.net.slice1[0].weight, trunk.features[0].weight)
    assert torch.equal(model.net.slice5._modules["10"].bias, trunk.features[10].bias)
    ref = _smooth_u8(2, 64)
    same = M.lpips_per_image(model, ref, ref.clone())
    other = M.lpips_per_image(model, ref, ref.flip(0))
    assert torch.allclose(same, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.all(other > 1e-3)


def test_lpips_rejects_a_wrong_file(no_download, tmp_path):
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="expected the file alexnet-owt-7be5be79.pth"):
        M.load_lpips("alex", path)


class _TinyFeatures(torch.nn.Module):
    """A random feature network standing in for Inception (structural test only)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 128 - 1)).mean(dim=(2, 3))


def test_fid_of_a_set_against_itself_is_zero_and_shards_merge():
    images = _random_u8(40, 16, seed=5)
    net = _TinyFeatures()
    whole = FIDStatistics(net)
    whole.update(images, real=True)
    whole.update(images, real=False)
    assert abs(whole.compute()) < 1e-3
    # Two shards merged (as two processes would be) equal one pass.
    shards = [FIDStatistics(net), FIDStatistics(net)]
    other = _random_u8(40, 16, seed=6)
    for k, shard in enumerate(shards):
        shard.update(images[k::2], real=True)
        shard.update(other[k::2], real=False)
    single = FIDStatistics(net)
    single.update(images, real=True)
    single.update(other, real=False)
    merged = FIDStatistics(net)
    for shard in shards:
        merged.merge(shard.state())
    assert merged.counts() == (40, 40)
    assert merged.compute() == pytest.approx(single.compute(), rel=1e-6)
    assert single.compute() > 1e-3


def test_inception_is_read_from_a_local_file_without_download(no_download, tmp_path, monkeypatch):
    """The real Inception loader, fed randomly initialised weights saved to a file (structural only)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as patch:  # build once without any weights, only to write a file
        patch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        random_net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / INCEPTION_FID_FILE
    torch.save(random_net.state_dict(), path)
    net = load_fid_inception(path)
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, random_net.Mixed_7c.branch_pool.conv.weight)
    assert net.use_antialias is False  # torch-fidelity's TF1-compatible resize, not torchmetrics' default
    assert net.features_list == ["2048"] and not net.training
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_fid_inception(tmp_path / "elsewhere.pth")


def _sinusoid_u8(cycles_per_px: float, size: int = 64) -> torch.Tensor:
    x = np.arange(size)
    wave = 127.5 + 100 * np.sin(2 * np.pi * cycles_per_px * x)[None, :].repeat(size, 0)
    return torch.from_numpy(np.repeat(wave[None, None], 3, axis=1).round().astype(np.uint8))


def test_high_frequency_power_lies_in_the_top_octave():
    # A sinusoid puts its power at one frequency: inside [0.25, 0.5) cycles/px it counts, below it does
    # not (up to the Hann window's leakage, which is orders of magnitude smaller).
    inside, below = M.high_frequency_power(_sinusoid_u8(0.375)), M.high_frequency_power(_sinusoid_u8(0.1))
    assert inside.item() > 1000 * below.item()
    flat = torch.full((1, 3, 64, 64), 90, dtype=torch.uint8)
    assert M.high_frequency_power(flat).item() == 0.0


def test_blur_keeps_less_high_frequency_power_and_identity_keeps_all():
    from PIL import Image, ImageFilter

    ref = _random_u8(2, size=64, seed=3)
    ref = torch.nn.functional.avg_pool2d(ref.float(), 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    ref = ref.round().to(torch.uint8)  # texture with power at every frequency, less at the top

    def blurred(radius):
        return torch.stack([torch.from_numpy(np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).filter(
            ImageFilter.GaussianBlur(radius)))).permute(2, 0, 1) for img in ref])

    keep = lambda rec: M.kept_ratio(M.high_frequency_power(rec), M.high_frequency_power(ref))  # noqa: E731
    assert keep(ref) == pytest.approx(1.0)
    assert keep(blurred(2.0)) < keep(blurred(0.7)) < 0.9
    noisy = (ref.int() + torch.from_numpy(np.random.default_rng(0).integers(-40, 41, ref.shape))).clamp(0, 255)
    assert keep(noisy.to(torch.uint8)) > 1.0


def test_chroma_is_zero_for_gray_and_falls_with_desaturation():
    gray = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    assert M.mean_chroma(gray).item() == 0.0
    red = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    red[:, 0] = 255
    assert M.mean_chroma(red).item() == 255.0
    ref = _smooth_u8(4)
    half = ((ref.float() + ref.float().mean(dim=1, keepdim=True)) / 2).round().to(torch.uint8)  # halfway to gray
    ratio = M.kept_ratio(M.mean_chroma(half), M.mean_chroma(ref))
    assert ratio == pytest.approx(0.5, abs=0.02)
    assert M.kept_ratio([1.0], [0.0]) is None
