"""CIFAR-10-C / ImageNet-C corruptions (tta_bench/data/corruptions.py): names, determinism, grading,
hand-computed values for the closed-form corruptions, and the on-disk cache."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from tta_bench.tasks.cifar10 import DATA_FILE as DATA  # the shipped CIFAR-10 test set

from tta_bench.core.errors import TTAError
from tta_bench.data import corruptions as C

torch.set_num_threads(1)

# Mean |corrupted - clean| rises with severity wherever the official parameters rise monotonically.
# Not monotone by design of the official parameters: glass_blur (sigma 0.05, .25, .4, .25, .4 with 1 or
# 2 shuffles), elastic_transform (its affine jitter shrinks from 2.56 to 0.96 px while the elastic
# displacement grows: the mean change falls), frost (the image weight falls 1 -> 0.75 while the frost
# weight rises 0.2 -> 0.45: darkening and frost partly cancel, from severity 3 on), spatter (severities
# 4-5 switch from water to mud), saturate (factors 0.3, 0.1, 1.5, 2, 2.5: desaturate, then saturate),
# snow (mixed parameters; it happens to be monotone on average). motion_blur's severities 3 and 4,
# (radius 6, sigma 2) and (8, 2), differ only by kernel taps below 1e-7: equal images, hence >=.
MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "motion_blur",
            "zoom_blur", "fog", "brightness", "contrast", "pixelate", "jpeg_compression", "gaussian_blur")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    with np.load(DATA) as data:
        return data["images"][:12]


def run(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    return C.corrupt(torch.from_numpy(x), name, severity, seed).numpy()


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def truncate(value: Fraction | float) -> int:
    return int(math.floor(value))


def test_names_and_aliases():
    assert len(C.STANDARD) == 15 and len(C.EXTRA) == 4 and C.CORRUPTIONS == C.STANDARD + C.EXTRA
    assert C.STANDARD[0] == "gaussian_noise" and C.STANDARD[-1] == "jpeg_compression"
    assert set(C.EXTRA) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert C.ALIASES == {"jpeg": "jpeg_compression"} and C.canonical("jpeg") == "jpeg_compression"
    assert all(C.canonical(n) == n for n in C.CORRUPTIONS)
    x = np.zeros((32, 32, 3), np.uint8) + 90
    assert np.array_equal(run(x, "jpeg", 5, 3), run(x, "jpeg_compression", 5, 3))
    with pytest.raises(TTAError) as err:
        C.canonical("gausian_noise")
    message = str(err.value)
    assert "\n" not in message and "'gausian_noise'" in message
    assert all(n in message for n in C.CORRUPTIONS) and "jpeg=jpeg_compression" in message
    with pytest.raises(TTAError, match="unknown corruption 'nope'"):
        run(x, "nope", 1)
    with pytest.raises(TTAError, match="severity 6 is not one of"):
        run(x, "contrast", 6)
    with pytest.raises(TTAError, match=r"uint8 image \[32, 32, 3\]"):
        C.corrupt(torch.zeros(32, 32, 3), "contrast", 1, 0)


def test_every_corruption_and_severity_is_deterministic_uint8_and_changes_the_image(images):
    x = images[3]
    state = np.random.get_state()[1].copy()
    for name in C.CORRUPTIONS:
        for s in C.SEVERITIES:
            out = C.corrupt(torch.from_numpy(x), name, s, 7)
            assert out.dtype == torch.uint8 and out.shape == (32, 32, 3), (name, s)
            assert torch.equal(out, C.corrupt(torch.from_numpy(x.copy()), name, s, 7)), (name, s)
            assert mad(out.numpy(), x) > 0, (name, s)
    assert np.array_equal(np.random.get_state()[1], state)  # the global RNG is never used


def test_randomised_corruptions_depend_on_the_seed(images):
    x = images[0]
    deterministic = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                     "gaussian_blur", "saturate"}
    for name in C.CORRUPTIONS:
        differs = not np.array_equal(run(x, name, 3, 1), run(x, name, 3, 2))
        assert differs == (name not in deterministic), name


def test_mean_change_is_monotone_in_severity_where_the_parameters_are(images):
    for name in MONOTONE:
        change = [np.mean([mad(run(x, name, s, i), x) for i, x in enumerate(images)]) for s in C.SEVERITIES]
        for s in range(4):
            if name == "motion_blur" and s == 2:
                assert change[3] >= change[2], (name, change)
            else:
                assert change[s + 1] > change[s], (name, change)


def test_noise_matches_the_formula_with_the_seeded_legacy_rng():
    x = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3).astype(np.uint8)  # 0..255 repeated
    v = x / 255.0
    for s, c in enumerate(C._CIFAR["gaussian_noise"], 1):
        noise = np.random.RandomState(11).normal(0, c, size=x.shape)
        assert np.array_equal(run(x, "gaussian_noise", s, 11), np.floor(np.clip(v + noise, 0, 1) * 255))
    c = C._CIFAR["speckle_noise"][4]
    noise = np.random.RandomState(12).normal(0, c, size=x.shape)
    assert np.array_equal(run(x, "speckle_noise", 5, 12), np.floor(np.clip(v + v * noise, 0, 1) * 255))
    c = C._CIFAR["shot_noise"][4]
    photons = np.random.RandomState(13).poisson(v * c)
    assert np.array_equal(run(x, "shot_noise", 5, 13), np.floor(np.clip(photons / c, 0, 1) * 255))
    # impulse: a pixel flips when its first uniform draw is below the amount; it turns white when
    # the second is below 1/2, black otherwise (skimage 0.13-0.18's s&p through RandomState.choice)
    amount = C._CIFAR["impulse_noise"][4]
    rs = np.random.RandomState(14)
    flipped, salt = rs.random_sample(x.shape) < amount, rs.random_sample(x.shape) < 0.5
    expected = np.where(flipped, np.where(salt, 255, 0), x)
    out = run(x, "impulse_noise", 5, 14)
    assert np.array_equal(out, expected) and 0.05 < flipped.mean() < 0.09


def test_contrast_uses_per_channel_means_and_truncates():
    x = np.zeros((32, 32, 3), np.uint8)
    x[:, 16:, 0] = 255  # red: half 0, half 255 -> mean 1/2
    x[..., 1] = 40  # green: constant, untouched by a per-channel mean (a global mean would move it)
    x[::2, :, 2] = 200  # blue: half 0, half 200
    for s, c in enumerate(C._CIFAR["contrast"], 1):
        out = run(x, "contrast", s)
        c = Fraction(c).limit_denominator(1000)
        half = Fraction(1, 2)
        assert out[0, 0, 0] == truncate(((0 - half) * c + half) * 255)
        assert out[0, 31, 0] == truncate(((1 - half) * c + half) * 255)
        assert (out[..., 1] == 40).all() or (out[..., 1] == 39).all()  # 40/255 may come back a hair low
        blue_mean = Fraction(100, 255)
        assert out[0, 0, 2] == truncate(((Fraction(200, 255) - blue_mean) * c + blue_mean) * 255)
        assert out[1, 0, 2] == truncate(((0 - blue_mean) * c + blue_mean) * 255)
    assert run(x, "contrast", 5)[0, 0, 0] == 108 and run(x, "contrast", 5)[0, 31, 0] == 146


def _hsv_case(pixel, severity, name):
    """The corrupted value of one RGB pixel, by hand with exact fractions (HSV sextant formulas)."""
    r, g, b = (Fraction(p, 255) for p in pixel)
    v, delta = max(r, g, b), max(r, g, b) - min(r, g, b)
    s = delta / v if v else Fraction(0)
    assert r == v and delta  # the cases below: red is the maximum
    f = (g - b) / delta  # hue * 6, in [0, 1): sextant 0 -> (v, t, p)
    c = C._CIFAR[name][severity - 1]
    if name == "brightness":
        v = min(v + Fraction(c).limit_denominator(1000), Fraction(1))
    else:
        a, plus = (Fraction(p).limit_denominator(1000) for p in c)
        s = min(max(s * a + plus, Fraction(0)), Fraction(1))
    p, t = v * (1 - s), v * (1 - (1 - f) * s)
    return [x * 255 for x in (v, t, p)]


def test_brightness_and_saturate_by_hand():
    pixels = [(200, 100, 50), (180, 60, 20), (250, 240, 10)]
    x = np.zeros((32, 32, 3), np.uint8)
    for k, pixel in enumerate(pixels):
        x[k] = pixel
    checked = 0
    for name in ("brightness", "saturate"):
        for s in C.SEVERITIES:
            out = run(x, name, s)
            for k, pixel in enumerate(pixels):
                for got, exact in zip(out[k, 0], _hsv_case(pixel, s, name)):
                    if abs(exact - round(exact)) < Fraction(1, 10 ** 6):  # on an integer: float may land below
                        assert got in (round(exact) - 1, round(exact))
                    else:
                        assert got == truncate(exact), (name, s, pixel)
                        checked += 1
    assert checked >= 30
    grey = np.full((32, 32, 3), 100, np.uint8)
    assert (run(grey, "brightness", 5) == truncate(Fraction(100, 255) * 255 + Fraction(3, 10) * 255)).all()
    # grey has hue 0 (red): the official "+ 0.2" saturation of severities 4-5 tints it red, v * (1 - 0.2)
    assert (run(grey, "saturate", 5) == [100, 80, 80]).all() and (run(grey, "saturate", 3) == 100).all()
    assert run(x, "brightness", 1)[0, 0].tolist() == [212, 106, 53]


def test_gaussian_blur_kernel_and_nearest_border_by_hand():
    sigma = C._CIFAR["gaussian_blur"][4]  # 1 px: scipy's radius int(4 * 1 + 0.5) = 4
    w = [math.exp(-k * k / (2 * sigma * sigma)) for k in range(-4, 5)]
    w = [v / sum(w) for v in w]
    x = np.zeros((32, 32, 3), np.uint8)
    x[10, 10] = 255
    out = run(x, "gaussian_blur", 5)
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            exact = 255 * w[dy + 4] * w[dx + 4]
            if abs(exact - round(exact)) > 1e-6:
                assert out[10 + dy, 10 + dx, 0] == math.floor(exact), (dy, dx)
    assert out[10, 15, 0] == 0 and out[10, 10, 1] == out[10, 10, 0]
    edge = np.zeros((32, 32, 3), np.uint8)
    edge[:, 0] = 255  # 'nearest' border: column 0 sees itself replicated on its left
    out = run(edge, "gaussian_blur", 5)
    assert out[5, 0, 0] == math.floor(255 * (w[4] + w[0] + w[1] + w[2] + w[3]))  # = 255 * (1/2 + w0/2)
    assert out[5, 1, 0] == math.floor(255 * (w[0] + w[1] + w[2] + w[3]))  # columns -3..0 are 255


def test_jpeg_and_pixelate_by_hand():
    import io

    from PIL import Image

    rs = np.random.RandomState(0)
    x = rs.randint(0, 256, size=(32, 32, 3)).astype(np.uint8)
    for s, quality in enumerate((80, 65, 58, 50, 40), 1):
        buffer = io.BytesIO()
        Image.fromarray(x).save(buffer, "JPEG", quality=quality)
        assert np.array_equal(run(x, "jpeg_compression", s), np.asarray(Image.open(buffer)))
    flat = np.full((32, 32, 3), 77, np.uint8)
    assert (run(flat, "pixelate", 5) == 77).all() and (run(flat, "jpeg", 1) == 77).all()
    step = np.zeros((32, 32, 3), np.uint8)
    step[:, 15:] = 255  # severity 5: box 32 -> int(32 * 0.65) = 20 -> 32
    row = [0] * 15 + [255] * 17
    for size in (20, 32):  # Pillow's box: the mean of the pixels whose centres lie in the output
        scale = Fraction(len(row), size)  # pixel's box (-half, half], rounded to the nearest integer
        half = max(scale, Fraction(1)) / 2
        members = [[v for j, v in enumerate(row) if -half < j + Fraction(1, 2) - (k + Fraction(1, 2)) * scale <= half]
                   for k in range(size)]
        row = [math.floor(Fraction(sum(m), len(m)) + Fraction(1, 2)) for m in members]
    assert row[13:17] == [0, 128, 128, 255]
    assert np.array_equal(run(step, "pixelate", 5), np.broadcast_to(np.array(row, np.uint8)[None, :, None], (32, 32, 3)))


def test_glass_blur_copies_like_the_official_tuple_swap(images):
    """The official loop's `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on NumPy views copies (h', w')
    into (h, w) and leaves (h', w'): reproduce it with the literal loop and compare."""
    from scipy.ndimage import gaussian_filter

    x = images[5]
    # CIFAR's delta 1 only moves pixels from later-visited places; ImageNet-C's delta 2-4 (tried here
    # on 32 px) also copies from already-visited ones, which then carry their new value on.
    for params in C._CIFAR["glass_blur"][::4] + C._IMAGENET["glass_blur"][2:]:
        sigma, delta, iterations = params
        rs = np.random.RandomState(21)
        y = (gaussian_filter(x / 255.0, (sigma, sigma, 0), mode="nearest") * 255).astype(np.uint8)
        for _ in range(iterations):
            for h in range(32 - delta, delta, -1):
                for w in range(32 - delta, delta, -1):
                    dx, dy = rs.randint(-delta, delta, size=(2,))
                    y[h, w] = y[h + dy, w + dx]
        expected = np.floor(np.clip(gaussian_filter(y / 255.0, (sigma, sigma, 0), mode="nearest"), 0, 1) * 255)
        assert np.array_equal(C._as_uint8(C._glass_blur(x, params, np.random.RandomState(21), C.CIFAR_C)), expected), params


def test_motion_blur_matches_imagemagick_through_wand(images):
    wand = pytest.importorskip("wand.image", reason="Wand / libmagickwand not installed")
    import ctypes
    import io

    import cv2
    from PIL import Image
    from wand.api import library

    library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double)
    rs = np.random.RandomState(3)
    for x, (radius, sigma) in zip(images[:6], C._CIFAR["motion_blur"] + ((14, 12),)):
        angle = rs.uniform(-135, 45)
        buffer = io.BytesIO()
        Image.fromarray(x).save(buffer, format="PNG")
        with wand.Image(blob=buffer.getvalue()) as im:
            library.MagickMotionBlurImage(im.wand, radius, sigma, angle)
            ref = cv2.imdecode(np.frombuffer(im.make_blob(), np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
        assert np.array_equal(C.magick_motion_blur(x, radius, sigma, angle), ref), (radius, sigma, angle)


def test_frost_textures_are_the_official_ones_and_missing_ones_fail_clearly(monkeypatch):
    import hashlib
    from importlib import metadata

    for name, digest in C.FROST_SHA256.items():
        assert hashlib.sha256(C.frost_texture_bytes(name)).hexdigest() == digest

    def missing(_name):
        raise metadata.PackageNotFoundError(_name)

    C._frost_texture.cache_clear()
    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(TTAError, match="pip install --no-deps imagecorruptions==1.1.2"):
        run(np.zeros((32, 32, 3), np.uint8), "frost", 1)
    monkeypatch.undo()
    monkeypatch.setitem(C.FROST_SHA256, "frost1.png", "0" * 64)
    with pytest.raises(TTAError, match="not the official photograph"):
        C.frost_texture_bytes("frost1.png")
    C._frost_texture.cache_clear()


def test_imagenet_c_variant(images):
    from PIL import Image

    x = np.asarray(Image.fromarray(images[0]).resize((224, 224), Image.BICUBIC))
    for name in C.CORRUPTIONS:
        out = C.corrupt_imagenet(x, name, 2, 5)
        assert out.dtype == np.uint8 and out.shape == (224, 224, 3), name
        assert np.array_equal(out, C.corrupt_imagenet(x, name, 2, 5)) and mad(out, x) > 0, name
    # ImageNet-C's much stronger parameters: contrast 0.05 at severity 5 versus CIFAR-10-C's 0.15
    assert C._IMAGENET["contrast"][4] == 0.05 and C._IMAGENET["jpeg_compression"] == (25, 18, 15, 10, 7)
    with pytest.raises(TTAError, match=r"\[224, 224, 3\]"):
        C.corrupt_imagenet(images[0], "contrast", 1, 0)


def test_cache_hits_and_rebuilds_a_damaged_file(images, tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path))
    indices = np.array([4, 1, 1, 7])
    expected = np.stack([run(images[i], "fog", 3, int(i)) for i in indices])
    first = C.corrupted_images(images, "fog", 3, indices)
    assert first.shape == (4, 32, 32, 3) and first.dtype == np.uint8 and np.array_equal(first, expected)
    path = C.cache_path(images, "fog", 3)
    assert path.parent == tmp_path / "corruptions" and path.is_file()
    assert Path(str(path) + ".sha256").read_text().split()[0]

    real_apply = C._apply
    monkeypatch.setattr(C, "_apply", lambda *a: pytest.fail("cache miss"))
    assert np.array_equal(C.corrupted_images(images, "fog", 3, indices), expected)  # a hit: nothing computed
    assert C.cache_path(images, "fog", 4) != path and C.cache_path(images[:11], "fog", 3) != path

    calls = []
    monkeypatch.setattr(C, "_apply", real_apply)
    two = run(images[2], "fog", 3, 2)
    monkeypatch.setattr(C, "_apply", lambda *a: calls.append(a[3]) or real_apply(*a))
    assert np.array_equal(C.corrupted_images(images, "fog", 3, [2, 4]), np.stack([two, expected[0]]))
    assert calls == [2]  # only the new index is computed, then added to the cache file

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damage one byte of the corrupted images
    path.write_bytes(bytes(data))
    calls.clear()
    with pytest.warns(UserWarning, match="fails its sha256 check"):
        again = C.corrupted_images(images, "fog", 3, indices)
    assert np.array_equal(again, expected) and sorted(calls) == [1, 4, 7]
    assert C._read_cache(path, len(images)) is not None  # rebuilt and valid again
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no debris
