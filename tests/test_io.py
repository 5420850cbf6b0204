"""Tests for detect.io: every input is generated here, in memory or under tmp_path.

Expected pixels come from hand-computed values (EXIF tables, the 16-bit and alpha formulas written out) or from
Pillow's own conversion of the original, never from decode_image itself.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import ExifTags, Image

from detect.errors import ImageError
from detect.io import ImageInfo, decode_image, probe_image

ORIENTATION = ExifTags.Base.Orientation
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- helpers -------------------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(width: int, height: int, bit_depth: int = 8, color_type: int = 2, raw: bytes = b"") -> bytes:
    """A PNG written byte by byte: IHDR with a valid CRC, one IDAT holding ``raw`` (filter bytes included), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def exif_by_hand(*entries: tuple[int, int, int, bytes]) -> bytes:
    """An EXIF block (little-endian TIFF, one IFD) from ``(tag, type, count, 4-byte value)`` entries."""
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    return b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + ifd + b"\x00\x00\x00\x00"


def expect_error(source, code: str, status: int, **limits) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image(source, **limits)
    assert (caught.value.code, caught.value.http_status) == (code, status), caught.value
    return caught.value


def rgb_png(height: int, width: int) -> bytes:
    return encode(Image.new("RGB", (width, height), (10, 20, 30)), "PNG")


def solid(color: tuple[int, int, int], mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new(mode, size, color)


def assert_rgb_array(array: np.ndarray, height: int, width: int) -> None:
    assert array.dtype == np.uint8 and array.shape == (height, width, 3)
    assert array.flags.c_contiguous and array.flags.writeable


# --- input types ---------------------------------------------------------------------------------------------
def test_bytes_bytearray_memoryview_and_paths_give_the_same_array(tmp_path: Path) -> None:
    data = encode(Image.fromarray(np.arange(60, dtype=np.uint8).reshape(4, 5, 3)), "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    expected = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    for source in (data, bytearray(data), memoryview(data), str(path), path):
        array = decode_image(source)
        assert_rgb_array(array, 4, 5)
        np.testing.assert_array_equal(array, expected)


def test_file_name_is_ignored_content_decides(tmp_path: Path) -> None:
    png_named_jpg = tmp_path / "photo.jpg"
    png_named_jpg.write_bytes(rgb_png(3, 2))
    assert decode_image(png_named_jpg).shape == (3, 2, 3)
    text_named_jpg = tmp_path / "notes.jpg"
    text_named_jpg.write_text("just some text, not a JPEG\n")
    expect_error(text_named_jpg, "unsupported_format", 415)


def test_result_is_a_new_writable_array() -> None:
    data = rgb_png(2, 2)
    first, second = decode_image(data), decode_image(data)
    first[...] = 0
    assert not np.shares_memory(first, second) and second[0, 0, 0] == 10


def test_other_source_types_are_a_caller_bug() -> None:
    with pytest.raises(TypeError):
        decode_image(np.zeros((2, 2, 3), np.uint8))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decode_image(42)  # type: ignore[arg-type]


# --- refused inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b"")])
def test_empty_input(empty) -> None:
    expect_error(empty, "empty_input", 422)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    expect_error(path, "empty_input", 422)


def test_unreadable_paths(tmp_path: Path) -> None:
    expect_error(tmp_path / "missing.png", "unreadable_file", 422)
    expect_error(str(tmp_path), "unreadable_file", 422)  # a directory
    expect_error("bad\x00path.png", "unreadable_file", 422)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    expect_error(fifo, "unreadable_file", 422)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "PostScript"),
        (b"\xc5\xd0\xd3\xc6" + bytes(28), "EPS"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF"),
        (b"hello, world\n", None),
        (b"BMW 320d, 2011, blue" + bytes(20), None),  # "BM" without a DIB header is not a BMP
    ],
)
def test_non_images_are_unsupported(content: bytes, named: str | None) -> None:
    error = expect_error(content, "unsupported_format", 415)
    if named:
        assert named in error.message


def test_random_bytes_are_unsupported(rng: np.random.Generator) -> None:
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    expect_error(noise, "unsupported_format", 415)


def _sample_jpeg() -> bytes:
    gradient = np.linspace(0, 255, 64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3)
    return encode(Image.fromarray(gradient), "JPEG", quality=90)


@pytest.mark.parametrize("keep", [0.5, -2, 300], ids=["half", "no-EOI", "headers-only"])
def test_truncated_jpeg_raises(keep: float) -> None:
    data = _sample_jpeg()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    error = expect_error(data[:cut], "corrupt_image", 422)
    assert "JPEG" in error.message


