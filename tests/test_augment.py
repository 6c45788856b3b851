"""Augmentation invariants (alignment, padding -> ignore, boxes, seeding) and agreement of
the tensor ops with the PIL operations of the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dssn.config import DataConfig
from dssn.data import augment as A

CROP = 48


def cfg(**kw) -> DataConfig:
    return DataConfig(crop_size=CROP, **kw)


def blocks_image(h: int, w: int, block: int = 16, seed: int = 0):
    """A mask of constant blocks and an image whose pixels encode it (R = 10 * class + 5)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 21, (h // block + 1, w // block + 1), dtype=np.uint8)
    mask = np.kron(grid, np.ones((block, block), np.uint8))[:h, :w]
    image = np.stack([mask * 10 + 5, np.full_like(mask, 77), 255 - mask * 10])
    return torch.from_numpy(image.copy()), torch.from_numpy(mask.copy())


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, h // 8, w // 8), dtype=torch.uint8, generator=g)
    return TF.resize(small, [h, w], antialias=True)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> np.ndarray:
    return np.array(im).transpose(2, 0, 1).astype(np.float32)


def as_float(x: torch.Tensor) -> np.ndarray:
    """The colour ops' input: float32 numpy (3, H, W)."""
    return x.numpy().astype(np.float32)


@pytest.mark.parametrize("size", [(40, 56), (70, 90)])  # crops with padding, and without
def test_labeled_image_and_mask_stay_aligned(size):
    image, mask = blocks_image(*size)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        out_image, out_mask = A.augment_labeled(image, mask, cfg(), rng)
        assert out_image.shape == (3, CROP, CROP) and out_mask.shape == (CROP, CROP)
        assert out_image.dtype == out_mask.dtype == torch.uint8
        m = out_mask.long()
        # interior pixels (5x5 neighbourhood of one class): the image encodes the same class
        padded = torch.nn.functional.pad(m[None, None].float(), (2, 2, 2, 2), value=-1)
        lo = -torch.nn.functional.max_pool2d(-padded, 5, 1)[0, 0]
        hi = torch.nn.functional.max_pool2d(padded, 5, 1)[0, 0]
        interior = (lo == hi) & (m != 255)
        assert interior.sum() > 50
        red = out_image[0].long()[interior]
        assert (red - (m[interior] * 10 + 5)).abs().max() <= 1
        assert (out_image[1].long()[interior] - 77).abs().max() <= 1
        padding = m == 255
        assert (out_image[:, padding] == 0).all()
    # the same 30 seeds exercise both flipped and unflipped crops
    flips = {
        bool(A.sample_geometry(*size, CROP, cfg(), np.random.default_rng(s))["flip"])
        for s in range(30)
    }
    assert flips == {True, False}


def test_geometry_matches_pil_resize_pad_crop():
    image = smooth_image(75, 100)
    pil = to_pil(image)
    for out_w, out_h in [(180, 135), (60, 45), (101, 76)]:
        top, left = min(7, max(out_h, CROP) - CROP), min(9, max(out_w, CROP) - CROP)
        geo = {"out_h": out_h, "out_w": out_w, "top": top, "left": left, "flip": False}
        ours, _ = A.apply_geometry(image, None, geo, CROP, 254)
        ref = pil.resize((out_w, out_h), Image.BILINEAR)
        ref = ImageOps.expand(ref, (0, 0, max(0, CROP - out_w), max(0, CROP - out_h)), fill=0)
        ref = from_pil(ref.crop((left, top, left + CROP, top + CROP)))
        assert np.abs(ours.numpy() - ref).max() <= 1


def test_nearest_mask_matches_pil():
    rng = np.random.default_rng(3)
    mask = torch.from_numpy(rng.integers(0, 21, (30, 40), dtype=np.uint8))
    geo = {"out_h": 75, "out_w": 100, "top": 5, "left": 11, "flip": False}
    _, ours = A.apply_geometry(torch.zeros(3, 30, 40, dtype=torch.uint8), mask, geo, CROP, 255)
    ref = Image.fromarray(mask.numpy()).resize((100, 75), Image.NEAREST)
    ref = np.asarray(ref)[5 : 5 + CROP, 11 : 11 + CROP]
    assert np.array_equal(ours.numpy(), ref)


def test_unlabeled_padding_becomes_ignore():
    image = smooth_image(24, 32).clamp(min=1)  # no real pixel is 0, so 0 means padding
    for seed in range(10):
        views = A.augment_unlabeled(image, cfg(scale_range=[0.5, 1.0]), np.random.default_rng(seed))
        padding = (views["weak"] == 0).all(0)
        assert padding.any()  # a 32 px image scaled <= 1x never fills a 48 px crop
        assert torch.equal(views["ignore"] == 255, padding)
        assert set(views["ignore"].unique().tolist()) <= {0, 255}
    mask = torch.tensor([[254, 0], [3, 254]], dtype=torch.uint8)
    assert A.ignore_from_mask(mask).tolist() == [[255, 0], [0, 255]]


def test_labeled_padding_is_255():
    image, mask = blocks_image(20, 24)
    _, out_mask = A.augment_labeled(
        image, mask, cfg(scale_range=[1.0, 1.0]), np.random.default_rng(0)
    )
    assert (out_mask == 255).sum() == CROP * CROP - 20 * 24


def test_strong_views_differ_from_weak_and_each_other():
    image = smooth_image(64, 64)
    differ_weak = differ_pair = 0
    for seed in range(20):
        views = A.augment_unlabeled(image, cfg(), np.random.default_rng(seed))
        assert all(views[k].shape == (3, CROP, CROP) for k in ("weak", "strong1", "strong2"))
        differ_weak += not torch.equal(views["strong1"], views["weak"])
        differ_pair += not torch.equal(views["strong1"], views["strong2"])
    # a strong view equals the weak one only if no jitter, grey, blur and 'identity' came up
    assert differ_weak >= 19 and differ_pair >= 19


def test_strong_view_applies_the_configured_ops():
    image = smooth_image(32, 32)
    counts = []
    for seed in range(50):
        log: list[str] = []
        A.strong_view(image, cfg(), np.random.default_rng(seed), log)
        random_ops = [op for op in log if op in A.OP_NAMES]
        assert 1 <= len(random_ops) <= 3
        counts.append(len(random_ops))
        assert set(log) <= set(A.OP_NAMES) | {"color_jitter", "random_grayscale", "random_blur"}
    assert set(counts) == {1, 2, 3}
    none = cfg(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, strong_ops_max=1)
    log = []
    A.strong_view(image, none, np.random.default_rng(0), log)
    assert len(log) == 1


def test_cutmix_boxes_inside_crop_with_area_2_to_40_percent():
    always = cfg(cutmix_p=1.0)
    fractions = []
    for seed in range(300):
        box = A.cutmix_box(CROP, always, np.random.default_rng(seed))
        ys, xs = torch.nonzero(box, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert int(box.sum()) == h * w  # one filled rectangle, inside the crop
        fractions.append(h * w / CROP**2)
    # widths/heights are floored as in the reference, which can take a box just under 2%
    floor_slack = 2 * np.sqrt(0.02) * (1 / np.sqrt(0.3)) / CROP
    assert min(fractions) >= 0.02 - floor_slack and max(fractions) <= 0.4
    assert np.mean(fractions) == pytest.approx(0.21, abs=0.03)
    never = [
        A.cutmix_box(CROP, cfg(cutmix_p=0.0), np.random.default_rng(s)).sum() for s in range(20)
    ]
    assert all(n == 0 for n in never)
    half = sum(
        int(A.cutmix_box(CROP, cfg(), np.random.default_rng(s)).sum() > 0) for s in range(400)
    )
    assert 160 < half < 240


def test_same_seed_same_output():
    image, mask = blocks_image(50, 60)
    a = A.augment_unlabeled(image, cfg(), np.random.default_rng(11))
    b = A.augment_unlabeled(image, cfg(), np.random.default_rng(11))
    c = A.augment_unlabeled(image, cfg(), np.random.default_rng(12))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    la = A.augment_labeled(image, mask, cfg(), np.random.default_rng(5))
    lb = A.augment_labeled(image, mask, cfg(), np.random.default_rng(5))
    assert torch.equal(la[0], lb[0]) and torch.equal(la[1], lb[1])


# the tensor ops against the PIL / torchvision operations the reference uses
PIL_OPS = [
    ("brightness", lambda x: A.brightness(x, 0.3), lambda p: ImageEnhance.Brightness(p).enhance(0.3)),
    ("contrast", lambda x: A.contrast(x, 0.3), lambda p: ImageEnhance.Contrast(p).enhance(0.3)),
    ("color", lambda x: A.saturation(x, 0.3), lambda p: ImageEnhance.Color(p).enhance(0.3)),
    ("sharpness", lambda x: A.sharpness(x, 0.3), lambda p: ImageEnhance.Sharpness(p).enhance(0.3)),
    ("autocontrast", A.autocontrast, ImageOps.autocontrast),
    ("equalize", A.equalize, ImageOps.equalize),
    ("posterize", lambda x: A.posterize(x, 5), lambda p: ImageOps.posterize(p, 5)),
    ("solarize", lambda x: A.solarize(x, 100), lambda p: ImageOps.solarize(p, 100)),
    ("grayscale", A.grayscale, lambda p: p.convert("L").convert("RGB")),
    ("blur", lambda x: A.gaussian_blur(x, 1.5), lambda p: p.filter(ImageFilter.GaussianBlur(1.5))),
]  # fmt: skip


@pytest.mark.parametrize("name, ours, reference", PIL_OPS, ids=[o[0] for o in PIL_OPS])
def test_ops_match_pil(name, ours, reference):
    image = smooth_image(64, 64, seed=4)
    diff = np.abs(ours(as_float(image)) - from_pil(reference(to_pil(image))))
    # PIL rounds to uint8 inside its ops; its blur is a box-filter approximation
    assert diff.max() <= (2 if name == "blur" else 1.5)
    assert diff.mean() <= (0.5 if name == "blur" else 0.7)


@pytest.mark.parametrize("shift", [-0.45, -0.1, 0.2, 0.5])
def test_hue_matches_torchvision(shift):
    image = smooth_image(64, 64, seed=5)
    ours = A.hue(as_float(image), shift)
    reference = TF.adjust_hue(image, shift).numpy()
    # hue quantised to 1/256 of a sextant: at most chroma / 256 * 6 ~ 1.5 grey levels off
    assert np.abs(ours - reference).max() <= 2 and np.abs(ours - reference).mean() < 0.2


def test_hue_of_near_grey_pixels_stays_finite():
    # a blur in float can leave max - min as a denormal (1e-44): 1 / chroma overflowed to inf,
    # the hue became NaN and the table lookup crashed the digits run's Ray Data task
    image = np.zeros((3, 4, 4), np.float32)
    image[0, 0, 0] = 1e-44
    image[:, 1] = 100.0
    image[1, 1, 1] = np.nextafter(np.float32(100), np.float32(200))
    out = A.hue(image.copy(), 0.3)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, image, atol=1e-3)  # grey stays grey


@pytest.mark.parametrize(
    "channels, h, w, sigma", [(3, 40, 33, 1.3), (1, 7, 9, 2.0), (3, 5, 64, 0.6)]
)
def test_blur_is_a_reflect_padded_separable_gaussian(channels, h, w, sigma):
    # the fused kernel against the textbook computation in float64 (radius capped by the size)
    x = np.random.default_rng(7).uniform(0, 255, (channels, h, w)).astype(np.float32)
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)
    k = np.array(A._gaussian_kernel(sigma, radius))
    padded = np.pad(x.astype(np.float64), ((0, 0), (radius, radius), (radius, radius)), "reflect")
    across = sum(k[i] * padded[:, :, i : i + w] for i in range(2 * radius + 1))
    reference = sum(k[i] * across[:, i : i + h] for i in range(2 * radius + 1))
    np.testing.assert_allclose(A.gaussian_blur(x.copy(), sigma), reference, atol=1e-3)


