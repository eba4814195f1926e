"""What the bot and the GPU workers exchange through Redis (EXECUTOR=redis): keys, entries, events, codecs.

Keys (one Redis per bot):
    janus:jobs                  stream of job entries, read by the consumer group `workers`. An entry is small
                                JSON (kind, job id, request); its worker acknowledges and deletes it when the
                                job ends, so the stream stays short without ever being trimmed (trimming by
                                length would silently drop pending entries from XAUTOCLAIM).
    janus:dead                  entries set aside after MAX_DELIVERIES tries (no consumer group: capped)
    janus:job:{id}:events       the job's durable event stream, capped by length (the newest are kept)
    janus:job:{id}:input:{n}    an AskRequest's images as PNG
    janus:job:{id}:preview:{n}  the latest preview of each image as PNG (overwritten)
    janus:job:{id}:result:{n}   the result: one PNG per image, or the answer as UTF-8
    janus:job:{id}:cancel       set by the bot to withdraw the job; workers look before and while running it
    janus:job:{id}:reply        the interaction's application id and token, for a restarted bot to keep editing
                                the original response (a credential: it expires with the token, never logged)
    janus:bot:awaiting          hash, job id -> what the bot needs to deliver the job after a restart

Every per-job key expires RESULT_TTL_SECONDS after it was last written. Images never travel inside an entry:
attachments may be megabytes each, and an entry is re-sent on every read and takeover.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from PIL import Image, PngImagePlugin

from bot.requests import AskRequest, Drawing, ImagineRequest, Turn, UpscaleRequest

JOBS = "janus:jobs"
DEAD = "janus:dead"
AWAITING = "janus:bot:awaiting"
GROUP = "workers"
MAX_DELIVERIES = 3  # a job delivered more often than this (it keeps killing workers) is set aside
EVENTS_MAXLEN = 100  # per-job events kept; the terminal event is always the newest
DEAD_MAXLEN = 10_000
TOKENS_CHUNK = "janus-tokens"  # PNG text chunk of a result: its image tokens
# Blocking reads wait BLOCK_MS at most, well under the socket timeout (redis-py's default of 5 s would
# otherwise cut a longer BLOCK short with a TimeoutError).
BLOCK_MS = 1000
SOCKET_TIMEOUT = 10.0

# Event types of a job's stream, in the order they may come. A job ends with exactly one of the last three.
STARTED, RESTARTED, PROGRESS, PREVIEW, DONE, FAILED, CANCELLED = (
    "started", "restarted", "progress", "preview", "done", "failed", "cancelled")
TERMINAL = frozenset({DONE, FAILED, CANCELLED})

Request = AskRequest | ImagineRequest | UpscaleRequest


def events_key(job_id: str) -> str:
    return f"janus:job:{job_id}:events"


def cancel_key(job_id: str) -> str:
    return f"janus:job:{job_id}:cancel"


def input_key(job_id: str, index: int) -> str:
    return f"janus:job:{job_id}:input:{index}"


def preview_key(job_id: str, index: int) -> str:
    return f"janus:job:{job_id}:preview:{index}"


def worker_key(name: str) -> str:
    """A GPU worker's figures (JSON of bot.status.WorkerStatus); it expires a lease after the worker last wrote it."""
    return f"janus:worker:{name}"


def reply_key(job_id: str) -> str:
    return f"janus:job:{job_id}:reply"


def result_key(job_id: str, index: int) -> str:
    return f"janus:job:{job_id}:result:{index}"


def connect(url: str) -> aioredis.Redis:
    """An asyncio client whose socket timeout outlasts every blocking read (BLOCK_MS)."""
    assert BLOCK_MS / 1000 < SOCKET_TIMEOUT
    return aioredis.from_url(url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
                             health_check_interval=30)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


async def ensure_group(redis: aioredis.Redis) -> None:
    """Create the job stream and its consumer group (from the first entry) unless they exist."""
    try:
        await redis.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
    except aioredis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def field(fields: dict[bytes, bytes], name: str, default: str = "") -> str:
    value = fields.get(name.encode())
    return default if value is None else value.decode()


# ---- payloads ---------------------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def unpng(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_drawing(drawing: Drawing) -> bytes:
    """A finished image as PNG, its image tokens in a text chunk (Vary needs them after a restart too)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TOKENS_CHUNK, ",".join(map(str, drawing.tokens)))
    buffer = io.BytesIO()
    drawing.image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def unpng_drawing(data: bytes) -> Drawing:
    image = unpng(data)
    text = image.info.get(TOKENS_CHUNK, "")
    return Drawing(image, tuple(int(token) for token in text.split(",")) if text else ())


def encode_request(request: Request) -> tuple[str, str, list[Image.Image]]:
    """(kind, JSON, images): an AskRequest's images, its history's included, are listed apart and referred to
    by index, to be stored under their own keys."""
    if isinstance(request, ImagineRequest):
        data = {"prompt": request.prompt, "count": request.count, "guidance": request.guidance,
                "temperature": request.temperature, "seed": request.seed, "keep": list(request.keep)}
        return "imagine", json.dumps(data), []
    if isinstance(request, UpscaleRequest):
        return "upscale", json.dumps({"tokens": list(request.tokens)}), []
    images: list[Image.Image] = []

    def refer(batch: tuple[Image.Image, ...]) -> list[int]:
        images.extend(batch)
        return list(range(len(images) - len(batch), len(images)))

    data = {"question": request.question, "images": refer(request.images),
            "history": [{"role": t.role, "text": t.text, "images": refer(t.images)} for t in request.history],
            "temperature": request.temperature, "top_p": request.top_p,
            "max_new_tokens": request.max_new_tokens, "seed": request.seed}
    return "ask", json.dumps(data), images


def decode_request(kind: str, payload: str, images: Sequence[Image.Image | None]) -> Request:
    """The request `encode_request` wrote, given its images in order (None for one that is gone: left out)."""
    data: dict[str, Any] = json.loads(payload)
    if kind == "imagine":
        return ImagineRequest(**{**data, "keep": tuple(data.get("keep", ()))})
    if kind == "upscale":
        return UpscaleRequest(tuple(data["tokens"]))

    def pick(indices: list[int]) -> tuple[Image.Image, ...]:
        return tuple(image for i in indices if (image := images[i]) is not None)

    history = tuple(Turn(t["role"], t["text"], pick(t["images"])) for t in data.pop("history"))
    return AskRequest(images=pick(data.pop("images")), history=history, **data)


def input_count(payload: str) -> int:
    """How many images an ask request's JSON refers to."""
    data = json.loads(payload)
    return len(data.get("images", [])) + sum(len(turn["images"]) for turn in data.get("history", []))
