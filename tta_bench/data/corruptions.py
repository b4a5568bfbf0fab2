"""CIFAR-10-C and ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019): 15 standard + 4 extra.

A reimplementation of the official generators `make_cifar_c.py` (32 px) and `make_imagenet_c.py`
(224 px) in hendrycks/robustness, with their severity parameters and their exact operations: the
same per-channel means, blur border modes, colour conversions, OpenCV calls, the final float ->
uint8 truncation of `np.uint8(...)`, and the same draws from NumPy's legacy RandomState. Run on
the same libraries, `corrupt(image, name, s, seed)` is byte-identical to the official function
run after `np.random.seed(seed)` (`python -m benchmarks.corruption_fidelity` measures it). The official
script draws from an unseeded global RNG, so the released CIFAR-10-C files themselves cannot be
reproduced bit for bit by anyone; here the RNG is local and seeded by the sample index, so every
run sees the same corrupted image.

ImageMagick's motion blur (used by motion_blur and snow through Wand) is re-implemented in NumPy
to the letter of ImageMagick 6's MotionBlurImage (Q16, edge virtual pixels, 8-bit PNG output), and
the frost textures are the official photographs shipped by the `imagecorruptions` wheel.
Dependencies: numpy, scipy, opencv (cv2), Pillow, imagecorruptions (textures only)."""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tta_bench.core.errors import TTAError

from .cache import cache_root

STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
            "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
            "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = STANDARD + EXTRA
ALIASES = {"jpeg": "jpeg_compression"}
SEVERITIES = (1, 2, 3, 4, 5)
# A task's --corruption: none, the canonical names (also the releases' file and folder names), aliases
CHOICES = ("none", *CORRUPTIONS, *ALIASES)
# Bump whenever a change alters any output pixel: it keys the on-disk cache of corrupted_images().
CODE_VERSION = "2"
IMAGENET_C_SAVE_QUALITY = 85  # make_imagenet_c.py stores every corrupted image as a JPEG of this quality

# ---------------------------------------------------------------------------------------------
# Severity parameters, severities 1..5, as in the official generators.

_CIFAR = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std on [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # ImageMagick radius, sigma
    "zoom_blur": ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),  # np.arange(1, end, step)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # fog weight, wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the per-channel mean
    "elastic_transform": tuple((32 * a, 32 * s, 32 * d) for a, s, d in  # alpha, sigma, affine jitter
                               ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                                (0.1, 0.03, 0.03))),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-scale factor (box filter both ways)
    "jpeg_compression": (80, 65, 58, 50, 40),  # Pillow JPEG quality
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),  # sigma in pixels
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation * a + b
}

_IMAGENET = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)),
    "snow": ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
    "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    # The official script scales by 244 where 224 was meant ("ultimately nothing is incorrect").
    "elastic_transform": tuple((244 * a, 244 * s, 244 * d) for a, s, d in
                               ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02),
                                (0.12, 0.01, 0.02))),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "spatter": ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)),
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
}


class _Suite:
    """One generator's settings: image side, parameter table, and its few size-specific choices."""

    def __init__(self, size: int, table: dict, plasma_size: int, frost_scale: float | None):
        self.size, self.table = size, table
        self.plasma_size, self.frost_scale = plasma_size, frost_scale


CIFAR_C = _Suite(32, _CIFAR, plasma_size=32, frost_scale=0.2)
IMAGENET_C = _Suite(224, _IMAGENET, plasma_size=256, frost_scale=None)
SEVERITY = {name: _CIFAR[name] for name in CORRUPTIONS}  # CIFAR-10-C parameters, by canonical name


def canonical(name: str) -> str:
    """A corruption's canonical name (resolves aliases such as `jpeg`); TTAError for unknown names."""
    name = ALIASES.get(name, name)
    if name not in CORRUPTIONS:
        raise TTAError(f"unknown corruption {name!r}; choose one of: {', '.join(CORRUPTIONS)} "
                       f"(aliases: {', '.join(f'{a}={c}' for a, c in ALIASES.items())})")
    return name


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or int(severity) != severity or severity not in SEVERITIES:
        raise TTAError(f"corruption severity {severity!r} is not one of 1, 2, 3, 4, 5")
    return int(severity)


