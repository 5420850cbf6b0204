"""Decoding for a detector's input size (issue 21): ``decode_fitted`` and ``plan_decode`` in ``detect/io.py``.

References are independent of the code under test: block means computed with NumPy over the full-size decode,
sizes computed by hand, the peak memory measured by the kernel (``ru_maxrss`` of a fresh process).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.errors import ImageError
from detect.io import DEFAULT_MAX_PIXELS, decode_fitted, decode_image, plan_decode, reduction_factor
from detect.testing import zero_png

ROOT = Path(__file__).resolve().parents[1]


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def block_means(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor x factor`` block (the last row and column of blocks may be smaller), float64."""
    height, width = pixels.shape[:2]
    out = np.empty((-(-height // factor), -(-width // factor), pixels.shape[2]))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = pixels[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].astype(np.float64)
            out[i, j] = block.mean(axis=(0, 1))
    return out


def test_reduction_factor_by_hand() -> None:
    # 8000x5000 for (800, 1333): scale min(800/5000, 1333/8000) = 0.16 -> 1/0.16 = 6.25 -> 6
    assert reduction_factor(8000, 5000, (800, 1333)) == 6
    assert reduction_factor(1600, 1200, (800, 1333)) == 1  # 1.5x the input size: never reduced
    assert reduction_factor(2700, 1700, (800, 1333)) == 2  # 2.03x
    assert reduction_factor(8000, 5000, None) == 1


def test_no_fit_and_small_images_decode_exactly_as_before() -> None:
    data = encode(Image.fromarray(noise(150, 203)), "PNG")
    for fit in (None, (100, 120)):  # 150x203 is less than twice (100, 120)'s size
        fitted = decode_fitted(data, fit)
        assert fitted.factor == 1 and fitted.original_size == (150, 203)
        np.testing.assert_array_equal(fitted.pixels, decode_image(data))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
def test_a_reduced_png_is_the_block_mean_of_the_full_decode(mode: str) -> None:
    """Tolerance 1 level: Pillow's box reduction rounds its sums in fixed point, NumPy's mean is exact."""
    image = Image.fromarray(noise(150, 203))
    if mode == "RGBA":
        image.putalpha(255)  # opaque alpha: compositing is the identity, so block means still apply
    else:
        image = image.convert(mode)
    data = encode(image, "PNG")
    fitted = decode_fitted(data, (20, 40))  # scale min(20/150, 40/203) = 0.133 -> factor 7
    assert fitted.factor == 7 and fitted.original_size == (150, 203)
    assert fitted.pixels.shape == (22, 29, 3) and fitted.pixels.dtype == np.uint8  # ceil(150/7), ceil(203/7)
    reference = block_means(decode_image(data), 7)
    assert np.abs(fitted.pixels - reference).max() <= 1.0


def test_a_reduced_translucent_png_is_the_block_mean_of_the_composited_full_decode() -> None:
    """RGBA is reduced premultiplied, then composited: the same as compositing, then averaging, up to the
    roundings of premultiplying, un-premultiplying and compositing (2 levels)."""
    pixels = np.concatenate([noise(150, 203), noise(150, 203, seed=5)[:, :, :1]], axis=2)  # random alpha
    data = encode(Image.fromarray(pixels, "RGBA"), "PNG")
    plan = plan_decode(data, (20, 40))
    assert plan.peak_bytes < 150 * 203 * (4 + 4 + 8) + 1  # the pixels, one premultiplied copy, small ones
    fitted = decode_fitted(data, (20, 40))
    assert fitted.factor == 7
    assert np.abs(fitted.pixels - block_means(decode_image(data), 7)).max() <= 2.0


def test_a_large_jpeg_is_dct_scaled_never_decoded_at_full_size() -> None:
    pixels = np.kron(noise(96, 128, seed=1), np.ones((32, 32, 1), np.uint8))  # 3072x4096, flat 32 px blocks
    data = encode(Image.fromarray(pixels), "JPEG", quality=95)
    plan = plan_decode(data, (160, 400))  # 1/min(160/3072, 400/4096) = 19.2 -> factor 19: DCT 1/8, then 2
    assert (plan.draft, plan.reduce, plan.factor, plan.decoded_size) == (8, 2, 16, (512, 384))
    assert plan.peak_bytes < 4 * 1024 * 1024  # what the full decode would need: 4096*3072*4 = 48 MiB
    fitted = decode_fitted(data, (160, 400))
    assert fitted.factor == 16 and fitted.original_size == (3072, 4096) and fitted.pixels.shape == (192, 256, 3)
    # Each 16x16 block of the original is flat: DCT scaling and the box filter both give its colour back
    # (JPEG's quantisation and chroma subsampling blur block edges: mean error a few levels, not tens).
    reference = block_means(pixels, 16)
    assert np.abs(fitted.pixels - reference).mean() < 4.0


def test_exif_rotation_gives_the_upright_original_size() -> None:
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    Image.fromarray(noise(300, 800)).save(buffer, "JPEG", exif=exif)
    fitted = decode_fitted(buffer.getvalue(), (100, 250))  # stored 800x300: 1/min(100/300, 250/800) = 3.2 -> 3
    assert fitted.original_size == (800, 300)  # (H, W) upright
    assert fitted.pixels.shape == (400, 150, 3) and fitted.factor == 2  # DCT 1/2 (the largest of 8, 4, 2 <= 3)


def test_pillow_bomb_guard_message_quotes_our_limit() -> None:
    """Before the fix the 413 said Pillow's 89478485 pixels, a limit the service does not have."""
    header = zero_png(10_000, 10_000, rows=0)  # above Pillow's warning level
    with pytest.raises(ImageError) as caught:
        decode_image(header)
    assert caught.value.code == "image_too_large"
    assert str(DEFAULT_MAX_PIXELS) in caught.value.message and str(Image.MAX_IMAGE_PIXELS) not in caught.value.message


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from detect.io import decode_fitted, plan_decode
    from detect.testing import zero_png

    def high_water():  # VmHWM: this process's own peak (ru_maxrss would include the parent's, from before exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    data = zero_png(8000, 5000)  # 40 MP, all zero: a ~116 KB file
    fit = None if sys.argv[1] == "full" else (800, 1333)
    before = high_water()
    plan = plan_decode(data, fit)
    pixels = decode_fitted(data, fit).pixels
    peak = high_water() - before
    print(json.dumps({"file": len(data), "peak": peak, "estimate": plan.peak_bytes, "shape": list(pixels.shape)}))
    """
)


def measure_peak(how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, how], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_40mp_png_costs_one_decoded_copy_and_the_estimate_covers_it() -> None:
    fitted, full = measure_peak("fitted"), measure_peak("full")
    assert fitted["file"] < 200_000 and fitted["shape"] == [834, 1334, 3]  # factor 6: ceil(5000/6), ceil(8000/6)
    # Pillow holds RGB as 4 bytes a pixel: 160 MB is the least a 40 MP PNG can cost; then small copies only.
    assert fitted["peak"] <= fitted["estimate"] * 1.05 and fitted["peak"] < 200 * 1024 * 1024
    assert full["peak"] <= full["estimate"] * 1.05 and full["peak"] > fitted["peak"] + 80 * 1024 * 1024
