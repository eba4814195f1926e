"""What the bot and the GPU workers exchange through Redis (EXECUTOR=redis): keys, entries, events, and the
one typed schema both sides validate them with.

Keys (one Redis per bot):
    janus:jobs                  stream of job entries, read by the consumer group `workers`. An entry is small
                                (`Entry`: job id, kind, weight, the request as JSON); its worker acknowledges
                                and deletes it when the job ends, so the stream stays short without ever being
                                trimmed (trimming by length would silently drop pending entries from
                                XAUTOCLAIM).
    janus:dead                  entries set aside (capped, no consumer group), with the reason: one that took
                                down the workers running it MAX_DELIVERIES times, or one no worker can read
    janus:job:{id}:events       the job's durable event stream, capped by length (the newest are kept)
    janus:job:{id}:input:{n}    an AskRequest's images as PNG, reduced to MAX_INPUT_SIDE
    janus:job:{id}:preview:{n}  the latest preview of each image as PNG (overwritten)
    janus:job:{id}:result:{n}   the result: one PNG per image (its image tokens in a text chunk), or the
                                answer as UTF-8
    janus:job:{id}:cancel       set by the bot to withdraw the job; workers look before and while running it
    janus:job:{id}:reply        the interaction's application id and token, for a restarted bot to keep
                                editing the original response (a credential: it expires with the token)
    janus:bot:awaiting          hash, job id -> `Awaiting`: what the bot needs to deliver it after a restart
    janus:worker:{name}         a live GPU worker's figures (bot.status.WorkerStatus as JSON), expiring a
                                lease after the worker last wrote them

Every per-job key expires RESULT_TTL_SECONDS after it was last written, and is deleted as soon as its job's
outcome was delivered (or the job was withdrawn): the expiry is only the backstop. Images never travel inside
an entry: they may be megabytes each, and an entry is re-sent on every read and takeover.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal, cast

import redis.asyncio as aioredis
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bot.images import MAX_SIDE, shrink
from bot.jobs import Charge
from bot.limits import ALLOWED
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

# What a request may hold. The model reads an image at 384 px; a question's images are stored at most twice
# that, reduced as the bot reduces them on arrival (bot.images.shrink): that bounds what a job keeps in Redis.
MAX_INPUT_SIDE = MAX_SIDE
MAX_INPUT_BYTES = 3 * 2**20  # one input PNG (768 x 768 RGB is 1.7 MB raw)
MAX_JOB_INPUT_BYTES = 16 * 2**20  # all of one question's images
MAX_IMAGES = 8  # a question's images, its history's included
MAX_TEXT = 8000  # characters of a prompt, question or earlier turn
MAX_TURNS = 16
MAX_COUNT = 64  # images of one /imagine (MAX_BATCH_IMAGES's own bound)
MAX_REQUEST_CHARS = 200_000
MAX_SEED = 2**63 - 1
IMAGE_TOKENS = 2**16  # image token ids are below this (Janus's codebook has 16384)
MAX_KEEP = 576  # image tokens of one image (24 x 24)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Event types of a job's stream, in the order they may come. A job ends with exactly one of the last three.
STARTED, RESTARTED, PROGRESS, PREVIEW, DONE, FAILED, CANCELLED = (
    "started",
    "restarted",
    "progress",
    "preview",
    "done",
    "failed",
    "cancelled",
)
TERMINAL = frozenset({DONE, FAILED, CANCELLED})

Request = AskRequest | ImagineRequest | UpscaleRequest


class BadEntry(ValueError):
    """A job entry, request or input image that does not follow this schema; the text says what is wrong."""


def events_key(job_id: str) -> str:
    return f"janus:job:{job_id}:events"


def cancel_key(job_id: str) -> str:
    return f"janus:job:{job_id}:cancel"


def input_key(job_id: str, index: int) -> str:
    return f"janus:job:{job_id}:input:{index}"


def preview_key(job_id: str, index: int) -> str:
    return f"janus:job:{job_id}:preview:{index}"


def reply_key(job_id: str) -> str:
    return f"janus:job:{job_id}:reply"


def result_key(job_id: str, index: int) -> str:
    return f"janus:job:{job_id}:result:{index}"


def worker_key(name: str) -> str:
    """A GPU worker's figures (JSON of bot.status.WorkerStatus); expires a lease after the worker wrote it."""
    return f"janus:worker:{name}"