def test_saturation_blends_with_the_luma():
    x = np.random.default_rng(8).uniform(0, 255, (3, 6, 5)).astype(np.float32)
    grey = np.tensordot(np.array(A.GRAY_WEIGHTS), x.astype(np.float64), axes=1)
    for factor in (0.0, 0.4, 1.0, 1.7):
        expected = np.clip(factor * x + (1 - factor) * grey, 0, 255)
        np.testing.assert_allclose(A.saturation(x.copy(), factor), expected, atol=1e-3)


def test_autocontrast_of_a_denormal_range_stays_finite():
    image = np.zeros((3, 4, 4), np.float32)
    image[0, 0, 0] = 1e-44  # hi > lo, but 255 / (hi - lo) overflows
    assert np.isfinite(A.autocontrast(image.copy())).all()


@pytest.mark.parametrize(
    "out_h, out_w, top, left",
    [(135, 180, 20, 50), (60, 80, 5, 9), (30, 40, 0, 0), (76, 101, 28, 53)],
    ids=["upscale", "slight-upscale", "downscale-padded", "crop-at-corner"],
)
def test_flipped_crop_mirrors_the_unflipped_one(out_h, out_w, top, left):
    # the flip is folded into the resampling (columns read right to left), not a copy after it
    image, mask = blocks_image(60, 80, block=7)
    image = (image.long() * 3 + smooth_image(60, 80).long()).clamp(0, 255).to(torch.uint8)
    geo = {"out_h": out_h, "out_w": out_w, "top": top, "left": left, "flip": False}
    plain_image, plain_mask = A.apply_geometry(image, mask, geo, CROP, 255)
    flip_image, flip_mask = A.apply_geometry(image, mask, {**geo, "flip": True}, CROP, 255)
    assert torch.equal(flip_image, plain_image.flip(-1))
    assert torch.equal(flip_mask, plain_mask.flip(-1))


