"""Pictures of detections: the one module that draws boxes and labels, and encodes the annotated copy.

``detect predict --save-images``, ``detect compare``, ``POST /detect`` with ``annotate`` and
:meth:`detect.detector.Results.plot` all draw with :func:`draw_detections`.

Decisions:

- **One colour per class**, from a fixed palette of 20 colours chosen to stay apart from each other and from
  typical photo content (saturated, not pastel); class id ``k`` (1-based) takes ``PALETTE[(k - 1) % 20]``, so a
  class keeps its colour across images, runs and front ends (the web page uses the same list, see
  ``api/static/app.js``). The label text is black or white, whichever contrasts more with its background.
- **Line width scales with the image**: ``max(1, round(0.0015 * (H + W)))``, 2 px at 640 x 640 and 6 px at
  2000 x 2000; ``line_width`` overrides it. The label font is Pillow's built-in scalable font at a size
  proportional to the line width (at least 11 px).
- **Labels stay inside the image**: ``name score`` on a filled rectangle in the class colour, above the box when
  there is room, else inside its top edge; shifted left when it would run past the right border.
  ``hide_labels`` draws boxes only; ``hide_scores`` draws the class name without the score.
- **The annotated copy keeps the input's format** (:func:`encode_like`): a JPEG stays a JPEG (quality 90; the
  PNG the first version wrote was 5-6 times larger than the photo), a WebP stays WebP (quality 90), a PNG stays
  PNG; other formats (BMP, GIF, TIFF) are written as PNG, which keeps every pixel. The format is chosen from the
  input's extension (:func:`annotated_suffix`), so the file name says what it holds: ``a.jpg`` ->
  ``a.jpg.annotated.jpg``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePath

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detect.structures import Detections

__all__ = ["PALETTE", "Style", "annotated_suffix", "class_colour", "draw_detections", "encode_like", "line_width_for"]

# 20 well-separated colours (RGB); api/static/app.js holds the same list for the web page.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 56, 56), (31, 119, 255), (44, 200, 64), (255, 157, 0), (170, 60, 255),
    (0, 200, 200), (255, 55, 200), (140, 200, 0), (255, 210, 0), (0, 90, 160),
    (200, 100, 40), (0, 160, 110), (230, 120, 160), (100, 100, 255), (160, 0, 60),
    (120, 180, 255), (90, 60, 0), (255, 120, 90), (0, 110, 40), (130, 130, 130),
)
JPEG_QUALITY = 90
_FORMATS = {".jpg": ("JPEG", ".jpg"), ".jpeg": ("JPEG", ".jpg"), ".png": ("PNG", ".png"), ".webp": ("WEBP", ".webp")}


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The palette colour of a 1-based class id."""
    return PALETTE[(int(class_id) - 1) % len(PALETTE)]


def line_width_for(height: int, width: int) -> int:
    """The default box line width for an image: 0.3 % of its mean side, at least 1 px."""
    return max(1, round(0.0015 * (height + width)))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luminance > 128 else (255, 255, 255)


@dataclass(frozen=True)
class Style:
    """How boxes are drawn: ``line_width`` in pixels (``None``: scaled to the image), labels and scores shown or
    hidden (``--line-width``, ``--hide-labels``, ``--hide-scores``)."""

    line_width: int | None = None
    hide_labels: bool = False
    hide_scores: bool = False

    def __post_init__(self) -> None:
        if self.line_width is not None and self.line_width < 1:
            raise ValueError(f"line width must be at least 1, got {self.line_width}")


def draw_detections(
    image: np.ndarray | Image.Image, detections: Detections, class_names: Sequence[str], style: Style = Style()
) -> Image.Image:
    """A copy of ``image`` (RGB ``uint8`` array or PIL image) with each detection's box in its class colour and,
    unless hidden, its ``name score`` label on a filled background inside the image (see the module docstring)."""
    canvas = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    canvas = canvas.copy()
    width, height = canvas.size
    lw = style.line_width if style.line_width is not None else line_width_for(height, width)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(11, 5 * lw + 6))
    items = detections.to_json(class_names)["detections"]
    for item in sorted(items, key=lambda d: d["score"]):  # the best boxes drawn last, on top
        colour = class_colour(item["class_id"])
        x1, y1, x2, y2 = item["box"]
        x1, y1 = max(0.0, min(x1, width - 1)), max(0.0, min(y1, height - 1))
        x2, y2 = max(x1, min(x2, width - 1)), max(y1, min(y2, height - 1))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=lw)
        if style.hide_labels:
            continue
        text = item["class_name"] if style.hide_scores else f"{item['class_name']} {item['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * lw, bottom - top + 2 * lw
        tx = max(0, min(int(x1), width - tw))
        ty = int(y1) - th if y1 - th >= 0 else int(y1)  # above the box when it fits, else inside its top edge
        ty = max(0, min(ty, height - th))
        draw.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=colour)
        draw.text((tx + lw - left, ty + lw - top), text, fill=_text_colour(colour), font=font)
    return canvas


def annotated_suffix(source: str | PurePath) -> str:
    """The extension of an input's annotated copy: ``.jpg`` for JPEG inputs, ``.webp``, else ``.png``."""
    return _FORMATS.get(PurePath(source).suffix.lower(), ("PNG", ".png"))[1]


def encode_like(image: Image.Image, source: str | PurePath) -> bytes:
    """``image`` encoded in the format of the input ``source`` (by its extension; see the module docstring)."""
    fmt = _FORMATS.get(PurePath(source).suffix.lower(), ("PNG", ".png"))[0]
    buffer = io.BytesIO()
    if fmt == "PNG":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=fmt, quality=JPEG_QUALITY)
    return buffer.getvalue()
