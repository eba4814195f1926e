"""What members ask the model for, as plain data: no torch here, so the Discord side and the Redis layer can
build and ship requests without loading the model's libraries (bot/engine.py re-exports these)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Turn:
    """One earlier message of a conversation: who said it, what, and with which images."""

    role: str  # "user" or "assistant"
    text: str
    images: tuple[Image.Image, ...] = ()


@dataclass(frozen=True)
class AskRequest:
    """A question about zero or more images; the defaults are those of DeepSeek's demo."""

    question: str
    images: tuple[Image.Image, ...] = ()
    history: tuple[Turn, ...] = ()
    temperature: float = 0.1  # 0 = greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0


@dataclass(frozen=True)
class ImagineRequest:
    """A prompt to draw `count` images from, with classifier-free guidance and a seed."""

    prompt: str
    count: int = 4
    guidance: float = 5.0
    temperature: float = 1.0  # 0 = greedy
    seed: int = 0
    keep: tuple[int, ...] = ()  # image tokens every image starts with (Vary keeps an image's top rows)


@dataclass(frozen=True)
class Drawing:
    """One finished image (upscaled when the upscaler is on) and the image tokens it was decoded from,
    row-major over the token grid; kept so that Vary can redraw all but an image's top rows."""

    image: Image.Image
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class UpscaleRequest:
    """One gallery image, decoded again from its tokens, at twice the gallery's side (Upscale). Which image of
    which stored gallery it is (`gallery_id`, `index` from 0) tells a restarted bot where to post it."""

    tokens: tuple[int, ...]
    gallery_id: int = 0
    index: int = 0