def job_keys(job_id: str, *, inputs: int, images: int) -> list[str]:
    """Every key a job may have (`inputs` question images, `images` result and preview images)."""
    return [
        events_key(job_id),
        cancel_key(job_id),
        reply_key(job_id),
        *(input_key(job_id, index) for index in range(inputs)),
        *(key(job_id, index) for index in range(max(images, 1)) for key in (preview_key, result_key)),
    ]


def connect(url: str) -> aioredis.Redis:
    """An asyncio client whose socket timeout outlasts every blocking read (BLOCK_MS)."""
    assert BLOCK_MS / 1000 < SOCKET_TIMEOUT
    return aioredis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT, health_check_interval=30
    )


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


# ---- typed reads (redis-py types its replies loosely; this client never decodes, so they are bytes) -------

Fields = dict[bytes, bytes]
StreamEntries = list[tuple[bytes, Fields]]


async def read_stream(
    redis: aioredis.Redis, key: str, after: str, *, block: int | None = None
) -> StreamEntries:
    """The entries of one stream after id `after` (up to EVENTS_MAXLEN), waiting up to `block` ms for some."""
    reply = cast(
        "list[tuple[bytes, StreamEntries]]", await redis.xread({key: after}, count=EVENTS_MAXLEN, block=block)
    )
    return reply[0][1] if reply else []


async def stream_range(
    redis: aioredis.Redis, key: str, start: str = "-", end: str = "+", count: int | None = None
) -> StreamEntries:
    return cast(StreamEntries, await redis.xrange(key, start, end, count=count))


async def get_many(redis: aioredis.Redis, keys: Sequence[str]) -> list[bytes | None]:
    return cast("list[bytes | None]", await redis.mget(keys)) if keys else []


async def get_one(redis: aioredis.Redis, key: str) -> bytes | None:
    return cast("bytes | None", await redis.get(key))


def field(fields: dict[bytes, bytes], name: str, default: str = "") -> str:
    """An event's field as text (events are written by workers, whose entries this schema checked)."""
    value = fields.get(name.encode())
    return default if value is None else value.decode(errors="replace")


# ---- the schema -------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """Unknown fields, wrong types (no coercion from strings), NaN and infinities are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Text = Annotated[str, Field(max_length=MAX_TEXT)]
ImageRef = Annotated[int, Field(ge=0, lt=MAX_IMAGES)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ImageToken = Annotated[int, Field(ge=0, lt=IMAGE_TOKENS)]


class ImagineData(_Strict):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
    count: Annotated[int, Field(ge=1, le=MAX_COUNT)]
    guidance: Annotated[float, Field(ge=0.0, le=20.0)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)]
    seed: Seed
    keep: Annotated[list[ImageToken], Field(max_length=MAX_KEEP)] = []


class UpscaleData(_Strict):
    tokens: Annotated[list[ImageToken], Field(min_length=1, max_length=MAX_KEEP)]
    gallery: Annotated[int, Field(ge=0, lt=2**63)] = 0  # the bot's own record of it, for a restarted bot
    index: Annotated[int, Field(ge=0, lt=MAX_COUNT)] = 0


class TurnData(_Strict):
    role: Literal["user", "assistant"]
    text: Text
    images: Annotated[list[ImageRef], Field(max_length=MAX_IMAGES)]


class AskData(_Strict):
    question: Text
    images: Annotated[list[ImageRef], Field(max_length=MAX_IMAGES)]
    history: Annotated[list[TurnData], Field(max_length=MAX_TURNS)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)]
    top_p: Annotated[float, Field(gt=0.0, le=1.0)]
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)]
    seed: Seed

    @model_validator(mode="after")
    def _images_in_order(self) -> AskData:
        """Images are numbered 0, 1, ... in the order they are referred to (the question's, then turns')."""
        refs = [*self.images, *(index for turn in self.history for index in turn.images)]
        if refs != list(range(len(refs))):
            raise ValueError("image references must be 0, 1, 2, ... in order")
        return self

    @property
    def image_count(self) -> int:
        return len(self.images) + sum(len(turn.images) for turn in self.history)