@pytest.mark.parametrize("keep", [0.5, 40, 20], ids=["half", "mid-IHDR", "in-IHDR"])
def test_truncated_png_raises(keep: float) -> None:
    data = encode(Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint32).astype(np.uint8).reshape(64, 64, 3)), "PNG")
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    expect_error(data[:cut], "corrupt_image", 422)


def test_png_with_bad_chunk_crc_raises() -> None:
    data = bytearray(rgb_png(4, 4))
    data[29] ^= 0xFF  # the IHDR CRC: 8 signature + 4 length + 4 type + 13 data
    error = expect_error(bytes(data), "corrupt_image", 422)
    assert error.message == "invalid PNG header"  # short, and without Pillow's "<_io.BytesIO object at ...>"


def test_png_with_corrupt_pixel_stream_raises() -> None:
    data = bytearray(encode(Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # inside the zlib stream
    expect_error(bytes(data), "corrupt_image", 422)


# --- size limits ---------------------------------------------------------------------------------------------
def test_bomb_header_is_refused_before_decoding() -> None:
    bomb = png_by_hand(100_000, 100_000)  # 10^10 pixels claimed by a file of a few dozen bytes
    assert len(bomb) < 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expect_error(bomb, "image_too_large", 413)
        with pytest.raises(ImageError) as probed:
            probe_image(bomb)
    assert probed.value.code == "image_too_large"
    assert not caught


def test_own_pixel_limit_is_checked_before_decoding() -> None:
    header_only = png_by_hand(40, 30)  # no pixel data: decoding it would fail as corrupt
    error = expect_error(header_only, "image_too_large", 413, max_pixels=1199)
    assert (error.details["width"], error.details["height"]) == (40, 30)
    expect_error(header_only, "corrupt_image", 422, max_pixels=1200)


def test_pillow_bomb_warning_becomes_413_and_leaves_global_state_alone() -> None:
    header = png_by_hand(10_000, 10_000)  # 10^8: above Pillow's warning level, below its error level
    pillow_limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expect_error(header, "image_too_large", 413, max_pixels=10**9, max_side=10**6)
    assert not caught
    assert Image.MAX_IMAGE_PIXELS == pillow_limit and warnings.filters == filters


def test_concurrent_decoding_restores_the_warning_filters() -> None:
    header, filters, codes = png_by_hand(10_000, 10_000), list(warnings.filters), []

    def worker() -> None:
        for _ in range(10):
            try:
                decode_image(header, max_pixels=10**9, max_side=10**6)
            except ImageError as error:
                codes.append(error.code)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == ["image_too_large"] * 40 and warnings.filters == filters


def test_max_pixels_boundary() -> None:
    data = rgb_png(10, 10)
    assert decode_image(data, max_pixels=100).shape == (10, 10, 3)
    expect_error(data, "image_too_large", 413, max_pixels=99)


def test_max_side_boundary() -> None:
    data = rgb_png(1, 30)
    assert decode_image(data, max_side=30).shape == (1, 30, 3)
    expect_error(data, "bad_dimensions", 422, max_side=29)
    expect_error(png_by_hand(20_001, 300), "bad_dimensions", 422)  # header only: refused before decoding


@pytest.mark.parametrize(("height", "width"), [(1, 101), (101, 1)])
def test_aspect_ratio_limit(height: int, width: int) -> None:
    expect_error(rgb_png(height, width), "bad_dimensions", 422)
    assert decode_image(rgb_png(height, width), max_aspect=101).shape == (height, width, 3)
    at_limit = (min(height, 100), min(width, 100))  # 100:1 is still accepted
    assert decode_image(rgb_png(*at_limit)).shape[:2] == at_limit


@pytest.mark.parametrize(("width", "height"), [(0, 5), (5, 0)])
def test_zero_side_is_refused(width: int, height: int) -> None:
    """Pillow itself refuses a zero-sized PNG header (before our own check can see it): a 422 either way."""
    expect_error(png_by_hand(width, height), "corrupt_image", 422)


def test_probe_reports_the_header() -> None:
    frames = [solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert probe_image(gif) == ImageInfo(format="GIF", width=8, height=8, mode="P", frames=3)
    sixteen = encode(Image.fromarray(np.zeros((3, 7), np.uint16)), "PNG")
    assert probe_image(sixteen) == ImageInfo(format="PNG", width=7, height=3, mode="I;16", frames=1)
    with pytest.raises(ImageError) as caught:
        probe_image(b"%PDF-1.4")
    assert caught.value.http_status == 415


# --- pixel modes ---------------------------------------------------------------------------------------------
def test_sixteen_bit_grey_png_is_rescaled_not_clipped() -> None:
    values = np.array([[0, 128, 129, 25828, 25829, 32896, 65534, 65535]], np.uint16)
    # round(v / 257) by hand: 128/257 = 0.498, 129/257 = 0.502, 25828/257 = 100.498, 25829/257 = 100.502
    expected = np.array([[0, 0, 1, 100, 101, 128, 255, 255]], np.uint8)
    raw = b"\x00" + values.astype(">u2").tobytes()  # filter byte, then big-endian samples
    for data in (png_by_hand(8, 1, bit_depth=16, color_type=0, raw=raw), encode(Image.fromarray(values), "TIFF")):
        array = decode_image(data)
        np.testing.assert_array_equal(array, np.repeat(expected[..., None], 3, axis=2))


def test_sixteen_bit_colour_png_keeps_the_full_range() -> None:
    samples = np.array([[[65535, 0, 32896], [25828, 25829, 300]]], np.uint16)  # (1, 2, 3)
    data = png_by_hand(2, 1, bit_depth=16, color_type=2, raw=b"\x00" + samples.astype(">u2").tobytes())
    array = decode_image(data).astype(int)
    proper = np.rint(samples / 257.0)
    assert np.abs(array - proper).max() <= 1  # Pillow keeps the high byte: v >> 8
    assert array[0, 0, 0] == 255 and array[0, 0, 2] == 128  # not clipped at 255 from 256 up


def test_int32_and_float_grey_are_stretched_over_their_range() -> None:
    ints = np.array([[-100, 0, 100, 155]], np.int32)  # range 255: v + 100
    floats = np.array([[0.0, 0.2, 0.6, 1.0, np.nan]], np.float32)  # 0, 51, 153, 255; NaN -> 0
    flat = np.full((1, 3), 7.5, np.float32)
    for values, expected in ((ints, [0, 100, 200, 255]), (floats, [0, 51, 153, 255, 0]), (flat, [0, 0, 0])):
        image = Image.fromarray(values)
        assert image.mode in ("I", "F")
        array = decode_image(encode(image, "TIFF"))
        np.testing.assert_array_equal(array, np.repeat(np.array([expected], np.uint8)[..., None], 3, axis=2))


def test_grey_and_one_bit() -> None:
    grey = np.array([[0, 17, 200], [255, 3, 99]], np.uint8)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(grey), "PNG")), np.stack([grey] * 3, -1))
    bits = np.array([[True, False, True], [False, False, True]])
    array = decode_image(encode(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(array, np.stack([bits * 255] * 3, -1).astype(np.uint8))


def _palette_image(transparency: int | bytes | None) -> bytes:
    image = Image.new("P", (3, 1))
    image.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200])
    image.putdata([0, 1, 2])
    return encode(image, "PNG") if transparency is None else encode(image, "PNG", transparency=transparency)