# ---------------------------------------------------------------------------------------------
# Helpers.

def _cv2():
    try:
        import cv2
    except ImportError as err:  # a real dependency: never fall back to a different algorithm
        raise TTAError(f"corruptions need OpenCV ({err}); pip install opencv-python-headless") from None
    return cv2


def _as_uint8(x) -> np.ndarray:
    """The official scripts store `np.uint8(result)`: float results are truncated, not rounded.
    NaN (spatter when no droplet survives its threshold, 0/0) becomes 0, as x86's cast does."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    return np.nan_to_num(x, nan=0.0).astype(np.uint8)


def _gaussian(x: np.ndarray, sigma: float, channels_last: bool, mode: str = "nearest",
              truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian as the generators call it (float64, mode 'nearest', truncate 4;
    the channel axis is not blurred): a separable scipy.ndimage.gaussian_filter."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(x, dtype=np.float64)
    sigmas = (sigma,) * (x.ndim - 1) + (0,) if channels_last else sigma
    return gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv's arithmetic, float64 in [0, 1]; ties for the maximum resolve to the
    last channel (blue over green over red), as there."""
    v = rgb.max(-1)
    spread = rgb.max(-1) - rgb.min(-1)
    hsv = np.empty_like(rgb)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = spread / v
        s[spread == 0.0] = 0.0
        hue = hsv[..., 0]
        for channel, offset, a, b in ((0, 0.0, 1, 2), (1, 2.0, 2, 0), (2, 4.0, 0, 1)):
            m = rgb[..., channel] == v
            ratio = (rgb[m, a] - rgb[m, b]) / spread[m]
            hue[m] = ratio if channel == 0 else offset + ratio
        h = (hue / 6.0) % 1.0
        h[spread == 0.0] = 0.0
    hsv[..., 0], hsv[..., 1], hsv[..., 2] = h, s, v
    hsv[np.isnan(hsv)] = 0
    return hsv


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb's arithmetic (sextant choice)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sextant = np.floor(h * 6)
    f = h * 6 - sextant
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    k = sextant.astype(np.uint8) % 6
    table = np.stack([np.stack(c, -1) for c in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, np.broadcast_to(k[None, ..., None], (1, *k.shape, 3)), 0)[0]


def _zoom_crop(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by `factor` (bilinear, scipy.ndimage.zoom order 1) and crop back to the
    image side, rows and columns alike (the official `clipped_zoom`)."""
    from scipy.ndimage import zoom

    side = x.shape[0]
    crop = int(np.ceil(side / factor))
    first = (side - crop) // 2
    zoomed = zoom(x[first:first + crop, first:first + crop], (factor, factor, 1), order=1)
    trim = (zoomed.shape[0] - side) // 2
    return zoomed[trim:trim + side, trim:trim + side]


def _plasma(rs: np.random.RandomState, size: int, decay: float) -> np.ndarray:
    """Diamond-square height map in [0, 1] (the official `plasma_fractal`), same draws in order."""
    grid = np.empty((size, size), dtype=np.float64)
    grid[0, 0] = 0
    step, amplitude = size, 100.0

    def jitter(total: np.ndarray) -> np.ndarray:  # the mean of 4 neighbours plus uniform noise
        return total / 4 + amplitude * rs.uniform(-amplitude, amplitude, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        total = corners + np.roll(corners, shift=-1, axis=0)
        total += np.roll(total, shift=-1, axis=1)
        grid[half:size:step, half:size:step] = jitter(total)
        centres, corners = grid[half:size:step, half:size:step], grid[0:size:step, 0:size:step]
        grid[0:size:step, half:size:step] = jitter(
            (centres + np.roll(centres, 1, axis=0)) + (corners + np.roll(corners, -1, axis=1)))
        grid[half:size:step, 0:size:step] = jitter(
            (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=0)))
        step //= 2
        amplitude /= decay
    grid -= grid.min()
    return grid / grid.max()


_SQRT_2PI = 2.50662827463100024161235523934010416269302368164062  # ImageMagick's MagickSQ2PI


def magick_motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick 6's MotionBlurImage on an 8-bit image (Wand's `MagickMotionBlurImage`), then the
    8-bit PNG round trip of the official code: a one-sided Gaussian (width 2*ceil(radius)+1) along
    `angle`, edge-replicated borders, rounding to Q16, then truncation to 8 bits as its PNG writer.
    x: uint8 [H, W] or [H, W, C] -> uint8 of the same shape."""
    width = int(2 * math.ceil(radius) + 1) if radius > 1e-12 else 3
    s = sigma if abs(sigma) >= 1e-12 else 1e-12
    taps = np.array([math.exp(-(i * i) / (2.0 * s * s)) / (_SQRT_2PI * s) for i in range(width)])
    taps = taps / taps.sum()
    px, py = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    norm = math.hypot(px, py)
    quanta = x.astype(np.float64) * 257.0  # 8-bit -> Q16
    rows, cols = x.shape[0], x.shape[1]
    r, c = np.arange(rows), np.arange(cols)
    total = np.zeros_like(quanta)
    for i in range(width):
        dx = math.ceil(i * py / norm - 0.5)
        dy = math.ceil(i * px / norm - 0.5)
        total = total + taps[i] * quanta[np.clip(r + dy, 0, rows - 1)][:, np.clip(c + dx, 0, cols - 1)]
    q16 = np.clip(np.floor(total + 0.5), 0, 65535).astype(np.uint32)  # ClampToQuantum: rounds
    # ImageMagick 6.9.11's PNG encoder then truncates to 8 bits (measured: bit-exact on 368,640 values).
    return (q16 // 257).astype(np.uint8)


FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
# sha256 of the official photographs, as in Hendrycks' own `imagenet-c` 0.0.3 sdist on PyPI
# (imagenet_c/frost/); the `imagecorruptions` 1.1.2 wheel ships the identical files.
FROST_SHA256 = {
    "frost1.png": "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "frost2.png": "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "frost3.png": "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "frost4.jpg": "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "frost5.jpg": "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
    "frost6.jpg": "1f92b2f48408748085b68dd81d816ef239f42cef3029c25d041fcb6760fb4f25",
}
FROST_PACKAGE = "imagecorruptions"


def frost_texture_bytes(name: str) -> bytes:
    """An official frost photograph, read from the installed `imagecorruptions` distribution (located
    through its metadata: importing that package needs setuptools' pkg_resources) and checked by sha256."""
    from importlib import metadata

    hint = f"pip install --no-deps {FROST_PACKAGE}==1.1.2"
    try:
        path = Path(metadata.distribution(FROST_PACKAGE).locate_file(f"{FROST_PACKAGE}/frost/{name}"))
        data = path.read_bytes()
    except metadata.PackageNotFoundError:
        raise TTAError(f"the frost corruption needs the official frost textures of the PyPI package "
                       f"`{FROST_PACKAGE}`, which is not installed; {hint}") from None
    except OSError as err:
        raise TTAError(f"the frost texture {name} of `{FROST_PACKAGE}` cannot be read ({err}); "
                       f"reinstall it: {hint} --force-reinstall") from None
    if hashlib.sha256(data).hexdigest() != FROST_SHA256[name]:
        raise TTAError(f"the frost texture {path} is not the official photograph (sha256 mismatch); "
                       f"reinstall it: {hint} --force-reinstall")
    return data


@lru_cache(maxsize=None)
def _frost_texture(index: int, scale: float | None) -> np.ndarray:
    """Official frost photograph `index` as BGR uint8 (cv2.imread semantics: alpha dropped),
    optionally resized by `scale` with cv2's default bilinear interpolation."""
    cv2 = _cv2()
    data = frost_texture_bytes(FROST_FILES[index])
    texture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if texture is None:
        raise TTAError(f"the frost texture {FROST_FILES[index]} of `{FROST_PACKAGE}` cannot be decoded")
    if scale is not None:
        texture = cv2.resize(texture, (0, 0), fx=scale, fy=scale)
    texture.setflags(write=False)
    return texture


# ---------------------------------------------------------------------------------------------
# The corruptions: (uint8 RGB [S, S, 3], parameter, RandomState, suite) -> the official function's
# return value before its np.uint8 cast (float, or uint8 where the official returns an image).

def _gaussian_noise(x, c, rs, suite):
    x = x / 255.0
    return np.clip(x + rs.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(x, c, rs, suite):
    x = x / 255.0
    return np.clip(rs.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(x, c, rs, suite):
    # skimage.util.random_noise(mode='s&p', amount=c) as in scikit-image 0.13-0.18 (the releases of
    # the CIFAR-10-C era): one Bernoulli(amount) mask for "flipped", one Bernoulli(0.5) for salt.
    x = x / 255.0
    flipped = rs.choice([True, False], size=x.shape, p=[c, 1 - c])
    salted = rs.choice([True, False], size=x.shape, p=[0.5, 0.5])
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return np.clip(x, 0, 1) * 255


def _speckle_noise(x, c, rs, suite):
    x = x / 255.0
    return np.clip(x + x * rs.normal(size=x.shape, scale=c), 0, 1) * 255


def _gaussian_blur(x, c, rs, suite):
    return np.clip(_gaussian(x / 255.0, c, channels_last=True), 0, 1) * 255


def _glass_blur(x, c, rs, suite):
    sigma, delta, iterations = c
    x = _as_uint8(_gaussian(x / 255.0, sigma, channels_last=True) * 255)
    side = x.shape[0]
    # Destinations in the official visiting order: rows then columns from side-1-delta down to
    # delta+1. Its tuple "swap" of NumPy views copies the source into the destination and leaves
    # the source as it was; a destination visited earlier carries its new value on.
    h, w = np.meshgrid(np.arange(side - delta, delta, -1), np.arange(side - delta, delta, -1), indexing="ij")
    dest = (h * side + w).ravel()
    rank = np.full(side * side, -1)
    rank[dest] = np.arange(len(dest))
    flat = x.reshape(side * side, 3)
    for _ in range(iterations):
        dx_dy = rs.randint(-delta, delta, size=(len(dest), 2))
        src = (h.ravel() + dx_dy[:, 1]) * side + (w.ravel() + dx_dy[:, 0])
        # Resolve chains: value(dest) = value(src) after src's own update if src was visited first.
        parent = np.arange(side * side)
        origin = np.arange(side * side)
        earlier = (rank[src] >= 0) & (rank[src] < rank[dest])
        parent[dest[earlier]] = src[earlier]
        origin[dest[~earlier]] = src[~earlier]
        for _ in range(int(np.ceil(np.log2(len(dest) + 1))) + 1):
            parent = parent[parent]
        flat = flat[origin[parent]]
    x = flat.reshape(side, side, 3)
    return np.clip(_gaussian(x / 255.0, sigma, channels_last=True), 0, 1) * 255


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    cv2 = _cv2()
    extent = 8 if radius <= 8 else radius
    ksize = (3, 3) if radius <= 8 else (5, 5)
    ys, xs = np.meshgrid(np.arange(-extent, extent + 1), np.arange(-extent, extent + 1))
    disk = np.array((xs ** 2 + ys ** 2) <= radius ** 2, dtype=np.float32)
    disk /= np.sum(disk)
    return cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)


def _defocus_blur(x, c, rs, suite):
    cv2 = _cv2()
    kernel = _disk(radius=c[0], alias_blur=c[1])
    x = x / 255.0
    blurred = np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)], axis=-1)
    return np.clip(blurred, 0, 1) * 255


def _motion_blur(x, c, rs, suite):
    return magick_motion_blur(x, radius=c[0], sigma=c[1], angle=rs.uniform(-45, 45))


def _zoom_blur(x, c, rs, suite):
    factors = np.arange(1, c[0], c[1])  # the official float arange: its end may or may not be included
    x = (x / 255.0).astype(np.float32)
    total = np.zeros_like(x)
    for factor in factors:
        total += _zoom_crop(x, factor)
    return np.clip((x + total) / (len(factors) + 1), 0, 1) * 255


def _snow(x, c, rs, suite):
    cv2 = _cv2()
    side = suite.size
    x = np.asarray(x, dtype=np.float32) / 255.0
    flakes = rs.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    flakes = _zoom_crop(flakes[..., None], c[2])
    flakes[flakes < c[3]] = 0
    flakes = (np.clip(flakes[..., 0], 0, 1) * 255).astype(np.uint8)
    flakes = magick_motion_blur(flakes, radius=c[4], sigma=c[5], angle=rs.uniform(-135, -45)) / 255.0
    flakes = flakes[..., None]
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(side, side, 1)
    x = c[6] * x + (1 - c[6]) * np.maximum(x, grey * 1.5 + 0.5)
    return np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255


def _frost(x, c, rs, suite):
    side = suite.size
    texture = _frost_texture(rs.randint(5), suite.frost_scale)  # frost6 is listed but never drawn
    top, left = rs.randint(0, texture.shape[0] - side), rs.randint(0, texture.shape[1] - side)
    patch = texture[top:top + side, left:left + side][..., ::-1]  # BGR -> RGB
    return np.clip(c[0] * x + c[1] * patch, 0, 255)


def _fog(x, c, rs, suite):
    side = suite.size
    x = x / 255.0
    peak = x.max()
    x += c[0] * _plasma(rs, suite.plasma_size, c[1])[:side, :side][..., None]
    return np.clip(x * peak / (peak + c[0]), 0, 1) * 255


def _brightness(x, c, rs, suite):
    hsv = _rgb_to_hsv(x / 255.0)
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
    return np.clip(_hsv_to_rgb(hsv), 0, 1) * 255


def _saturate(x, c, rs, suite):
    hsv = _rgb_to_hsv(x / 255.0)
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * c[0] + c[1], 0, 1)
    return np.clip(_hsv_to_rgb(hsv), 0, 1) * 255


