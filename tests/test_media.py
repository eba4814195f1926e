"""Pure helpers of bot/media.py and bot/images.py: message splitting, text cleaning, and fitting images into
Discord's per-message limits."""

from __future__ import annotations

import io
import re
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from bot.images import encode_for_upload
from bot.media import FILES_PER_MESSAGE, clean_text, image_files, split_message


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


# ---- split_message -------------------------------------------------------------------------------------


def test_short_text_is_one_message() -> None:
    assert split_message("  Hello there.  ") == ["Hello there."]


def test_blank_text_is_no_message() -> None:
    assert split_message("") == split_message(" \n ") == []


def test_splits_at_a_line_break_first() -> None:
    text = "Line one is long enough.\nTwo. Three is here and more."
    assert split_message(text, limit=40) == ["Line one is long enough.", "Two. Three is here and more."]


def test_splits_at_a_sentence_end_when_no_line_break_is_late_enough() -> None:
    text = "One sentence here. Another one here! A third, longer one follows now."
    assert split_message(text, limit=45) == [
        "One sentence here. Another one here!",
        "A third, longer one follows now.",
    ]


def test_splits_at_a_space_when_there_is_no_sentence_end() -> None:
    assert split_message("alpha beta gamma delta epsilon zeta", limit=20) == [
        "alpha beta gamma",
        "delta epsilon zeta",
    ]


def test_cuts_hard_when_there_is_no_space() -> None:
    assert split_message("x" * 45, limit=20) == ["x" * 20, "x" * 20, "x" * 5]


@given(st.text(st.sampled_from("ab .!?\n"), max_size=400), st.integers(10, 120))
def test_chunks_fit_and_lose_only_whitespace(text: str, limit: int) -> None:
    chunks = split_message(text, limit=limit)
    assert all(0 < len(chunk) <= limit and chunk == chunk.strip() for chunk in chunks)
    assert squeeze("".join(chunks)) == squeeze(text)


# ---- clean_text ----------------------------------------------------------------------------------------


def test_clean_text_drops_invisible_and_control_characters_but_keeps_layout() -> None:
    assert clean_text("\u200b hi\u200d\x00 there\x1b\n\tnext\ufeff line \u202e") == "hi there\n\tnext line"


# ---- images into files --------------------------------------------------------------------------------


def noise(side: int = 128) -> Image.Image:
    return Image.effect_noise((side, side), 60).convert("RGB")


def test_encode_for_upload_keeps_png_when_it_fits() -> None:
    data, extension = encode_for_upload(noise(), 10 * 2**20)
    assert extension == "png" and Image.open(io.BytesIO(data)).format == "PNG"


def test_encode_for_upload_falls_back_to_jpeg_under_the_limit() -> None:
    image = noise()
    png, _ = encode_for_upload(image, 10 * 2**20)
    data, extension = encode_for_upload(image, len(png) // 2)
    decoded = Image.open(io.BytesIO(data))
    assert extension == "jpg" and decoded.format == "JPEG" and decoded.size == image.size
    assert len(data) <= len(png) // 2


def test_encode_for_upload_refuses_an_impossible_limit() -> None:
    with pytest.raises(ValueError, match="cannot be encoded under 100 bytes"):
        encode_for_upload(noise(), 100)


async def test_image_files_puts_at_most_ten_files_in_a_message() -> None:
    groups = await image_files([Image.new("RGB", (8, 8))] * 12, "g", limit=10 * 2**20)

    assert [len(group) for group in groups] == [FILES_PER_MESSAGE, 2]
    assert [f.filename for group in groups for f in group] == [f"g_{i}.png" for i in range(1, 13)]


async def test_image_files_keeps_each_message_under_the_upload_limit() -> None:
    images = [noise() for _ in range(5)]
    png, _ = encode_for_upload(images[0], 10 * 2**20)
    limit = int(len(png) * 2.5)  # two PNGs fit in a message, three do not

    groups = await image_files(images, "g", limit=limit)

    sizes = [
        [len(cast(io.BytesIO, f.fp).getbuffer()) for f in group] for group in groups
    ]  # image_files' buffers
    assert [len(group) for group in groups] == [2, 2, 1]
    assert all(sum(group) <= limit for group in sizes)
