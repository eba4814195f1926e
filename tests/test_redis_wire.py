"""The one schema the bot and the GPU workers check Redis entries with (pure functions, no Redis needed), and
the Redis that docker-compose.yml starts."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from bot.jobs import Charge
from bot.limits import ALLOWED
from bot.redis import wire
from bot.requests import AskRequest, Drawing, ImagineRequest, Turn, UpscaleRequest

ROOT = Path(__file__).parent.parent
JOB = "ab" * 16


def fields(entry: wire.Entry, **changes: str | bytes) -> dict[bytes, bytes]:
    """An entry's fields as Redis gives them back (bytes), with some changed."""
    raw = {**entry.fields(), **changes}
    return {
        name.encode(): value if isinstance(value, bytes) else value.encode() for name, value in raw.items()
    }


def test_requests_round_trip_through_the_schema() -> None:
    drawn = ImagineRequest("a fox", count=3, guidance=4.5, temperature=0.7, seed=9, keep=(1, 2, 3))
    entry, images = wire.encode_request(JOB, drawn)
    assert images == []
    assert wire.decode_request(wire.decode_entry(fields(entry)).data(), []) == drawn
    upscale = UpscaleRequest((4, 5, 6), gallery_id=12, index=3)  # which image: where a restarted bot posts it
    entry, _ = wire.encode_request(JOB, upscale)
    assert wire.decode_request(wire.decode_entry(fields(entry)).data(), []) == upscale

    red, blue = Image.new("RGB", (3, 2), "red"), Image.new("RGB", (2, 3), "blue")
    asked = AskRequest(
        "and this?",
        images=(red,),
        history=(Turn("user", "what is it?", (blue,)), Turn("assistant", "a square")),
        seed=5,
    )
    entry, images = wire.encode_request(JOB, asked)
    assert images == [red, blue]  # stored apart, numbered in order
    data = wire.decode_entry(fields(entry)).data()
    assert wire.decode_request(data, images) == asked


@pytest.mark.parametrize(
    ("request_", "complaint"),
    [
        (ImagineRequest("x", count=0), "count"),
        (ImagineRequest("x", count=wire.MAX_COUNT + 1), "count"),
        (ImagineRequest("x", guidance=float("nan")), "guidance"),
        (ImagineRequest("", count=1), "prompt"),
        (ImagineRequest("x", keep=(wire.IMAGE_TOKENS,)), "keep"),
        (AskRequest("x", top_p=0.0), "top_p"),
        (AskRequest("x", seed=-1), "seed"),
        (AskRequest("x" * (wire.MAX_TEXT + 1)), "question"),
        (AskRequest("x", history=(Turn("moderator", "hi"),)), "role"),
        (UpscaleRequest(()), "tokens"),
        (UpscaleRequest((1,), index=-1), "index"),
    ],
)
def test_the_bot_refuses_to_queue_what_a_worker_would_refuse(request_, complaint: str) -> None:
    with pytest.raises(wire.BadEntry, match=complaint):
        wire.encode_request(JOB, request_)


def test_entries_a_worker_cannot_read_say_why() -> None:
    entry, _ = wire.encode_request(JOB, ImagineRequest("a fox", count=2))
    request = entry.request
    cases = {
        "not UTF-8": fields(entry, request=b'{"prompt": "\xc3\x28"}'),
        "Extra inputs": fields(entry, priority="high"),
        "job": fields(entry, job="not-a-job-id"),
        "kind": fields(entry, kind="describe"),
        "weight 1 does not match": fields(entry, weight="1"),
        "JSON": fields(entry, request="{"),
        "Input should be a valid integer": fields(entry, request=request.replace('"count":2', '"count":"2"')),
        "less than or equal to 20": fields(entry, request=request.replace('"guidance":5.0', '"guidance":99')),
    }
    for complaint, raw in cases.items():
        with pytest.raises(wire.BadEntry, match=complaint):
            wire.decode_entry(raw).data()
    assert wire.entry_job_id(cases["not UTF-8"]) == JOB  # its requester can still be told
    assert wire.entry_job_id(cases["job"]) is None


def test_question_images_are_stored_reduced_and_checked_when_read() -> None:
    photo = Image.effect_noise((2000, 1000), 40).convert("RGB")
    [blob] = wire.encode_inputs([photo])
    stored = wire.decode_input(blob)
    assert stored.size == (wire.MAX_INPUT_SIDE, wire.MAX_INPUT_SIDE // 2) and stored.mode == "RGB"
    small = Image.new("RGB", (5, 7), (1, 2, 3))
    assert wire.decode_input(wire.encode_inputs([small])[0]).tobytes() == small.tobytes()  # lossless

    jpeg = io.BytesIO()
    small.save(jpeg, format="JPEG")
    with pytest.raises(wire.BadEntry, match="not a PNG"):
        wire.decode_input(jpeg.getvalue())
    with pytest.raises(wire.BadEntry, match="over 768 px"):
        wire.decode_input(wire.png(Image.new("RGB", (wire.MAX_INPUT_SIDE + 1, 2))))
    with pytest.raises(wire.BadEntry, match="cannot be decoded"):
        whole = wire.png(Image.effect_noise((64, 64), 90).convert("RGB"))
        wire.decode_input(whole[: len(whole) // 2])
    with pytest.raises(wire.BadEntry, match="bytes, over"):
        wire.decode_input(wire.PNG_SIGNATURE + bytes(wire.MAX_INPUT_BYTES))


def test_a_jobs_images_are_capped_in_all() -> None:
    side = wire.MAX_INPUT_SIDE
    noise = [Image.effect_noise((side, side), 90).convert("RGB") for _ in range(3)]
    per_image = len(wire.encode_inputs(noise[:1])[0])
    count = wire.MAX_JOB_INPUT_BYTES // per_image + 1
    with pytest.raises(wire.BadEntry, match="too large"):
        wire.encode_inputs([noise[index % 3] for index in range(count)])


def test_results_carry_their_image_tokens_and_records_their_charge() -> None:
    drawing = Drawing(Image.new("RGB", (4, 4), "green"), (5, 6, 7))
    back = wire.unpng_drawing(wire.png_drawing(drawing))
    assert back.tokens == (5, 6, 7) and back.image.tobytes() == drawing.image.tobytes()

    charge = Charge(
        ALLOWED,
        guild_id=1,
        user_id=2,
        kind="ask",
        day="2026-01-02",
        charged_at=datetime(2026, 1, 2, 3, 4, tzinfo=UTC),
        previous_request_at=None,
    )
    record = wire.Awaiting(
        kind="ask", owner=2, guild=1, channel=3, request="{}", charge=wire.ChargeData.of(charge)
    )
    again = wire.Awaiting.model_validate_json(record.model_dump_json()).charge
    assert again is not None and vars(again.charge()) == vars(charge)


def test_compose_caps_redis_memory_and_refuses_writes_rather_than_evicting_jobs() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    redis = compose[compose.index("\n  redis:") : compose.index("\n  worker:")]
    command = re.search(r"command: \[(.*)\]", redis)
    assert command is not None
    args = [arg.strip().strip('"') for arg in command[1].split(",")]
    assert args[args.index("--maxmemory") + 1].endswith(("mb", "gb"))
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
