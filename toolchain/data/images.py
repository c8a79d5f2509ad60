"""Image data: scikit-learn's handwritten digits under graded corruptions (the embedded image default),
and image folders read with Pillow.

``digits``: the 1,797 real 8x8 scans of ``sklearn.datasets.load_digits`` (no download), upsampled to
32x32 and scaled to [0, 1]. The images are split in two disjoint halves by a seeded permutation:
subject 0 is the clean source half; subjects 1-4 are the target half under rotation, Gaussian blur,
Gaussian noise and contrast loss at one severity (1-5, default 3; ``digits:SEVERITY``), the four
corruption families of CIFAR-10-C (Hendrycks and Dietterich, 2019) that apply to grey digits.
Segments are (subject, class), so the per-segment split keeps every class in adapt and test parts.

``imagefolder:ROOT[:SIZE]``: ROOT/CLASS/*.png|jpg, or ROOT/DOMAIN/CLASS/* (each domain a subject),
resized to SIZE x SIZE (default 32) and scaled to [0, 1]; channels from the first image (L or RGB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.errors import ToolchainError
from toolchain.data.windows import WindowDataset

DIGITS_SIZE = 32
CORRUPTIONS = ("rotate", "blur", "noise", "contrast")
# severity 1..5 -> parameter, graded as in CIFAR-10-C
_ROTATE_DEG = (10, 20, 30, 40, 50)
_BLUR_SIGMA = (0.6, 1.0, 1.5, 2.0, 2.5)
_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
_CONTRAST = (0.6, 0.45, 0.3, 0.2, 0.12)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_IMAGES = 200_000
MAX_DECODED_BYTES = 2 << 30  # the float32 array the decoded images become
HIGH_BIT_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")  # Pillow's convert("L") clips these at 255
GRAY_MODES = ("1", "L", *HIGH_BIT_MODES)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) float -> (N, size, size) by bilinear interpolation (Pillow)."""
    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.fromarray(im.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
            for im in images
        ]
    )


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    """One corruption family at severity 1-5 on (N, H, W) images in [0, 1]; values stay in [0, 1]."""
    from PIL import Image

    s = severity - 1
    rng = np.random.default_rng(seed)
    images = np.asarray(images, dtype=np.float32)
    if kind == "rotate":
        angles = rng.uniform(-1, 1, len(images)) * _ROTATE_DEG[s]
        out = [
            np.asarray(Image.fromarray(im).rotate(a, resample=Image.Resampling.BILINEAR))
            for im, a in zip(images, angles, strict=True)
        ]
        return np.clip(np.stack(out), 0, 1)
    if kind == "blur":
        return gaussian_blur(images, _BLUR_SIGMA[s])
    if kind == "noise":
        return np.clip(images + rng.normal(0, _NOISE_STD[s], images.shape), 0, 1)
    if kind == "contrast":
        mean = images.mean(axis=(1, 2), keepdims=True)
        return np.clip((images - mean) * _CONTRAST[s] + mean, 0, 1)
    raise ToolchainError("unknown corruption", seen=kind, remedy=f"use one of {', '.join(CORRUPTIONS)}")


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W) images, reflect-padded, kernel radius ceil(3 sigma)."""
    radius = int(np.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(images, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    rows = sum(k[i] * padded[:, i : i + images.shape[1], :] for i in range(len(k)))
    out = sum(k[i] * rows[:, :, i : i + images.shape[2]] for i in range(len(k)))
    return np.asarray(out, dtype=np.float32)


def load_digits_shift(severity: int = 3, seed: int = 0) -> WindowDataset:
    """The digits source (subject 0, clean) and corrupted target (subjects 1-4); see the module doc."""
    if not 1 <= severity <= 5:
        raise ToolchainError(
            "digits severity must be 1..5", seen=severity, remedy="use digits, or digits:1 .. digits:5"
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ToolchainError(
            "the digits image default needs scikit-learn",
            seen="sklearn not installed",
            remedy="pip install 'toolchain[images]'",
        ) from None
    d = load_digits()
    images = _resize(d.images.astype(np.float32) / 16.0, DIGITS_SIZE).astype(np.float32)
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    src, tgt = order[: len(order) // 2], order[len(order) // 2 :]
    parts_x, parts_y, parts_s = [images[src]], [labels[src]], [np.zeros(len(src), np.int64)]
    for k, kind in enumerate(CORRUPTIONS, start=1):
        parts_x.append(corrupt(images[tgt], kind, severity, seed + k).astype(np.float32))
        parts_y.append(labels[tgt])
        parts_s.append(np.full(len(tgt), k, np.int64))
    X = np.concatenate(parts_x)[:, None]
    y, subject = np.concatenate(parts_y), np.concatenate(parts_s)
    return WindowDataset(
        np.ascontiguousarray(X, dtype=np.float32), y, subject, subject * 100 + y, [str(i) for i in range(10)], "digits"
    )


def load_image_folder(root: str | Path, size: int = 32) -> WindowDataset:
    """ROOT/CLASS/* or ROOT/DOMAIN/CLASS/* images -> (N, C, size, size) in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    base = Path(root)
    if not base.is_dir():
        raise ToolchainError(
            "image folder does not exist",
            seen=str(base),
            remedy="pass imagefolder:ROOT with ROOT/CLASS/*.png or ROOT/DOMAIN/CLASS/*.png",
        )
    if not 4 <= size <= 1024:
        raise ToolchainError("image size must be 4..1024", seen=size)
    groups = _image_groups(base)
    total = sum(len(files) for _, _, files in groups)
    if total * 3 * size * size * 4 > MAX_DECODED_BYTES:  # bounded before any image is decoded
        raise ToolchainError(
            f"the decoded images would take more than {MAX_DECODED_BYTES >> 30} GiB",
            seen=f"{total} images at {size}x{size}",
            remedy="choose a smaller SIZE in imagefolder:ROOT:SIZE, or fewer images",
        )
    classes = sorted({c for _, c, _ in groups})
    domains = sorted({d for d, _, _ in groups})
    xs, ys, ss, mode = [], [], [], None
    for domain, cls, files in groups:
        for f in files:
            try:
                with Image.open(f) as im:
                    mode = mode or ("L" if im.mode in GRAY_MODES else "RGB")
                    arr = _pixels(im, mode, size, f)
            except (
                OSError,
                ValueError,
                UnidentifiedImageError,
                Image.DecompressionBombError,
            ) as err:  # ValueError: text chunks past Pillow's limit
                raise ToolchainError(
                    "cannot read an image", seen=f"{f}: {type(err).__name__}", remedy="remove or replace the file"
                ) from None
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(classes.index(cls))
            ss.append(domains.index(domain))
    y, s = np.array(ys, np.int64), np.array(ss, np.int64)
    return WindowDataset(np.stack(xs).astype(np.float32), y, s, s * len(classes) + y, classes, base.name or "images")


def _pixels(im: Any, mode: str, size: int, path: Path) -> np.ndarray:
    """One image as float32 in [0, 1] at size x size: 8-bit modes over 255, 16-bit over 65535;
    32-bit integer and float images are taken only when their values fit 16 bits or [0, 1]."""
    from PIL import Image

    if im.mode not in HIGH_BIT_MODES:
        return np.asarray(im.convert(mode).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    gray = _high_bit_gray(im, size, path)
    return np.repeat(gray[:, :, None], 3, axis=2) if mode == "RGB" else gray


def _high_bit_gray(im: Any, size: int, path: Path) -> np.ndarray:
    from PIL import Image

    values = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        peak = 65535.0
    elif im.mode == "I" and values.min() >= 0 and values.max() <= 65535:
        peak = 65535.0 if values.max() > 255 else 255.0
    elif im.mode == "F" and np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
        peak = 1.0
    else:
        raise ToolchainError(
            "an image's pixel range is not known",
            seen=f"{path}: mode {im.mode}, values {values.min():.4g}..{values.max():.4g}",
            remedy="save 8- or 16-bit images (or float images in [0, 1])",
        )
    scaled = Image.fromarray((values / peak).astype(np.float32), mode="F")
    return np.asarray(scaled.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _image_groups(base: Path) -> list[tuple[str, str, list[Path]]]:
    """(domain, class, files); domain "" when the folder has class folders directly."""

    def images(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    subdirs = sorted(p for p in base.iterdir() if p.is_dir())
    if subdirs and all(images(d) for d in subdirs):
        groups = [("", d.name, images(d)) for d in subdirs]
    else:
        groups = [(d.name, c.name, images(c)) for d in subdirs for c in sorted(p for p in d.iterdir() if p.is_dir())]
        groups = [g for g in groups if g[2]]
    total = sum(len(g[2]) for g in groups)
    if not groups or total == 0:
        raise ToolchainError(
            "no images found: expected ROOT/CLASS/*.png or ROOT/DOMAIN/CLASS/*.png",
            seen=str(base),
            remedy=f"image files end in {', '.join(IMAGE_SUFFIXES)}",
        )
    if total > MAX_IMAGES:
        raise ToolchainError(f"the image folder holds more than {MAX_IMAGES} images", seen=total, remedy="split it")
    return groups