RequestData = AskData | ImagineData | UpscaleData


class Entry(BaseModel):
    """A job stream entry, as written by the bot (Redis gives every field back as text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    kind: Literal["ask", "imagine", "upscale"]
    weight: Annotated[int, Field(ge=1, le=MAX_COUNT)]
    request: Annotated[str, Field(max_length=MAX_REQUEST_CHARS)]

    def data(self) -> RequestData:
        """The request, checked against the schema of its kind (raises BadEntry)."""
        data = request_data(self.kind, self.request)
        weight = data.count if isinstance(data, ImagineData) else 1
        if weight != self.weight:
            raise BadEntry(f"weight {self.weight} does not match the request's {weight}")
        return data

    def fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        return {"job": self.job, "kind": self.kind, "weight": str(self.weight), "request": self.request}


class ChargeData(_Strict):
    """What `UsageStore.refund` needs of an admitted charge."""

    guild_id: int
    user_id: int
    kind: Literal["ask", "imagine"]
    day: Annotated[str, Field(max_length=10)]
    charged_at: datetime
    previous_request_at: datetime | None

    @classmethod
    def of(cls, charge: Charge) -> ChargeData:
        return cls(
            guild_id=charge.guild_id,
            user_id=charge.user_id,
            kind=charge.kind,
            day=charge.day,
            charged_at=charge.charged_at,
            previous_request_at=charge.previous_request_at,
        )

    def charge(self) -> Charge:
        return Charge(
            ALLOWED,
            guild_id=self.guild_id,
            user_id=self.user_id,
            kind=self.kind,
            day=self.day,
            charged_at=self.charged_at,
            previous_request_at=self.previous_request_at,
        )


class Awaiting(BaseModel):
    """What the bot keeps in janus:bot:awaiting for a job with an origin, to deliver it after a restart."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ask", "imagine", "upscale"]
    owner: int
    guild: int
    channel: int
    message: int = 0
    request: Annotated[str, Field(max_length=MAX_REQUEST_CHARS)]
    inputs: Annotated[int, Field(ge=0, le=MAX_IMAGES)] = 0
    charge: ChargeData | None = None


class Reply(BaseModel):
    """The interaction's application id and token (janus:job:{id}:reply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    application: int
    token: Annotated[str, Field(max_length=500)] = Field(repr=False)
    created: float = 0.0  # when the interaction was made (POSIX seconds)


def request_data(kind: str, text: str) -> RequestData:
    """A request's JSON, checked against the schema of its kind (raises BadEntry)."""
    model = {"ask": AskData, "imagine": ImagineData}.get(kind, UpscaleData)
    try:
        return model.model_validate_json(text)
    except ValidationError as error:
        raise BadEntry(_first_error(error)) from None


