"""PNG/JPEG reading and anti-aliased resizing for ingestion.

Everything here works on numpy arrays and uses Pillow only (no OpenCV, no skimage), so the
ingestion workers stay light. Grayscale images come back as (H, W) arrays, colour as (H, W, 3);
integer dtypes are kept (uint8 for 8-bit files, uint16 for 16-bit files) together with the
number of significant bits, which the store records as ``bits_stored``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

# ITU-R BT.601 luma weights, the same ones Pillow's convert("L") uses.
LUMA = np.array([0.299, 0.587, 0.114])


class ImageError(ValueError):
    """An input image that cannot be used; the message is one line naming the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) integer RGB -> (H, W) luma with the same dtype (rounded, clipped)."""
    lum = rgb[..., :3].astype(np.float64) @ LUMA
    info = np.iinfo(rgb.dtype)
    return np.clip(np.rint(lum), info.min, info.max).astype(rgb.dtype)


def read_image(path: str | os.PathLike, *, color: str = "gray") -> tuple[np.ndarray, int]:
    """Reads a PNG/JPEG (anything Pillow opens) -> (array, bits_stored).

    color='gray' returns (H, W); color='rgb' returns (H, W, 3) for colour files and (H, W) for
    grayscale ones. 16-bit grayscale PNGs keep 16 bits (uint16); palette and alpha images are
    flattened to RGB first.
    """
    if color not in ("gray", "rgb"):
        raise ValueError(f"color must be 'gray' or 'rgb', got {color!r}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(im)
                if arr.dtype.kind == "i" or arr.dtype.itemsize > 2:
                    # Pillow opens some 16-bit PNGs as 32-bit 'I'; their values still fit in 16 bits.
                    if arr.min() < 0 or arr.max() > 65535:
                        raise ImageError(path, "32-bit integer image with values outside 0..65535")
                return arr.astype(np.uint16), 16
            if mode == "F":
                raise ImageError(path, "floating-point image (mode F) is not supported")
            if mode in ("1", "L"):
                return np.asarray(im.convert("L"), dtype=np.uint8), 8
            if mode == "LA":
                return np.asarray(im.convert("L"), dtype=np.uint8), 8
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise ImageError(path, f"unreadable image ({type(e).__name__}: {_first_line(e)})") from None
    if color == "gray":
        return to_gray(rgb), 8
    return rgb, 8


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def resize_longest(img: np.ndarray, size: int | None, *, max_value: int | None = None) -> np.ndarray:
    """Anti-aliased resize so that max(H, W) == size, aspect ratio kept; never upsamples.

    Works for (H, W) and (H, W, C) integer arrays of any dtype; the result has the input dtype.
    Pillow's filters widen their support on downscaling (true anti-aliasing), which a plain
    strided or nearest resize would not do. Lanczos may overshoot slightly at edges, so the
    result is clipped to [0, max_value] (default: the dtype's maximum).
    """
    if size is None or size <= 0:
        return img
    h, w = img.shape[:2]
    if max(h, w) <= size:
        return img
    scale = size / max(h, w)
    return resize_to(img, (max(1, round(h * scale)), max(1, round(w * scale))), max_value=max_value)


def resize_to(img: np.ndarray, shape: tuple[int, int], *, max_value: int | None = None) -> np.ndarray:
    """Anti-aliased (Lanczos) resize of an (H, W) or (H, W, C) integer array to shape (h, w)."""
    new_h, new_w = shape
    if img.shape[:2] == (new_h, new_w):
        return img
    if img.dtype == np.uint8 and (img.ndim == 2 or img.shape[2] == 3):
        mode = "L" if img.ndim == 2 else "RGB"
        out = Image.fromarray(img, mode=mode).resize((new_w, new_h), Image.Resampling.LANCZOS)
        out = np.asarray(out)
        return out if max_value is None else np.minimum(out, max_value).astype(np.uint8)
    # Higher bit depths go through 32-bit float mode 'F', one channel at a time.
    chans = [img] if img.ndim == 2 else [img[..., c] for c in range(img.shape[2])]
    outs = []
    for ch in chans:
        f = Image.fromarray(ch.astype(np.float32), mode="F")
        outs.append(np.asarray(f.resize((new_w, new_h), Image.Resampling.LANCZOS)))
    out = outs[0] if img.ndim == 2 else np.stack(outs, axis=-1)
    if img.dtype.kind in "ui":
        info = np.iinfo(img.dtype)
        hi = info.max if max_value is None else max_value
        out = np.clip(np.rint(out), max(info.min, 0) if img.dtype.kind == "u" else info.min, hi)
    return out.astype(img.dtype)