def _contrast(x, c, rs, suite):
    x = x / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)  # per channel
    return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic_transform(x, c, rs, suite):
    from scipy.ndimage import map_coordinates

    cv2 = _cv2()
    alpha, sigma, jitter = c
    image = np.asarray(x, dtype=np.float32) / 255.0
    rows, cols, depth = image.shape
    centre = np.float32((rows, cols)) // 2
    third = min(rows, cols) // 3
    src = np.float32([centre + third, [centre[0] + third, centre[1] - third], centre - third])
    dst = src + rs.uniform(-jitter, jitter, size=src.shape).astype(np.float32)
    image = cv2.warpAffine(image, cv2.getAffineTransform(src, dst), (cols, rows), borderMode=cv2.BORDER_REFLECT_101)
    shifts = [(_gaussian(rs.uniform(-1, 1, size=(rows, cols)), sigma, channels_last=False, mode="reflect",
                         truncate=3) * alpha).astype(np.float32) for _ in "xy"]
    dx, dy = shifts[0][..., None], shifts[1][..., None]
    yy, xx, zz = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(depth), indexing="ij")
    coords = np.stack([(yy + dy).ravel(), (xx + dx).ravel(), zz.ravel().astype(np.float64)])
    warped = map_coordinates(image, coords, order=1, mode="reflect").reshape(image.shape)
    return np.clip(warped, 0, 1) * 255


