"""Speed and fidelity of tta_bench/data/corruptions.py against the official CIFAR-10-C / ImageNet-C generators.

    python -m benchmarks.corruption_fidelity [--n 100] [--official-cifar make_cifar_c.py]
        [--official-imagenet make_imagenet_c.py] [--imagenet-n 2]

Prints, per corruption: ms/image at severity 5 on one core (32 px, and 224 px for ImageNet-C);
with --official-*, the mean absolute pixel difference (and the share of byte-identical images)
between corrupt()/corrupt_imagenet() and the official function run after np.random.seed(seed) on
the same image, over all severities. The official scripts (hendrycks/robustness,
ImageNet-C/create_c/) are loaded as they are, minus their data loading, with shims for today's
libraries: scipy.ndimage.interpolation -> scipy.ndimage, np.float_ -> np.float64,
np.fromstring -> np.frombuffer, skimage's `multichannel=True` -> `channel_axis=-1` on float64
input (skimage <= 0.18 converted every input to float64), and skimage.util.random_noise('s&p') as
scikit-image 0.13-0.18 drew it from the global RNG. Their motion blur calls ImageMagick through
Wand (pip install Wand; apt-get install libmagickwand-dev). Independently of the scripts, it also
compares magick_motion_blur() with Wand's MagickMotionBlurImage on the same images.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import io
import time
import types
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tta_bench.tasks.cifar10 import DATA_FILE

from tta_bench.data import corruptions as C


def load_images(n: int) -> np.ndarray:
    with np.load(DATA_FILE) as data:
        return data["images"][:n]


def imagenet_like(images: np.ndarray) -> np.ndarray:
    """224 px stand-ins for ImageNet validation crops (no ImageNet data here): bicubic upsamples."""
    return np.stack([np.asarray(Image.fromarray(x).resize((224, 224), Image.BICUBIC)) for x in images])


# ---------------------------------------------------------------------------------------------
# The official generator, loaded from its source with shims for current libraries.

def _old_random_noise(image, mode="gaussian", seed=None, clip=True, **kwargs):
    """skimage.util.random_noise, mode 's&p', as in scikit-image 0.13-0.18 (global NumPy RNG)."""
    assert mode == "s&p", mode
    image = np.asarray(image, dtype=np.float64)
    amount, salt = kwargs.get("amount", 0.05), kwargs.get("salt_vs_pepper", 0.5)
    low = -1.0 if image.min() < 0 else 0.0
    out = image.copy()
    flipped = np.random.choice([True, False], size=image.shape, p=[amount, 1 - amount])
    salted = np.random.choice([True, False], size=image.shape, p=[salt, 1 - salt])
    out[flipped & salted] = 1
    out[flipped & ~salted] = low
    return np.clip(out, low, 1.0) if clip else out


def _old_gaussian(image, sigma=1, output=None, mode="nearest", cval=0, multichannel=None,
                  preserve_range=False, truncate=4.0):
    """skimage.filters.gaussian with the old `multichannel` flag; float64 input as skimage <= 0.18."""
    from skimage.filters import gaussian
    from skimage.util import img_as_float

    image = np.asarray(image)
    image = img_as_float(image) if image.dtype.kind in "ui" else image.astype(np.float64)
    return gaussian(image, sigma=sigma, mode=mode, cval=cval, truncate=truncate,
                    channel_axis=-1 if multichannel else None, preserve_range=True)


def load_official(path: Path) -> dict:
    """The distortion functions of an official generator script, by function name."""
    import skimage.color

    source = path.read_text()
    for old, new in (("from scipy.ndimage.interpolation import", "from scipy.ndimage import"),
                     ("np.float_", "np.float64"), ("np.fromstring(", "np.frombuffer("),
                     ("from pkg_resources import resource_filename", "")):
        source = source.replace(old, new)
    tree = ast.parse(source)
    keep = []
    for node in tree.body:  # imports, functions, the Wand glue; not the data loading and the loops
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)):
            keep.append(node)
        elif isinstance(node, ast.ClassDef) and node.name == "MotionImage":
            keep.append(node)
        elif isinstance(node, ast.Assign) and "MagickMotionBlurImage" in ast.unparse(node):
            keep.append(node)
        elif isinstance(node, ast.Expr) and "simplefilter" in ast.unparse(node):
            keep.append(node)
    frost_dir = Path(metadata.distribution(C.FROST_PACKAGE).locate_file(f"{C.FROST_PACKAGE}/frost"))
    namespace = {"__name__": "official", "resource_filename": lambda _pkg, rel: str(frost_dir / Path(rel).name)}
    try:
        import wand.image  # noqa: F401
    except ImportError:  # motion_blur / snow then fail, and are reported as skipped
        keep = [n for n in keep if not (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("wand"))
                and not isinstance(n, ast.ClassDef) and not (isinstance(n, ast.Assign))]
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    namespace["gaussian"] = _old_gaussian
    namespace["sk"] = types.SimpleNamespace(util=types.SimpleNamespace(random_noise=_old_random_noise),
                                            color=skimage.color)
    namespace["_frost_dir"] = frost_dir
    return namespace


def official_output(official: dict, name: str, image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    function = official[name]
    np.random.seed(seed)
    with contextlib.chdir(str(official["_frost_dir"])), warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        out = function(Image.fromarray(image), severity)
        if isinstance(out, Image.Image):
            return np.asarray(out)
        return np.nan_to_num(np.asarray(out), nan=0.0).astype(np.uint8)  # np.uint8(...): truncation


def save_as_imagenet_c(x: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.uint8(x)).save(buffer, "JPEG", quality=85, optimize=True)
    return np.asarray(Image.open(buffer))


# ---------------------------------------------------------------------------------------------
# Wand's motion blur, called as the official scripts call it.

def wand_motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray | None:
    try:
        import cv2
        from wand.api import library
        from wand.image import Image as WandImage
    except ImportError:
        return None
    library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double)
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, format="PNG")
    with WandImage(blob=buffer.getvalue()) as image:
        library.MagickMotionBlurImage(image.wand, radius, sigma, angle)
        out = cv2.imdecode(np.frombuffer(image.make_blob(), np.uint8), cv2.IMREAD_UNCHANGED)
    if x.ndim == 2:
        return out if out.ndim == 2 else out[..., 0]
    return np.stack([out] * 3, -1) if out.ndim == 2 else out[..., ::-1]


def compare_motion_blur(images: np.ndarray) -> None:
    rs = np.random.RandomState(0)
    diffs, same, n = [], 0, 0
    for suite in (C.CIFAR_C, C.IMAGENET_C):
        for i, x in enumerate(images):
            if suite is C.IMAGENET_C:
                if i >= 10:
                    break
                x = imagenet_like(x[None])[0]
            for radius, sigma in suite.table["motion_blur"] + tuple(p[4:6] for p in suite.table["snow"]):
                angle = rs.uniform(-180, 180)
                ref = wand_motion_blur(x, radius, sigma, angle)
                if ref is None:
                    print("Wand motion blur: skipped (pip install Wand; apt-get install libmagickwand-dev)")
                    return
                ours = C.magick_motion_blur(x, radius, sigma, angle)
                diffs.append(np.abs(ours.astype(int) - ref.astype(int)).mean())
                same += np.array_equal(ours, ref)
                n += 1
    import wand.version

    print(f"magick_motion_blur vs Wand ({wand.version.MAGICK_VERSION.split(' http')[0]}): {n} images "
          f"(CIFAR + ImageNet radii/sigmas, random angles), mean |diff| {np.mean(diffs):.4f}, "
          f"max per-image {np.max(diffs):.4f}, byte-identical {same}/{n}")


# ---------------------------------------------------------------------------------------------

def time_corruptions(images: np.ndarray, apply, label: str) -> dict:
    times = {}
    for name in C.CORRUPTIONS:
        apply(images[0], name, 5, 0)  # warm: imports, frost textures
        start = time.perf_counter()
        for i, x in enumerate(images):
            apply(x, name, 5, i)
        times[name] = (time.perf_counter() - start) / len(images) * 1e3
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="CIFAR test images to use")
    parser.add_argument("--imagenet-n", type=int, default=2, help="224 px images for the ImageNet-C checks")
    parser.add_argument("--official-cifar", type=Path, help="path to make_cifar_c.py (hendrycks/robustness)")
    parser.add_argument("--official-imagenet", type=Path,
                        help="path to make_imagenet_c.py, or imagenet_c/corruptions.py of the imagenet-c sdist")
    parser.add_argument("--no-wand", action="store_true", help="skip the Wand motion-blur comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(1)
    images = load_images(args.n)
    big = imagenet_like(images[:args.imagenet_n])
    print(f"libraries: {C._library_versions()}")

    cifar_ms = time_corruptions(images, lambda x, n, s, i: C.corrupt(torch.from_numpy(x), n, s, i), "cifar")
    imagenet_ms = time_corruptions(big, C.corrupt_imagenet, "imagenet")
    fidelity: dict[str, dict] = {"cifar": {}, "imagenet": {}}
    for key, path, pictures, ours, finish in (
            ("cifar", args.official_cifar, images, lambda x, n, s, i: C.corrupt(torch.from_numpy(x), n, s, i).numpy(),
             lambda x: x),
            ("imagenet", args.official_imagenet, big, C.corrupt_imagenet, save_as_imagenet_c)):
        if path is None:
            continue
        official = load_official(path)
        for name in C.CORRUPTIONS:
            diffs, same = [], 0
            try:
                for s in C.SEVERITIES:
                    for i, x in enumerate(pictures):
                        ref = finish(official_output(official, name, x, s, i))
                        mine = ours(x, name, s, i)
                        diffs.append(np.abs(mine.astype(int) - ref.astype(int)).mean())
                        same += np.array_equal(mine, ref)
                fidelity[key][name] = f"{np.mean(diffs):8.4f}   {same:4d}/{len(diffs)}"
            except Exception as err:  # e.g. Wand missing for motion_blur / snow
                fidelity[key][name] = f"skipped ({type(err).__name__}: {str(err)[:60]})"

    print(f"\n{'corruption':18s} {'ms/img 32px':>11s} {'ms/img 224px':>12s}   "
          f"vs official CIFAR-10-C: mean|diff| identical   | ImageNet-C: mean|diff| identical")
    for name in C.CORRUPTIONS:
        print(f"{name:18s} {cifar_ms[name]:11.2f} {imagenet_ms[name]:12.1f}   "
              f"{fidelity['cifar'].get(name, 'n/a'):>30s}   | {fidelity['imagenet'].get(name, 'n/a')}")
    if not args.no_wand:
        compare_motion_blur(images)


if __name__ == "__main__":
    main()