def test_palette_without_transparency() -> None:
    expected = [[[200, 10, 10], [10, 200, 10], [10, 10, 200]]]
    np.testing.assert_array_equal(decode_image(_palette_image(None)), np.array(expected, np.uint8))


def test_palette_with_transparent_index_and_with_alpha_palette() -> None:
    background = (40, 80, 120)
    keyed = decode_image(_palette_image(1), background=background)
    np.testing.assert_array_equal(keyed[0, 1], background)
    np.testing.assert_array_equal(keyed[0, 0], [200, 10, 10])
    alpha = decode_image(_palette_image(bytes([64, 255, 0])), background=background)
    # index 0, alpha 64, by hand: (200*64 + 40*191)/255 = 80.16, (10*64 + 80*191)/255 = 62.43, (640 + 120*191)/255 = 92.39
    np.testing.assert_array_equal(alpha[0], [[80, 62, 92], [10, 200, 10], list(background)])


def test_rgba_and_la_are_composited_on_the_background() -> None:
    rgba = np.array([[[200, 100, 50, 77], [0, 255, 255, 0], [9, 8, 7, 255], [255, 255, 255, 128]]], np.uint8)
    background = (10, 250, 128)
    array = decode_image(encode(Image.fromarray(rgba), "PNG"), background=background)
    alpha = rgba[..., 3:].astype(float)
    expected = np.rint((rgba[..., :3] * alpha + np.array(background) * (255 - alpha)) / 255)
    np.testing.assert_array_equal(array, expected.astype(np.uint8))
    assert array[0, 0].tolist() == [67, 205, 104]  # written out: (200*77 + 10*178)/255 = 67.37, ...
    grey_alpha = Image.fromarray(np.array([[[100, 51], [0, 255]]], np.uint8), "LA")
    array = decode_image(encode(grey_alpha, "PNG"), background=(255, 0, 0))
    # 100*51/255 + bg*204/255: 20 + 204 = 224 (red), 20 + 0 = 20 (green, blue)
    np.testing.assert_array_equal(array, np.array([[[224, 20, 20], [0, 0, 0]]], np.uint8))