GREY_OPS = [(name, apply, draw) for name, draw, apply in A.RANDOM_OPS] + [
    ("random_blur", A.gaussian_blur, lambda c, rng: float(rng.uniform(0.1, 2.0)))
]


@pytest.mark.parametrize("name, apply, draw", GREY_OPS, ids=[o[0] for o in GREY_OPS])
def test_grey_view_ops_equal_their_three_channel_result(name, apply, draw):
    # after RandomGrayscale a strong view carries one channel: every op on it must equal the
    # op on the three equal channels (colour ops leave a grey image as it is)
    grey = A.grayscale(A.contrast(as_float(smooth_image(40, 40, seed=2)), 0.8))
    for seed in range(5):
        value = draw(cfg(), np.random.default_rng(seed))
        three = apply(grey.copy(), value)
        one = apply(grey[:1].copy(), value)
        assert one.shape == (1, 40, 40)
        np.testing.assert_allclose(np.broadcast_to(one, three.shape), three, atol=1e-3)


def test_strong_view_after_grayscale_is_grey():
    image = smooth_image(40, 40, seed=3)
    always = cfg(grayscale_p=1.0)
    for seed in range(10):
        view = A.strong_view(image, always, np.random.default_rng(seed))
        assert view.shape == (3, 40, 40) and view.dtype == torch.uint8
        assert torch.equal(view[0], view[1]) and torch.equal(view[0], view[2])


