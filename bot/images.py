"""Untrusted image bytes in, safe RGB images out; images out as files small enough to upload.

Pure PIL, no Discord: every failure while decoding is turned into BadAttachment with a polite text.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bot.errors import BadAttachment

MAX_PIXELS = 40_000_000  # about 6300 x 6300; larger images are refused before they are expanded in memory
MAX_SIDE = 768  # twice Janus-Pro's 384 px input: the model sees no more, so no more is kept in memory
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what we advertise; Pillow's other decoders are never tried
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is refused, not half-read


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, P, L, LA, CMYK, I;16, F, ...) as RGB, transparency flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = float(array.max()) if array.size and array.max() > 0 else 1.0
        gray = np.clip(array / top * 255, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """The image scaled down (aspect kept) so that neither side exceeds `max_side`; as it is if it fits."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)  # any mode, 16-bit grey included


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> Image.Image:
    """Decode untrusted PNG, JPEG, WebP or GIF bytes to an upright RGB image (EXIF orientation applied; the
    first frame of an animation) of at most `max_side` px a side, or raise BadAttachment. Only one full-size
    copy of the pixels exists, and only during this call."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise BadAttachment("That image is empty.")
                if width * height > max_pixels:
                    raise BadAttachment(
                        f"That image is {width}x{height} pixels, too large to read safely; "
                        "please send a smaller one."
                    )
                image.seek(0)  # animated GIF/WebP/APNG: the first frame
                image.draft(image.mode, (max_side, max_side))  # JPEG: decode at a smaller scale right away
                image.load()
                upright = ImageOps.exif_transpose(shrink(image, max_side))  # phone photos are stored sideways
                return to_rgb(upright).copy()
    except BadAttachment:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadAttachment("That image is too large to read safely; please send a smaller one.") from None
    except UnidentifiedImageError:
        raise BadAttachment("I couldn't read that file as an image (PNG, JPEG, WebP or GIF work).") from None
    except Exception:  # noqa: BLE001 - corrupt data makes PIL raise many kinds of errors
        raise BadAttachment("That image seems to be damaged or incomplete; please try another one.") from None


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def encode_for_upload(image: Image.Image, limit: int) -> tuple[bytes, str]:
    """PNG when it fits in `limit` bytes, else the best JPEG quality that fits; returns (data, extension)."""
    data = encode_png(image)
    if len(data) <= limit:
        return data, "png"
    for quality in (95, 90, 80, 70, 55, 40):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= limit:
            return buffer.getvalue(), "jpg"
    raise ValueError(f"image cannot be encoded under {limit} bytes")
