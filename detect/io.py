"""Image decoding with defences: bytes or a path in, an upright RGB ``uint8`` array out.

The API and the CLI both call :func:`decode_image` (and the API :func:`probe_image` first), so they refuse the
same inputs with the same :mod:`detect.errors` codes. Decisions:

* **Format from content, never the name.** The first bytes are matched against the signatures of JPEG, PNG
  (APNG included), GIF, BMP, WebP and TIFF, and Pillow is asked to try that one plugin only
  (``Image.open(formats=[...])``). No other decoder, EPS's Ghostscript call in particular, ever sees user bytes.
  Only these six plugins are imported here.
* **Limits from the header, before any pixel is decoded.** ``Image.open`` parses the header only; the size is
  checked before ``load()``. Pillow's own decompression-bomb guard fires inside ``Image.open``; its error and
  its warning (turned into an error for that call only) both become :class:`ImageTooLargeError`. Pillow's
  global ``Image.MAX_IMAGE_PIXELS`` is read, never written: it stays a ceiling above ``max_pixels``.
* **Truncated data is an error.** ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at Pillow's default (False), so a
  short JPEG or PNG raises instead of being padded with grey. A process that sets it globally opts out.
* **Everything Pillow raises while parsing user bytes** becomes an :class:`ImageDecodeError` with a one-line
  message; the ``try`` blocks wrap only those Pillow calls, so a bug of ours still surfaces as itself.
  ``MemoryError`` is not the input's fault and is not translated.
* **Pixels.** The first frame only (GIF, TIFF, APNG, WebP). Alpha (RGBA, LA, PA, palette or colour-key
  transparency) is composited over ``background``. 16-bit grey maps ``v -> round(v / 257)``, the exact rescaling
  of 0..65535 onto 0..255. 32-bit integer and float grey have no nominal white level, so their finite range is
  stretched onto 0..255. 16-bit colour PNGs are reduced by Pillow itself to the high byte (``v >> 8``, within
  one level of ``round(v / 257)``). CMYK (Adobe-inverted included), YCbCr, LAB and palettes use Pillow's
  conversions; no ICC colour management is applied.
* **Decoding for a detector** (:func:`decode_fitted`, :func:`plan_decode`): an image at least twice a detector's
  input size is reduced while decoding (JPEG by DCT scaling, others by an integer box filter before any other
  full-size copy), and the peak memory is estimated from the header first, so a service can budget it. Smaller
  images, and :func:`decode_image`, decode at full size exactly as before.
* **EXIF orientation** (tag 274, values 1-8) is read from the opened file and applied with the same
  transposes as ``ImageOps.exif_transpose``. That function is not used because it also re-serialises the EXIF
  block, after transposing in place, and raises on tags Pillow cannot write back; a missing, malformed or
  out-of-range tag means no rotation.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import (  # noqa: F401  (importing a plugin registers its decoder; these are the only ones we use)
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from detect.errors import (
    EmptyImageError,
    ImageDecodeError,
    ImageDimensionsError,
    ImageTooLargeError,
    UnreadableFileError,
    UnsupportedFormatError,
)

ImageSource = bytes | bytearray | memoryview | str | os.PathLike

DEFAULT_MAX_PIXELS = 40_000_000
"""A little above the largest common phone photo (48 MP sensors save 12 MP by default); 120 MB as RGB."""
DEFAULT_MAX_SIDE = 20_000
DEFAULT_MAX_ASPECT = 100.0
"""Phone panoramas stay under about 20:1. Beyond 100:1 the short side, once the detector has scaled the long
side to ~1333 px, is under 14 px: less than one stride-32 feature cell, so nothing could be detected."""

_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("JPEG", (b"\xff\xd8\xff",)),
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),  # classic and BigTIFF, both byte orders
)
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})  # the DIB header versions Pillow reads
_REFUSED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (  # (offset, magic, name): for the message only
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"<?xml", "XML/SVG"),
    (0, b"<svg", "SVG"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (4, b"ftyp", "HEIF/AVIF/MP4"),
)
_SNIFF_BYTES = 32
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the stored pixels upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_BAND_BYTES = 1 << 20  # Pillow -> NumPy copy granularity (Pillow stores RGB as 4 bytes a pixel)

# ``warnings.catch_warnings`` swaps the process-wide filter list, so concurrent uses (API worker threads) could
# restore each other's state and leak our filter; the lock serialises our own uses. It covers only
# ``Image.open``, which parses headers and decodes no pixels.
_BOMB_WARNING_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before decoding. ``width``/``height`` are as stored (before EXIF rotation)."""

    format: str  # Pillow's name: JPEG (MPO for multi-picture JPEG), PNG, GIF, BMP, WEBP, TIFF
    width: int
    height: int
    mode: str  # Pillow's pixel mode of the first frame, e.g. RGB, L, P, I;16, CMYK
    frames: int