def _pixelate(x, c, rs, suite):
    side = suite.size
    small = int(side * c)
    image = Image.fromarray(x).resize((small, small), Image.BOX).resize((side, side), Image.BOX)
    return np.asarray(image)


def _jpeg_compression(x, c, rs, suite):
    return _jpeg_round_trip(x, c)


def _jpeg_round_trip(x: np.ndarray, quality: int, **options) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=quality, **options)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _spatter(x, c, rs, suite):
    cv2 = _cv2()
    x = np.asarray(x, dtype=np.float32) / 255.0
    liquid = rs.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    liquid = _gaussian(liquid, c[2], channels_last=False)
    liquid[liquid < c[3]] = 0
    if c[5] == 0:  # water: pale turquoise drops, lit along their edges
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            liquid = (liquid * 255).astype(np.uint8)
        dist = 255 - cv2.Canny(liquid, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        wet = liquid * dist  # float32
        with np.errstate(invalid="ignore", divide="ignore"):
            wet = wet / np.max(wet)
        wet = (wet * c[4])[..., None]
        colour = np.ones_like(x) * np.array([175 / 255.0, 238 / 255.0, 238 / 255.0]).astype(np.float32)
        return np.clip(x + wet * colour, 0, 1) * 255
    # mud: brown blobs replace the image where the blurred mask is dense
    mask = _gaussian(np.where(liquid > c[3], 1, 0).astype(np.float32), c[4], channels_last=False)
    mask[mask < 0.8] = 0
    mud = np.ones_like(x) * np.array([63 / 255.0, 42 / 255.0, 20 / 255.0]).astype(np.float32)
    mud *= mask[..., None]
    x *= 1 - mask[..., None]
    return np.clip(x + mud, 0, 1) * 255


_FUNCTIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
    "contrast": _contrast, "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression, "speckle_noise": _speckle_noise, "gaussian_blur": _gaussian_blur,
    "spatter": _spatter, "saturate": _saturate,
}


