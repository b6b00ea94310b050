"""Normalise one (image, caption) input to an 8-bit RGB image file and a clean caption, or reject it with a reason.

Runs inside the convert worker processes, so it imports only Pillow and numpy.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
JPEG_QUALITY = 95
_ORIENTATION_TAG = 0x0112


class Rejected(Exception):
    """An input that cannot become a sample; `reason` is a short machine-readable key, `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Settings:
    """Options that decide how every input is normalised (the same for all inputs of a run)."""

    max_side: int = 512
    min_size: int = 0
    max_pixels: int = 89_478_485  # Pillow's own default decompression-bomb limit
    center_crop: int | None = None
    max_caption_chars: int = 1000


@dataclass
class Sample:
    """A normalised sample ready for MDS, plus the notes (counted fixes) that were applied to get there."""

    image: bytes
    width: int
    height: int
    caption: str
    notes: list[str] = field(default_factory=list)


def clean_caption(raw: str | bytes | None, max_chars: int, notes: list[str]) -> str:
    """Decode (replacing invalid UTF-8, noted), strip, reject missing/empty, truncate to max_chars (noted)."""
    if raw is None:
        raise Rejected("missing_caption")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            notes.append("caption_non_utf8")
        text = text.removeprefix("\ufeff")
    else:
        text = raw
    text = text.strip()
    if not text:
        raise Rejected("empty_caption")
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
        notes.append("caption_truncated")
    return text


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode the first frame, turning every decoder failure into a Rejected."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # so Pillow's own bomb check uses the run's limit
    try:
        with warnings.catch_warnings():
            # The explicit pixel check below rejects these; the warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise Rejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
            im.seek(0)
            im.load()
    except Image.DecompressionBombError as e:
        raise Rejected("decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise Rejected("not_an_image", "Pillow cannot identify the image format") from e
    except Rejected:
        raise
    except Exception as e:  # Pillow's decoders fail on malformed data with many exception types; all mean corrupt
        raise Rejected("corrupt_image", f"{type(e).__name__}: {e}") from e
    return im


def _high_bit_to_8(im: Image.Image) -> Image.Image:
    """Map 16-bit and 32-bit greyscale modes to 8-bit L by their full range (65535 -> 255)."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max(initial=0.0) <= 1.0 else np.clip(arr, 0, 65535) / 257.0
    else:
        arr = np.clip(arr.astype(np.int64), 0, 65535) / 257.0
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB: alpha composited on white, CMYK/greyscale/16-bit converted (noted)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        notes.append("high_bit_depth_converted")
        return _high_bit_to_8(im).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        notes.append("alpha_composited")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "CMYK":
        notes.append("cmyk_converted")
    elif im.mode in ("L", "1"):
        notes.append("greyscale_converted")
    elif im.mode != "P":
        notes.append(f"{im.mode.lower()}_converted")
    return im.convert("RGB")


def resize(im: Image.Image, settings: Settings, notes: list[str]) -> Image.Image:
    """Centre-crop to a square and resize to center_crop px if set; else shrink so the short side <= max_side."""
    w, h = im.size
    if settings.center_crop:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        notes.append("center_cropped")
        return im.resize((settings.center_crop,) * 2, Image.Resampling.BICUBIC, box=(left, top, left + side,
                                                                                   top + side))
    short = min(w, h)
    if short <= settings.max_side:
        return im
    scale = settings.max_side / short
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    notes.append("downscaled")
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def normalise_image(data: bytes, settings: Settings, notes: list[str]) -> tuple[bytes, int, int]:
    """Decode, check and normalise an encoded image; return (encoded bytes, width, height) or raise Rejected."""
    im = _open(data, settings.max_pixels)
    untouched = im.format == "JPEG" and im.mode == "RGB"
    if getattr(im, "n_frames", 1) > 1:
        notes.append("animated_first_frame")
    if im.getexif().get(_ORIENTATION_TAG, 1) != 1:
        im = ImageOps.exif_transpose(im)
        notes.append("exif_rotated")
        untouched = False
    if min(im.size) < settings.min_size:
        raise Rejected("too_small", f"{im.size[0]}x{im.size[1]}, short side < min-size {settings.min_size}")
    n_notes = len(notes)
    im = resize(to_rgb(im, notes), settings, notes)
    if untouched and len(notes) == n_notes:
        # An RGB JPEG that needs no change is stored as it came: re-encoding would only lose quality.
        return data, im.size[0], im.size[1]
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), im.size[0], im.size[1]


def read_bytes(source: bytes | str | Path) -> bytes:
    """The bytes of an in-memory input, or of a file (a missing or unreadable file is Rejected as unreadable)."""
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e}") from e


def normalise(image: bytes | str | Path, caption: str | bytes | Path | None, settings: Settings) -> Sample:
    """Normalise one input (image bytes or path, caption text/bytes/.txt path/None) or raise Rejected."""
    notes: list[str] = []
    if isinstance(caption, Path):
        try:
            caption = caption.read_bytes() if caption.exists() else None
        except OSError as e:
            raise Rejected("unreadable_caption", f"{caption}: {type(e).__name__}: {e}") from e
    text = clean_caption(caption, settings.max_caption_chars, notes)
    data = read_bytes(image)
    if not data:
        raise Rejected("empty_file")
    encoded, width, height = normalise_image(data, settings, notes)
    return Sample(encoded, width, height, text, notes)


def normalise_item(settings: Settings, item: tuple[str | None, bytes | Path | None, Any]) -> dict[str, Any]:
    """Worker: normalise one (id, image, caption) input; return the sample fields or the rejection reason."""
    _id, image, caption = item
    try:
        if image is None:
            raise Rejected("missing_image")
        s = normalise(image, caption, settings)
    except Rejected as r:
        return {"reason": r.reason, "detail": r.detail}
    return {"image": s.image, "width": s.width, "height": s.height, "caption": s.caption, "notes": s.notes}
