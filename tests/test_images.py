"""Untrusted image bytes: every mode becomes RGB, and nothing but our own polite error ever escapes."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.errors import BadAttachment
from bot.images import MAX_SIDE, decode_image, encode_for_upload, to_rgb


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "CMYK", "I;16", "1"])
def test_every_mode_decodes_to_rgb(mode: str) -> None:
    fmt = {"CMYK": "JPEG", "I;16": "PNG", "LA": "PNG"}.get(mode, "PNG")
    image = decode_image(encoded(Image.new(mode, (20, 10)), fmt))
    assert image.mode == "RGB" and image.size == (20, 10)


@pytest.mark.parametrize("mode", ["I", "F", "I;16"])
def test_wide_grey_modes_become_rgb(mode: str) -> None:
    """Modes only other formats (TIFF) decode to, and 16-bit PNG once shrunk: scaled to their brightest
    value."""
    image = to_rgb(Image.new(mode, (20, 10), 1000))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO", "PPM", "TGA"])
def test_only_the_advertised_formats_are_opened(fmt: str) -> None:
    """Pillow's other decoders (and their bugs) are never tried, whatever the file says it is."""
    with pytest.raises(BadAttachment, match=r"PNG, JPEG, WebP or GIF"):
        decode_image(encoded(Image.new("RGB", (16, 16), (200, 30, 30)), fmt))


def test_large_images_shrink_to_what_the_model_uses_keeping_the_aspect() -> None:
    for mode, fmt in (("RGB", "JPEG"), ("I;16", "PNG"), ("P", "GIF"), ("RGBA", "WEBP")):
        image = decode_image(encoded(Image.new(mode, (3000, 1500)), fmt))
        assert image.size == (MAX_SIDE, MAX_SIDE // 2) and image.mode == "RGB", (mode, fmt)
    assert decode_image(encoded(Image.new("RGB", (300, 150)), "PNG")).size == (300, 150)  # small: untouched


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    """A phone photo stored sideways with "rotate 90°" in its EXIF reaches the model upright."""
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; view rotated 90° clockwise
    image = decode_image(encoded(wide, fmt, exif=exif.tobytes()))
    assert image.size == (20, 40)
    pixel = image.getpixel((10, 5))  # rotated clockwise: the left half is now on top
    assert isinstance(pixel, tuple)
    red, _green, blue = pixel
    assert red > 200 and blue < 60


def test_transparency_is_flattened_onto_white() -> None:
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(encoded(clear, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_animations_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    for fmt in ("GIF", "WEBP"):
        data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:])
        pixel = decode_image(data).getpixel((4, 4))
        assert isinstance(pixel, tuple), fmt
        red, _green, blue = pixel
        assert red > 200 and blue < 60, fmt


def test_decompression_bombs_are_refused_before_they_expand() -> None:
    bomb = encoded(Image.new("L", (5000, 5000)), "PNG")  # tiny file, 25 M pixels
    with pytest.raises(BadAttachment, match="too large"):
        decode_image(bomb, max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_refused_politely(data: bytes) -> None:
    with pytest.raises(BadAttachment, match="couldn't read|damaged"):
        decode_image(data)


def test_truncated_files_are_refused_not_half_read() -> None:
    whole = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(BadAttachment):
        decode_image(whole[: len(whole) // 2])


VALID = [
    encoded(Image.new(mode, (16, 12), 128), fmt)
    for mode, fmt in (
        ("RGB", "PNG"),
        ("RGB", "JPEG"),
        ("P", "GIF"),
        ("RGBA", "WEBP"),
        ("L", "PNG"),
        ("I;16", "PNG"),
    )
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(VALID),
    cuts=st.lists(st.tuples(st.integers(0, 400), st.binary(max_size=8)), max_size=6),
)
def test_fuzzed_images_decode_or_raise_bad_attachment(base: bytes, cuts: list[tuple[int, bytes]]) -> None:
    """Mutated real files (bytes overwritten, inserted, cut): a usable RGB image or BadAttachment, nothing
    else."""
    data = bytearray(base)
    for position, chunk in cuts:
        position %= len(data) + 1
        data[position : position + len(chunk)] = chunk
    try:
        image = decode_image(bytes(data))
    except BadAttachment:
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0


@given(st.binary(max_size=512))
@settings(max_examples=200, deadline=None)
def test_random_bytes_decode_or_raise_bad_attachment(data: bytes) -> None:
    try:
        decode_image(data)
    except BadAttachment:
        pass


def test_large_images_are_reencoded_to_fit_the_upload_limit() -> None:
    noise = Image.effect_noise((512, 512), 80).convert("RGB")
    png, _ = encode_for_upload(noise, 10 * 2**20)
    data, extension = encode_for_upload(noise, len(png) // 3)
    assert extension == "jpg" and len(data) <= len(png) // 3
    assert Image.open(io.BytesIO(data)).size == (512, 512)