def test_colour_key_transparency() -> None:
    pixels = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    array = decode_image(encode(Image.fromarray(pixels), "PNG", transparency=(1, 2, 3)), background=(9, 9, 9))
    np.testing.assert_array_equal(array, np.array([[[9, 9, 9], [4, 5, 6]]], np.uint8))


def _set_tiff_short_tag(data: bytes, tag: int, value: int) -> bytes:
    """Rewrite a SHORT tag's inline value in a little-endian TIFF's first IFD."""
    offset = struct.unpack_from("<I", data, 4)[0]
    patched = bytearray(data)
    for index in range(struct.unpack_from("<H", data, offset)[0]):
        entry = offset + 2 + 12 * index
        if struct.unpack_from("<H", data, entry)[0] == tag:
            struct.pack_into("<H", patched, entry + 8, value)
            return bytes(patched)
    raise AssertionError(f"tag {tag} not found")


@pytest.mark.parametrize(("mode", "opened_as"), [("LA", "La"), ("RGBA", "RGBA")])
def test_premultiplied_alpha_tiff(mode: str, opened_as: str) -> None:
    """ExtraSamples = 1 marks associated (premultiplied) alpha: Pillow opens grey as La, colour as RGBA."""
    stored, alpha = 60, 128  # a premultiplied sample never exceeds its alpha
    pixel = (stored, alpha) if mode == "LA" else (stored, stored, stored, alpha)
    data = _set_tiff_short_tag(encode(Image.new(mode, (2, 1), pixel), "TIFF"), 338, 1)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == opened_as
    background = np.array([255, 0, 100])
    array = decode_image(data, background=tuple(background))
    expected = stored + background * (255 - alpha) / 255  # 187, 60, 109.8
    assert np.abs(array.astype(float) - expected).max() <= 1


def test_cmyk_jpeg_matches_pillows_conversion() -> None:
    y, x = np.mgrid[0:48, 0:48]
    cmyk = np.stack([x * 5, y * 5, np.full_like(x, 90), (x + y) * 2], -1).astype(np.uint8)
    original = Image.frombytes("CMYK", (48, 48), cmyk.tobytes())
    data = encode(original, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "CMYK" and opened.info.get("adobe")  # Adobe marker: stored inverted
    difference = np.abs(decode_image(data).astype(int) - np.asarray(original.convert("RGB"), int))
    assert difference.mean() < 1.5 and difference.max() <= 12


@pytest.mark.parametrize("mode", ["LAB", "YCbCr"])
def test_other_colour_spaces_match_pillows_conversion(mode: str, rng: np.random.Generator) -> None:
    original = Image.frombytes(mode, (5, 4), rng.integers(0, 256, 60, dtype=np.uint8).tobytes())
    data = encode(original, "TIFF")
    np.testing.assert_array_equal(decode_image(data), np.asarray(original.convert("RGB")))


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("TIFF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", None)],
)
def test_first_frame_of_multi_frame_images(fmt: str, params: dict | None) -> None:
    red, green = solid((255, 0, 0)), solid((0, 255, 0))
    data = encode(red, fmt) if params is None else encode(red, fmt, save_all=True, append_images=[green], **params)
    if params is not None:
        assert probe_image(data).frames == 2
    np.testing.assert_array_equal(decode_image(data), np.asarray(red))


# --- EXIF orientation ----------------------------------------------------------------------------------------
COLOURS = {
    "A": (255, 0, 0),
    "B": (0, 255, 0),
    "C": (0, 0, 255),
    "D": (255, 255, 0),
    "E": (0, 255, 255),
    "F": (255, 0, 255),
}
STORED = ["ABC", "DEF"]
UPRIGHT = {  # how a viewer shows STORED for each EXIF orientation value, written out from the EXIF 2.3 table
    1: ["ABC", "DEF"],
    2: ["CBA", "FED"],  # mirrored left-right
    3: ["FED", "CBA"],  # rotated 180
    4: ["DEF", "ABC"],  # mirrored top-bottom
    5: ["AD", "BE", "CF"],  # transposed (mirrored along the main diagonal)
    6: ["DA", "EB", "FC"],  # rotated 90 clockwise
    7: ["FC", "EB", "DA"],  # transversed (mirrored along the anti-diagonal)
    8: ["CF", "BE", "AD"],  # rotated 90 counter-clockwise
}
BLOCK = 16