def _first_error(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "entry"
    return f"{where}: {first['msg']}"


def decode_entry(fields: dict[bytes, bytes]) -> Entry:
    """A job entry from its raw stream fields, or BadEntry saying what is wrong with it."""
    try:
        text = {name.decode(): value.decode() for name, value in fields.items()}
    except UnicodeDecodeError as error:
        raise BadEntry(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        return Entry.model_validate(text)
    except ValidationError as error:
        raise BadEntry(_first_error(error)) from None


def entry_job_id(fields: dict[bytes, bytes]) -> str | None:
    """The job id of an entry that may be unreadable otherwise, if it has a well-formed one."""
    raw = fields.get(b"job", b"")
    try:
        job_id = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return job_id if len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id) else None


# ---- requests ---------------------------------------------------------------------------------------------


def encode_request(job_id: str, request: Request) -> tuple[Entry, list[Image.Image]]:
    """The entry for a request, and an AskRequest's images (its history's included), which are numbered in the
    entry and stored under their own keys. Raises BadEntry for a request a worker would refuse."""
    try:
        if isinstance(request, ImagineRequest):
            data: RequestData = ImagineData(
                prompt=request.prompt,
                count=request.count,
                guidance=float(request.guidance),
                temperature=float(request.temperature),
                seed=request.seed,
                keep=list(request.keep),
            )
            return Entry(job=job_id, kind="imagine", weight=request.count, request=data.model_dump_json()), []
        if isinstance(request, UpscaleRequest):
            data = UpscaleData(tokens=list(request.tokens), gallery=request.gallery_id, index=request.index)
            return Entry(job=job_id, kind="upscale", weight=1, request=data.model_dump_json()), []
        images: list[Image.Image] = []

        def refer(batch: tuple[Image.Image, ...]) -> list[int]:
            images.extend(batch)
            return list(range(len(images) - len(batch), len(images)))

        data = AskData.model_validate(
            {
                "question": request.question,
                "images": refer(request.images),
                "history": [
                    {"role": t.role, "text": t.text, "images": refer(t.images)} for t in request.history
                ],
                "temperature": float(request.temperature),
                "top_p": float(request.top_p),
                "max_new_tokens": request.max_new_tokens,
                "seed": request.seed,
            }
        )
        return Entry(job=job_id, kind="ask", weight=1, request=data.model_dump_json()), images
    except ValidationError as error:
        raise BadEntry(_first_error(error)) from None


def decode_request(data: RequestData, images: Sequence[Image.Image | None]) -> Request:
    """The request a checked entry holds, given its images in order (None for one that is gone: left out)."""
    if isinstance(data, ImagineData):
        return ImagineRequest(
            prompt=data.prompt,
            count=data.count,
            guidance=data.guidance,
            temperature=data.temperature,
            seed=data.seed,
            keep=tuple(data.keep),
        )
    if isinstance(data, UpscaleData):
        return UpscaleRequest(tuple(data.tokens), data.gallery, data.index)

    def pick(indices: list[int]) -> tuple[Image.Image, ...]:
        return tuple(image for i in indices if i < len(images) and (image := images[i]) is not None)

    history = tuple(Turn(t.role, t.text, pick(t.images)) for t in data.history)
    return AskRequest(
        question=data.question,
        images=pick(data.images),
        history=history,
        temperature=data.temperature,
        top_p=data.top_p,
        max_new_tokens=data.max_new_tokens,
        seed=data.seed,
    )


# ---- images -----------------------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def unpng(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data), formats=["PNG"])
    image.load()
    return image


def encode_inputs(images: Sequence[Image.Image]) -> list[bytes]:
    """A question's images as stored for the workers: reduced to MAX_INPUT_SIDE (aspect kept), as PNG. Raises
    BadEntry when together they are over MAX_JOB_INPUT_BYTES."""
    blobs = [png(shrink(image, MAX_INPUT_SIDE)) for image in images]
    if sum(map(len, blobs)) > MAX_JOB_INPUT_BYTES or any(len(blob) > MAX_INPUT_BYTES for blob in blobs):
        raise BadEntry("the images are too large to send to a GPU worker")
    return blobs


def decode_input(data: bytes) -> Image.Image:
    """One stored question image, checked: a PNG within MAX_INPUT_BYTES and MAX_INPUT_SIDE (else BadEntry)."""
    if not data.startswith(PNG_SIGNATURE):
        raise BadEntry("an input image is not a PNG")
    if len(data) > MAX_INPUT_BYTES:
        raise BadEntry(f"an input image has {len(data)} bytes, over {MAX_INPUT_BYTES}")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadEntry(f"an input image cannot be read ({error})") from None
    if max(image.size) > MAX_INPUT_SIDE:
        raise BadEntry(f"an input image is {image.width}x{image.height}, over {MAX_INPUT_SIDE} px")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadEntry(f"an input image cannot be decoded ({error})") from None
    return image if image.mode == "RGB" else image.convert("RGB")


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