def probe_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> ImageInfo:
    """Identify an image and check its size limits from the header alone (cheap: no pixel is decoded).

    Raises the same errors as :func:`decode_image` for everything the header reveals, so the API can answer
    413/415/422 before spending time on decoding. Counting GIF frames walks the file's blocks without decoding.
    """
    with _open_checked(source, max_pixels, max_side, max_aspect) as (image, fmt):
        with _pillow_errors(fmt):
            frames = getattr(image, "n_frames", 1)
        return ImageInfo(image.format or fmt, image.width, image.height, image.mode, frames)


def upright_size(source: ImageSource) -> tuple[int, int]:
    """``(width, height)`` of an image once EXIF-upright (what :func:`decode_image` returns), from its header alone;
    the errors of :func:`probe_image`."""
    with _open_checked(source, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, DEFAULT_MAX_ASPECT) as (image, fmt):
        with _pillow_errors(fmt):
            orientation = _exif_orientation(image)
        return (image.height, image.width) if orientation in (5, 6, 7, 8) else (image.width, image.height)


def decode_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Decode image bytes (``bytes``/``bytearray``/``memoryview``) or a file path into RGB ``uint8`` ``(H, W, 3)``.

    The array is new, writable and C-contiguous, in EXIF-upright orientation (so ``H, W`` may be the stored
    size swapped). Any problem with the input raises an :class:`~detect.errors.ImageError` subclass:
    :class:`EmptyImageError`, :class:`UnreadableFileError` (path), :class:`UnsupportedFormatError` (415),
    :class:`ImageTooLargeError` (413, more than ``max_pixels``), :class:`ImageDimensionsError` (a side of 0 or
    above ``max_side``, or long/short side above ``max_aspect``), :class:`ImageDecodeError` (corrupt or
    truncated). A ``source`` of another type is a caller bug and raises ``TypeError``.
    """
    limits = (max_pixels, max_side, max_aspect)
    return decode_fitted(source, None, *limits, background=background).pixels


Fit = tuple[int, int]
"""``(short side, long side)``: the size a detector scales every image to fit (e.g. Faster R-CNN's ``(800, 1333)``)."""


@dataclass(frozen=True)
class DecodePlan:
    """How :func:`decode_fitted` decodes an image and what that costs, known from the header alone.

    ``draft`` is the JPEG DCT scaling (libjpeg decodes 1/1, 1/2, 1/4 or 1/8 of each side directly, never the full
    size); ``reduce`` the integer box-filter reduction applied right after decoding, before any other full-size
    copy. ``peak_bytes`` is an upper estimate of the memory decoding holds at its peak (Pillow's pixels at the
    decoded size, the conversions made at that size, the reduced copies), ``output_bytes`` the RGB array's.
    """

    info: ImageInfo
    draft: int
    reduce: int
    decoded_size: tuple[int, int]  # (width, height) Pillow decodes, stored orientation
    peak_bytes: int

    @property
    def factor(self) -> int:
        """A pixel of the output covers ``factor x factor`` pixels of the original."""
        return self.draft * self.reduce

    @property
    def output_bytes(self) -> int:
        width, height = self.decoded_size
        return -(-width // self.reduce) * -(-height // self.reduce) * 3


@dataclass(frozen=True)
class FittedImage:
    """An image decoded by :func:`decode_fitted`: upright RGB ``pixels`` reduced ``factor`` times (sides rounded
    up: output pixel ``i`` covers original pixels ``factor*i`` to ``factor*(i+1)``), and the original upright size.
    A box in ``pixels``' coordinates times ``factor``, clipped to ``original_size``, is in the original's."""

    pixels: np.ndarray  # (h, w, 3) uint8
    factor: int
    original_size: tuple[int, int]  # (H, W), EXIF-upright


def reduction_factor(width: int, height: int, fit: Fit | None) -> int:
    """The largest integer ``f`` such that the image reduced ``f`` times still covers the size a detector with
    input size ``fit`` scales it to (so the detector still scales down, never up); 1 when ``fit`` is ``None`` or
    the image is less than twice that size, so such images decode exactly as before."""
    if fit is None:
        return 1
    short_side, long_side = fit
    scale = min(short_side / min(width, height), long_side / max(width, height))
    return max(1, int(1.0 / scale)) if scale < 0.5 else 1


def plan_decode(
    source: ImageSource,
    fit: Fit | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> DecodePlan:
    """The :class:`DecodePlan` of ``source`` for ``fit`` from its header (no pixel decoded), after the same
    checks as :func:`probe_image`: a service counts ``peak_bytes`` against its memory budget before decoding."""
    with _open_checked(source, max_pixels, max_side, max_aspect) as (image, fmt):
        return _prepare(image, fmt, fit)


def decode_fitted(
    source: ImageSource,
    fit: Fit | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
) -> FittedImage:
    """Decode like :func:`decode_image`, but an image at least twice as large as a detector of input size
    ``fit`` needs is reduced while decoding (:func:`reduction_factor`): JPEG by libjpeg's DCT scaling
    (``Image.draft``: the full size is never decoded), other formats by an integer box filter right after
    decoding, the full-size pixels freed before the RGB array is made. So a 40 MP PNG costs Pillow's decoded
    pixels once (4 bytes a pixel for RGB) plus small copies, never float or RGB copies at full size.
    ``fit=None`` decodes at full size, exactly as :func:`decode_image`."""
    with _open_checked(source, max_pixels, max_side, max_aspect) as (image, fmt):
        plan = _prepare(image, fmt, fit)
        with _pillow_errors(fmt, max_pixels):
            image.load()  # the first frame only
        orientation = _exif_orientation(image)
        pixels: Image.Image = image
        if plan.reduce > 1:
            if not _reducible(pixels):
                pixels = _to_8bit(pixels, background)  # palettes, alpha, CMYK: converted at the decoded size
            pixels = pixels.reduce(plan.reduce)
            image.close()  # frees the full-size pixels now, not when the stream closes
        pixels = _to_8bit(pixels, background)
        if orientation in _TRANSPOSE:
            pixels = pixels.transpose(_TRANSPOSE[orientation])
        array = _to_array(pixels if pixels.mode == "RGB" else pixels.convert("RGB"))
    width, height = plan.info.width, plan.info.height
    upright = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    return FittedImage(array, plan.factor, upright)


@contextmanager
def _open_checked(
    source: ImageSource, max_pixels: int, max_side: int, max_aspect: float
) -> Iterator[tuple[ImageFile.ImageFile, str]]:
    """Open ``source`` with the one Pillow plugin its signature names, after checking the header's size."""
    with _byte_stream(source) as stream:
        fmt = _identify(stream)
        with _pillow_errors(fmt, max_pixels), _BOMB_WARNING_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=[fmt])
        with image:
            _check_size(image.width, image.height, max_pixels, max_side, max_aspect)
            yield image, fmt


_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # Pillow's; others 4


def _prepare(image: ImageFile.ImageFile, fmt: str, fit: Fit | None) -> DecodePlan:
    """Choose the reduction for ``fit``, apply a JPEG's DCT scaling to the opened (not yet decoded) image, and
    estimate the peak memory of decoding it. Deterministic: :func:`plan_decode` and :func:`decode_fitted` agree."""
    info = ImageInfo(image.format or fmt, image.width, image.height, image.mode, 1)  # frames: not counted here
    factor = reduction_factor(image.width, image.height, fit)
    draft = 1
    if factor > 1 and isinstance(image, JpegImagePlugin.JpegImageFile):
        wanted = next(d for d in (8, 4, 2) if d <= factor)
        with _pillow_errors(fmt):
            scaled = image.draft(None, (image.width // wanted, image.height // wanted))
        if scaled is not None:
            draft = round(info.width / scaled[1][2])
    reduce = max(1, factor // draft)
    width, height = image.size
    decoded = width * height
    stored = decoded * _STORED_BYTES.get(image.mode, 4)
    if reduce > 1 and _reducible(image):
        converted = decoded * 4 if image.mode in ("RGBA", "LA") else 0  # Pillow reduces alpha premultiplied (a copy)
    elif image.mode in ("I", "F"):
        converted = decoded * 26  # float64 copies and masks of the range stretch (:func:`_stretch_to_eight`)
    elif image.mode in _SIXTEEN_BIT_MODES:
        converted = decoded * 8  # the array, its uint32 widening, the uint8 result
    elif image.mode in ("L", "RGB") and not image.has_transparency_data:
        converted = 0 if reduce > 1 else decoded * (4 if image.mode == "L" else 0)
    else:
        converted = decoded * 8  # RGBA conversion and the RGB canvas of alpha compositing, or a palette's RGB
    output = -(-width // reduce) * -(-height // reduce)
    copies = 8 if reduce > 1 else 3  # the reduced image, its RGB conversion and the array; else the array only
    return DecodePlan(info, draft, reduce, (width, height), stored + converted + output * copies)


def _reducible(image: Image.Image) -> bool:
    """Whether ``image`` can be box-reduced before its conversion to 8-bit RGB: grey and RGB without a colour key;
    RGBA and LA, which Pillow reduces premultiplied, so compositing the reduced image over the background is the
    block mean of the composited pixels (compositing is linear in premultiplied colour and alpha); and 32-bit
    integer and float grey, whose range stretch then runs on the reduced pixels."""
    if image.mode in ("I", "F", "RGBA", "LA"):
        return True
    return image.mode in ("L", "RGB") and not image.has_transparency_data


@contextmanager
def _byte_stream(source: ImageSource) -> Iterator[BinaryIO]:
    """A seekable binary stream over in-memory bytes, or over a regular file opened for reading."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source)  # shares a ``bytes`` object's buffer; copies the (compressed) others
        return
    path = os.fspath(source)  # TypeError for anything else: a caller bug, not bad input
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise UnreadableFileError(f"not a regular file: {path!r}", path=path)
        stream = open(path, "rb")  # noqa: SIM115  (closed by the ``with`` below)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise UnreadableFileError(f"cannot read {path!r}: {_reason(exc)}", path=path) from exc
    with stream:
        yield stream


def _identify(stream: BinaryIO) -> str:
    """The Pillow format name the stream's first bytes announce; the stream is left at its start."""
    head = stream.read(_SNIFF_BYTES)
    stream.seek(0)
    if not head:
        raise EmptyImageError("the image is empty (0 bytes)")
    fmt = _sniff(head)
    if fmt is None:
        known = next((name for at, magic, name in _REFUSED_SIGNATURES if head.startswith(magic, at)), None)
        what = f"{known} is not a supported image format" if known else "not a recognised image"
        raise UnsupportedFormatError(f"{what}; send JPEG, PNG, GIF, BMP, WebP or TIFF", detected=known)
    return fmt


def _sniff(head: bytes) -> str | None:
    for fmt, magics in _SIGNATURES:
        if head.startswith(magics):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    return None


@contextmanager
def _pillow_errors(fmt: str, max_pixels: int | None = None) -> Iterator[None]:
    """Translate what Pillow raises while parsing user bytes into :class:`~detect.errors.ImageError`. Pillow's
    decompression-bomb guard fires above its own ceiling, which is above ``max_pixels``: the message quotes the
    limit that applies (ours), never Pillow's."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        limit = _pixel_limit(max_pixels if max_pixels is not None else DEFAULT_MAX_PIXELS)
        raise ImageTooLargeError(
            f"the {fmt} header declares more than {limit} pixels, above the limit of {limit}", format=fmt, limit=limit
        ) from exc
    except MemoryError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(f"invalid {fmt} header", format=fmt) from exc
    except Exception as exc:  # any failure inside Pillow's parsers is the input's fault
        raise ImageDecodeError(f"corrupt or truncated {fmt} data: {_reason(exc)}", format=fmt) from exc


def _reason(exc: BaseException) -> str:
    """A short, single-line reason for an error message."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:120]


def _pixel_limit(max_pixels: int) -> int:
    """The pixel limit that applies: ``max_pixels``, or Pillow's global ceiling when a process lowered it below."""
    return max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, Image.MAX_IMAGE_PIXELS)


def _check_size(width: int, height: int, max_pixels: int, max_side: int, max_aspect: float) -> None:
    limit = _pixel_limit(max_pixels)
    details = {"width": width, "height": height}
    if width * height > limit:
        raise ImageTooLargeError(
            f"{width}x{height} is {width * height} pixels, above the limit of {limit}", limit=limit, **details
        )
    short, long = min(width, height), max(width, height)
    if short < 1 or long > max_side or long > max_aspect * short:
        raise ImageDimensionsError(
            f"{width}x{height}: sides must be 1 to {max_side} pixels, at most {max_aspect:g}:1", **details
        )


def _exif_orientation(image: Image.Image) -> int:
    """EXIF orientation 1-8; 1 when the tag is missing, malformed or out of range."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # Pillow's EXIF parser on user bytes: a broken block must not fail a good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_8bit(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """The loaded first frame as an 8-bit ``L`` or ``RGB`` image (``image`` itself when it already is one).

    A colour-key transparency on 16-bit, 32-bit or float grey (rare) is ignored.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_sixteen_to_eight(np.asarray(image)))
    if image.mode in ("I", "F"):
        return Image.fromarray(_stretch_to_eight(np.asarray(image)))
    if image.has_transparency_data:
        return _composite(image, background)
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("L" if image.mode == "1" else "RGB")  # 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """``round(v / 257)``: 0..65535 onto 0..255 exactly (65535 = 255 * 257; no ties since 257 is odd)."""
    wide = values.astype(np.uint32)  # (H, W), native byte order whatever the stored one
    wide += 128
    wide //= 257
    return wide.astype(np.uint8)


def _stretch_to_eight(values: np.ndarray) -> np.ndarray:
    """Map the finite range ``[lo, hi]`` linearly onto 0..255 (rounded); non-finite samples and flat images -> 0."""
    values = values.astype(np.float64)  # exact for int32, and room for (v - lo) * scale
    finite = np.isfinite(values)
    lo = values.min(where=finite, initial=np.inf)
    hi = values.max(where=finite, initial=-np.inf)
    if not hi > lo:  # also covers no finite sample (lo = inf)
        return np.zeros(values.shape, np.uint8)
    scaled = np.rint((values - lo) * (255.0 / (hi - lo)), where=finite, out=np.zeros_like(values))
    return scaled.astype(np.uint8)


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-composite over an opaque ``background``: ``round((c * a + bg * (255 - a)) / 255)`` per channel."""
    if image.mode == "La":  # premultiplied grey: Pillow has no La -> RGBA conversion
        image = image.convert("LA")
    if image.mode != "RGBA":
        image = image.convert("RGBA")  # applies palette alpha and tRNS colour keys; un-premultiplies RGBa
    canvas = Image.new("RGB", image.size, background)
    canvas.paste(image, mask=image)
    return canvas


def _to_array(image: Image.Image) -> np.ndarray:
    """Copy an RGB image into a new writable ``(H, W, 3)`` array, one band of rows at a time.

    ``np.asarray(image)`` would first serialise the whole image into a read-only ``bytes`` object (and join
    its chunks: two transient full copies), then need a third copy to be writable; bands bound the transient
    to ~1 MiB and measured about 3x faster on a 24 MP image.
    """
    width, height = image.size
    array = np.empty((height, width, 3), np.uint8)
    rows = max(1, _BAND_BYTES // (4 * width))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        array[top : top + band.height] = np.asarray(band)  # (h, W, 3)
    return array


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the new one, never half of it; a crash leaves no partial output behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the data set from other users (and containers)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