def block_image(rows: list[str]) -> np.ndarray:
    grid = np.array([[COLOURS[letter] for letter in row] for row in rows], np.uint8)
    return np.repeat(np.repeat(grid, BLOCK, axis=0), BLOCK, axis=1)


def exif_with_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = value
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [("PNG", {}, 0), ("WEBP", {"lossless": True}, 0), ("TIFF", {}, 0), ("JPEG", {"quality": 95, "subsampling": 0}, 8)],
)
def test_exif_orientation(orientation: int, fmt: str, params: dict, tolerance: int) -> None:
    image = Image.fromarray(block_image(STORED))
    data = encode(image, fmt, exif=exif_with_orientation(orientation), **params)
    array = decode_image(data)
    expected = block_image(UPRIGHT[orientation])
    assert array.shape == expected.shape
    centres = array[BLOCK // 2 :: BLOCK, BLOCK // 2 :: BLOCK].astype(int)
    assert np.abs(centres - expected[BLOCK // 2 :: BLOCK, BLOCK // 2 :: BLOCK]).max() <= tolerance


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF blocks below
@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + bytes(range(7, 57)),  # not a TIFF structure
        b"Exif\x00\x00II*\x00",  # cut after the TIFF header
        b"Exif\x00\x00II*\x00\xff\xff\xff\x00",  # IFD offset beyond the block
        exif_by_hand((ORIENTATION, 2, 4, b"six\x00")),  # ASCII instead of SHORT
        exif_by_hand((ORIENTATION, 3, 1, struct.pack("<HH", 9, 0))),  # out of range
        exif_by_hand((ORIENTATION, 3, 1, struct.pack("<HH", 0, 0))),
        exif_by_hand((ORIENTATION, 3, 1000, struct.pack("<I", 0xFFFF))),  # data beyond the block
    ],
)
def test_broken_exif_means_no_rotation(exif: bytes) -> None:
    image = Image.fromarray(block_image(STORED))
    np.testing.assert_array_equal(decode_image(encode(image, "PNG", exif=exif)), block_image(STORED))


def test_orientation_is_applied_when_other_exif_tags_are_odd() -> None:
    """Tags Pillow can read but not write back (a FLOAT ImageWidth) make ImageOps.exif_transpose raise."""
    exif = exif_by_hand((ORIENTATION, 3, 1, struct.pack("<HH", 6, 0)), (0x0100, 11, 1, struct.pack("<f", 1.5)))
    array = decode_image(encode(Image.fromarray(block_image(STORED)), "PNG", exif=exif))
    np.testing.assert_array_equal(array, block_image(UPRIGHT[6]))


# --- robustness ----------------------------------------------------------------------------------------------
def _small_images() -> dict[str, bytes]:
    pixels = Image.fromarray(np.arange(8 * 8 * 4, dtype=np.uint8).reshape(8, 8, 4))
    rgb = pixels.convert("RGB")
    return {
        "JPEG": encode(rgb, "JPEG"),
        "PNG": encode(pixels, "PNG"),
        "GIF": encode(rgb, "GIF"),
        "BMP": encode(rgb, "BMP"),
        "WEBP": encode(pixels, "WEBP"),
        "TIFF": encode(pixels, "TIFF", compression="tiff_lzw"),
    }


SMALL_IMAGES = _small_images()


def check_decodes_or_refuses(data: bytes) -> None:
    try:
        array = decode_image(data, max_pixels=4096)
    except ImageError as error:
        assert error.http_status in (413, 415, 422) and error.message
    else:
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


EDITS = st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about some of the damage
@given(fmt=st.sampled_from(sorted(SMALL_IMAGES)), edits=EDITS, cut=st.integers(0, 64))
def test_mutated_images_decode_or_raise_image_errors(fmt: str, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SMALL_IMAGES[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    check_decodes_or_refuses(bytes(data[: len(data) - cut]))


@pytest.mark.filterwarnings("ignore::UserWarning")
@given(prefix=st.sampled_from([data[:16] for data in SMALL_IMAGES.values()]), tail=st.binary(max_size=256))
def test_a_valid_signature_with_garbage_raises_image_errors(prefix: bytes, tail: bytes) -> None:
    check_decodes_or_refuses(prefix + tail)