def test_hue_of_pure_and_tied_colours_matches_torchvision():
    # the max/min ties (r = g, g = b, ...) and the six corners of the colour hexagon
    levels = torch.tensor([0, 40, 128, 200, 255], dtype=torch.uint8)
    r, g, b = torch.meshgrid(levels, levels, levels, indexing="ij")
    image = torch.stack([r, g, b]).reshape(3, 5, 25)
    for shift in (-0.5, -0.3, -1 / 6, 0.05, 1 / 3, 0.5):
        ours = A.hue(as_float(image), shift)
        reference = TF.adjust_hue(image, shift).numpy()
        assert np.abs(ours - reference).max() <= 2


def test_ops_stay_finite_on_extreme_values():
    # denormals (a blur's float rounding), exact 0 and 255, and the channel ties between them
    image = np.zeros((3, 6, 6), np.float32)
    image[:, :3] = 255.0
    image[0, 0, 0] = image[1, 4, 4] = 1e-44
    image[2, 5, 5] = np.nextafter(np.float32(255), np.float32(0))
    for name, draw, apply in A.RANDOM_OPS:
        for seed in range(3):
            out = apply(image.copy(), draw(cfg(), np.random.default_rng(seed)))
            assert np.isfinite(out).all(), name
            assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3, name


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    # a read-only install with no writable home: numba finds nowhere to cache; the kernels
    # must still load (compiled per process) and say how to get the cache back
    import importlib.util

    from numba.core import caching

    from dssn.data import kernels

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    spec = importlib.util.spec_from_file_location("kernels_uncached", kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.warns(RuntimeWarning, match="NUMBA_CACHE_DIR"):
        spec.loader.exec_module(module)
    x = np.full((3, 2, 2), 100.0, np.float32)
    x[0] = 200.0
    grey = module.saturate(x.copy(), np.float32(0.0), A.GRAY_WEIGHTS_F32)
    np.testing.assert_allclose(grey, 0.299 * 200 + 0.701 * 100, rtol=1e-6)