def _apply(x: np.ndarray, name: str, severity: int, seed: int, suite: _Suite) -> np.ndarray:
    name, severity = canonical(name), _check_severity(severity)
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.shape != (suite.size, suite.size, 3):
        raise TTAError(f"corrupt: expected a uint8 image [{suite.size}, {suite.size}, 3], got "
                       f"{x.dtype} {list(x.shape)}")
    x = np.ascontiguousarray(x)
    rs = np.random.RandomState(int(seed) % 2 ** 32)  # local: the global NumPy RNG is never touched
    c = suite.table[name][severity - 1]
    return _as_uint8(_FUNCTIONS[name](x, c, rs, suite))


def corrupt(image: Tensor, name: str, severity: int, seed: int) -> Tensor:
    """CIFAR-10-C corruption `name` at `severity` (1..5): uint8 [32, 32, 3] -> uint8 [32, 32, 3],
    deterministic per (image, name, severity, seed); pass the sample's index as `seed`."""
    array = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    return torch.from_numpy(_apply(array, name, severity, seed, CIFAR_C).copy())


def corrupt_imagenet(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """ImageNet-C corruption `name` at `severity` (1..5) of a 224 px image (the official input is
    the Resize(256) + CenterCrop(224) of a validation image), with make_imagenet_c.py's parameters,
    including its final JPEG (quality 85) storage: uint8 [224, 224, 3] -> uint8 [224, 224, 3]."""
    out = _apply(np.asarray(image), name, severity, seed, IMAGENET_C)
    return _jpeg_round_trip(out, IMAGENET_C_SAVE_QUALITY, optimize=True)


# ---------------------------------------------------------------------------------------------
# On-disk cache of corrupted CIFAR images.

def _library_versions() -> str:
    import PIL
    import scipy

    cv2 = _cv2()
    return f"numpy {np.__version__}, scipy {scipy.__version__}, opencv {cv2.__version__}, pillow {PIL.__version__}"


def _cache_dir() -> Path:
    return cache_root() / "corruptions"


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, done) from a cache file whose sha256 matches its sidecar; None when absent or damaged."""
    digest_path = path.with_name(path.name + ".sha256")
    try:
        data, expected = path.read_bytes(), digest_path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    if hashlib.sha256(data).hexdigest() != expected:
        warnings.warn(f"corruption cache {path} fails its sha256 check; rebuilding it", stacklevel=3)
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            images, done = archive["images"], archive["done"]
    except (OSError, ValueError, KeyError, EOFError) as err:
        warnings.warn(f"corruption cache {path} is unreadable ({err}); rebuilding it", stacklevel=3)
        return None
    if images.shape != (n, 32, 32, 3) or images.dtype != np.uint8 or done.shape != (n,) or done.dtype != bool:
        return None
    return images, done


def _write_cache(path: Path, images: np.ndarray, done: np.ndarray) -> None:
    from tta_bench.storage.checkpoint import write_atomically

    buffer = io.BytesIO()
    np.savez(buffer, images=images, done=done)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_bytes(data))
    write_atomically(path.with_name(path.name + ".sha256"),
                     lambda tmp: tmp.write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n"))


def cache_path(images: np.ndarray, name: str, severity: int) -> Path:
    """Where corrupted_images() keeps (images, name, severity): keyed by the images' bytes, the
    corruption, the severity, CODE_VERSION and the versions of the libraries that shape pixels."""
    name, severity = canonical(name), _check_severity(severity)
    key = hashlib.sha256()
    key.update(f"{images.dtype}{images.shape}".encode())
    key.update(np.ascontiguousarray(images).tobytes())
    key.update(f"|{name}|{severity}|{CODE_VERSION}|{_library_versions()}".encode())
    return _cache_dir() / f"cifar-{name}-s{severity}-{key.hexdigest()[:32]}.npz"


class CorruptedSet:
    """corrupt(images[i], name, severity, seed=i) on demand, kept under cache_root()/corruptions
    (checked by sha256, written atomically): the cache file is found and read once, and written
    again only when `take` had to compute images."""

    def __init__(self, images: np.ndarray, name: str, severity: int):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise TTAError(f"corrupted_images: expected uint8 images [N, 32, 32, 3], got {images.dtype} "
                           f"{list(images.shape)}")
        self.images, self.name, self.severity = images, name, severity
        self.path = cache_path(images, name, severity)
        cached = _read_cache(self.path, len(images))
        self.on_disk = cached is not None
        store, done = cached if cached is not None else (np.zeros((len(images), 32, 32, 3), np.uint8),
                                                         np.zeros(len(images), bool))
        self.store, self.done = store.copy(), done.copy()
        self.unwritable = False  # a cache write failed (warned once)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """uint8 [len(indices), 32, 32, 3], computing (and caching) the images not yet done."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.images)
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise TTAError(f"corrupted_images: indices must lie in 0..{n - 1}")
        missing = np.unique(indices[~self.done[indices]])
        for i in missing:
            self.store[i] = _apply(self.images[i], self.name, self.severity, int(i), CIFAR_C)
            self.done[i] = True
        if len(missing) or not self.on_disk:
            try:
                _write_cache(self.path, self.store, self.done)
            except OSError as err:  # unwritable or full: the images are right, only not kept for next time
                if not self.unwritable:
                    warnings.warn(f"cannot write the corruption cache {self.path.parent} ({err.strerror or err}); "
                                  f"corrupted images are computed without it (set TTA_BENCH_CACHE to a writable "
                                  f"folder)", stacklevel=2)
                self.unwritable = True
            self.on_disk = True
        return self.store[indices]


def corrupted_images(images: np.ndarray, name: str, severity: int, indices: np.ndarray) -> np.ndarray:
    """corrupt(images[i], name, severity, seed=i) for every i in `indices`, as uint8 [len(indices), 32,
    32, 3]; computed once and kept under cache_root()/corruptions (see CorruptedSet)."""
    return CorruptedSet(images, name, severity).take(indices)
