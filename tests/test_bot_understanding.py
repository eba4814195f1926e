"""User stories of cogs/understanding.py, through the real discord.py client against SimCord and the tiny
Janus.

Janus samples with a seed the cog draws per question. Tests pin that draw (the cog's `random`) so the
answer in the channel can be compared with the answer the model gives directly for the inputs the story
says it should see. The tiny model is nearly blind to text but not to images, so each such test first
checks that the inputs it is about change the model's answer; otherwise the comparison would prove nothing.
Where the model cannot tell (questions, counts of turns and images, streaming, long or empty answers), a
stand-in for the model's `ask` echoes its inputs or scripts its output; the cogs always run for real.
"""

from __future__ import annotations

import functools
import io
import re
import sys
import time
from types import SimpleNamespace

import pytest
from PIL import Image
from scene import Scene, open_scene

from bot.engine import AskRequest, Turn
from bot.jobs import Progress
from bot.media import MESSAGE_LIMIT
from cogs import understanding

SEED = 0
TEMPERATURE = 1.0
TOKENS = 16  # answer length in tokens: enough for the tiny model's answers to differ, and fast
CURSOR = understanding.TYPING_CURSOR


@pytest.fixture
async def simcord_bot(make_bot):
    return await make_bot(max_answer_tokens=TOKENS)


@pytest.fixture
def scene(simcord_env) -> Scene:
    return open_scene(simcord_env)


@pytest.fixture
def fixed_seed(simcord_env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every question is sampled with SEED at TEMPERATURE, so its answer can be reproduced with the model
    directly
    (at the demo's 0.1 the tiny random model says nearly the same whatever it is shown)."""
    # load_extension executes the cog's module afresh for each bot: patch the module the running bot uses.
    cog = sys.modules["cogs.understanding"]
    monkeypatch.setattr(cog, "random", SimpleNamespace(randrange=lambda _n: SEED))
    monkeypatch.setattr(cog, "AskRequest", functools.partial(AskRequest, temperature=TEMPERATURE))


@pytest.fixture
def pictures(png_bytes) -> dict[str, bytes]:
    """Small PNG files; with SEED, the tiny model's answers tell red and red + black from no image."""
    return {
        name: png_bytes((64, 64), color=color)
        for name, color in {"red": (200, 30, 30), "black": (0, 0, 0), "white": (255, 255, 255)}.items()
    }


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def model_answer(studio, question: str, images=(), history=()) -> str:
    """What the model itself answers with the cog's pinned seed and answer length."""
    return studio.ask(
        AskRequest(
            question, tuple(images), tuple(history), seed=SEED, max_new_tokens=TOKENS, temperature=TEMPERATURE
        )
    )


class ScriptedModel:
    """Stands in for the model's `ask`: streams `answer` in `steps` growing parts, then returns it.

    With `shown`, each part waits (up to `wait` seconds) until `shown(part)` says the bot has shown it, so
    the test does not depend on how fast this machine is. Everything else is the real studio's.
    """

    def __init__(self, real, answer: str, steps: int = 0, shown=None, wait: float = 10.0) -> None:
        self.real, self.answer, self.steps, self.shown, self.wait = real, answer, steps, shown, wait

    def ask_batch(self, requests, reports):  # the bot batches questions; this stand-in answers each alone
        return [self.ask(request, report) for request, report in zip(requests, reports, strict=True)]

    def ask(self, request: AskRequest, report=None) -> str:
        assert report is not None  # the bot always follows a question's progress
        for step in range(1, self.steps + 1):
            part = self.answer[: len(self.answer) * step // (self.steps + 1)]
            report(Progress(step, self.steps + 1, part))
            deadline = time.perf_counter() + self.wait
            while self.shown and not self.shown(part) and time.perf_counter() < deadline:
                time.sleep(0.005)
        return self.answer

    def __getattr__(self, name: str):
        return getattr(self.real, name)


class EchoModel:
    """Stands in for the model's `ask` and answers with what it was given: the number of earlier turns, each
    earlier question, then the question, each with the colours of its images. The tiny Janus is nearly blind
    to text and cannot tell counts apart."""

    def __init__(self, real) -> None:
        self.real = real

    def ask_batch(self, requests, reports):  # the bot batches questions; this stand-in answers each alone
        return [self.ask(request, report) for request, report in zip(requests, reports, strict=True)]

    def ask(self, request: AskRequest, report=None) -> str:
        def said(text: str, images) -> str:
            names = {(200, 30, 30): "red", (0, 0, 0): "black", (255, 255, 255): "white"}
            return text + "".join(f" ({names.get(image.getpixel((0, 0)), '?')})" for image in images)

        asked = [said(t.text, t.images) for t in request.history if t.role == "user"]
        now = said(request.question, request.images)
        return f"{len(request.history)} turns: {', '.join(asked)} | now: {now}"

    def __getattr__(self, name: str):
        return getattr(self.real, name)


# ---- mentions, replies, reply chains ------------------------------------------------------------------


async def test_mention_with_images_is_answered_in_a_reply_while_typing(scene, studio, fixed_seed, pictures):
    question = await scene.alice.send(
        scene.channel,
        f"{scene.mention} what is this?",
        attachments=[("red.png", pictures["red"]), ("black.png", pictures["black"])],
    )

    [reply] = scene.bot_messages()
    assert reply.reference.message_id == question.id
    calls = [(e.method, e.path) for e in scene.env.http_requests]
    typing = calls.index(("POST", f"/channels/{scene.channel.id}/typing"))
    assert typing < calls.index(("POST", f"/channels/{scene.channel.id}/messages"))  # typing while it works
    expected = model_answer(studio, "what is this?", [rgb(pictures["red"]), rgb(pictures["black"])])
    assert expected != model_answer(studio, "what is this?")  # the two images matter to the model
    assert reply.content == expected != ""

    scene.env.bot.studio = EchoModel(studio)  # the tiny model's answer does not show that both images went in
    await scene.alice.send(
        scene.channel,
        f"{scene.mention} what is this?",
        attachments=[("red.png", pictures["red"]), ("black.png", pictures["black"])],
    )
    assert scene.bot_messages()[-1].content == "0 turns:  | now: what is this? (red) (black)"


async def test_mention_without_image_gets_a_text_only_answer(scene, studio, fixed_seed):
    question = await scene.alice.send(scene.channel, f"{scene.mention} tell me a joke")

    [reply] = scene.bot_messages()
    assert reply.reference.message_id == question.id
    assert reply.content == model_answer(studio, "tell me a joke") != ""


async def test_mention_in_a_reply_to_someones_image_answers_about_that_image(
    scene, studio, fixed_seed, pictures
):
    holiday = await scene.bob.send(scene.channel, "my holiday", attachments=[("red.png", pictures["red"])])
    question = await scene.alice.send(scene.channel, f"{scene.mention} what is this?", reply_to=holiday)

    [reply] = scene.bot_messages()
    assert reply.reference.message_id == question.id
    expected = model_answer(studio, "what is this?", [rgb(pictures["red"])])
    assert expected != model_answer(studio, "what is this?")
    assert reply.content == expected


async def test_follow_up_to_an_answer_uses_the_reply_chain(scene, studio, fixed_seed, pictures):
    await scene.alice.send(
        scene.channel, f"{scene.mention} what is this?", attachments=[("red.png", pictures["red"])]
    )
    [first] = scene.bot_messages()
    follow_up = await scene.alice.send(
        scene.channel, "and what colour is it?", reply_to=first
    )  # no mention needed

    second = scene.bot_messages()[-1]
    assert second.reference.message_id == follow_up.id
    history = [Turn("user", "what is this?", (rgb(pictures["red"]),)), Turn("assistant", first.content)]
    expected = model_answer(studio, "and what colour is it?", history=history)
    assert expected != model_answer(studio, "and what colour is it?")
    assert second.content == expected


async def chain(scene: Scene, images: list[bytes | None]) -> str:
    """Alice asks, then keeps replying to the bot's latest answer; returns the bot's answer to one more
    reply."""
    latest = None
    for index, image in enumerate(images):
        text = f"question {index}" if latest else f"{scene.mention} question {index}"
        await scene.alice.send(
            scene.channel, text, reply_to=latest, attachments=[("p.png", image)] if image else []
        )
        latest = scene.bot_messages()[-1]
    await scene.alice.send(scene.channel, "and now?", reply_to=latest)
    return scene.bot_messages()[-1].content


async def test_reply_chain_context_is_bounded_in_turns_and_images(scene, studio, pictures):
    scene.env.bot.studio = EchoModel(studio)
    red, white = pictures["red"], pictures["white"]

    # Five exchanges: the context is the last eight messages, so the first question and its picture drop out.
    assert await chain(scene, [red, None, None, None, None]) == (
        "8 turns: question 1, question 2, question 3, question 4 | now: and now?"
    )

    # Three pictures up the chain: only the two newest come along.
    scene.channel = scene.guild.create_text_channel("second")
    assert await chain(scene, [red, white, white]) == (
        "6 turns: question 0, question 1 (white), question 2 (white) | now: and now?"
    )


# ---- /describe and the "Ask Janus" menu ---------------------------------------------------------------


async def test_describe_command_answers_in_its_response(scene, studio, fixed_seed, pictures):
    result = await scene.alice.slash(
        scene.channel, "describe", image=("red.png", pictures["red"]), question="what is this?"
    )

    assert scene.bodies("POST", "/callback")[0] == {"type": 5}  # acknowledged ("thinking") before the work
    assert not result.ephemeral and not result.deferred
    expected = model_answer(studio, "what is this?", [rgb(pictures["red"])])
    assert expected != model_answer(studio, "what is this?")
    assert result.response.content == expected

    # The question goes to the model with the image (without one, it is asked for prompts:
    # test_bot_gallery.py).
    scene.env.bot.studio = EchoModel(studio)
    result = await scene.alice.slash(
        scene.channel, "describe", image=("red.png", pictures["red"]), question="why?"
    )
    assert result.response.content == "0 turns:  | now: why? (red)"
    result = await scene.alice.slash(scene.channel, "describe", image=("red.png", pictures["red"]))
    assert result.response.content == understanding.NO_PROMPTS  # the echo of its question is no prompt


async def test_ask_janus_menu_opens_a_form_and_answers_it(scene, studio, pictures):
    scene.env.bot.studio = EchoModel(studio)
    photo = await scene.bob.send(scene.channel, "look", attachments=[("red.png", pictures["red"])])

    shown = await scene.alice.context_menu(scene.channel, "Ask Janus", photo)
    assert shown.modal["title"] == "Ask Janus"
    [field] = [c for row in shown.modal["components"] for c in row["components"]]
    result = await scene.alice.submit_modal(shown, {field["custom_id"]: "what is this?"})

    assert not result.ephemeral
    assert result.response.content == "0 turns:  | now: what is this? (red)"


async def test_ask_janus_on_a_message_without_image_explains_privately(scene):
    text = await scene.bob.send(scene.channel, "just words")

    result = await scene.alice.context_menu(scene.channel, "Ask Janus", text)

    assert result.modal is None
    assert result.ephemeral and "no image" in result.response.content
    assert scene.bot_messages() == []


# ---- streaming, long and empty answers ----------------------------------------------------------------


async def test_answer_streams_into_the_reply_as_it_grows(scene, studio):
    answer = "The picture shows a red square. It is evenly lit. Nothing else is in it."
    scene.env.bot.studio = ScriptedModel(
        studio, answer, steps=3, shown=lambda part: part.strip() + CURSOR in scene.contents()
    )

    await scene.alice.send(scene.channel, f"{scene.mention} what is it?")

    shown = scene.contents()
    partials = [text.removesuffix(CURSOR) for text in shown if text.endswith(CURSOR)]
    assert len(partials) == len(set(partials)) == 3  # each edit shows more
    assert all(answer.startswith(p) for p in partials) and partials == sorted(partials, key=len)
    assert scene.bodies("PATCH")[-1]["content"] == answer  # the last edit is the whole answer
    assert [m.content for m in scene.bot_messages()] == [answer]


async def test_streaming_edits_are_throttled_by_status_update_seconds(scene, studio, make_bot):
    await scene.env.restart_bot(await make_bot(status_update_seconds=3600))
    answer = "A red square on a white table."
    scene.env.bot.studio = ScriptedModel(
        studio,
        answer,
        steps=4,
        wait=0.25,  # time enough to show each part
        shown=lambda part: part.strip() + CURSOR in scene.contents(),
    )

    await scene.alice.send(scene.channel, f"{scene.mention} what is it?")

    assert sum(1 for text in scene.contents() if text.endswith(CURSOR)) == 1  # the first part, then silence
    assert [m.content for m in scene.bot_messages()] == [answer]


async def test_long_answer_continues_in_further_messages_split_at_boundaries(scene, studio):
    sentences = [
        f"Sentence {i} says a little more about the picture, its colours and its light." for i in range(70)
    ]
    answer = "\n".join(
        " ".join(sentences[a:b]) for a, b in ((0, 30), (30, 40), (40, 70))
    )  # 2,400 + 800 + 2,400
    scene.env.bot.studio = ScriptedModel(studio, answer, steps=2)

    question = await scene.alice.send(scene.channel, f"{scene.mention} describe it at length")

    replies = scene.bot_messages()
    assert len(replies) >= 4
    assert all(0 < len(m.content) <= MESSAGE_LIMIT for m in replies)
    assert all(len(text) <= MESSAGE_LIMIT for text in scene.contents())  # streamed parts too
    assert re.sub(r"\s+", " ", " ".join(m.content for m in replies)) == re.sub(r"\s+", " ", answer)
    assert all(m.content.endswith(".") for m in replies)  # cut at a line or sentence end, never mid-sentence
    # The parts form a reply chain: the first answers the question, each further part replies to the previous.
    assert [m.reference.message_id for m in replies] == [question.id] + [m.id for m in replies[:-1]]


async def test_empty_answer_is_never_sent_empty(scene, studio, pictures):
    scene.env.bot.studio = ScriptedModel(studio, "")

    await scene.alice.send(scene.channel, f"{scene.mention} say nothing")
    result = await scene.alice.slash(
        scene.channel, "describe", image=("red.png", pictures["red"]), question="hm?"
    )

    assert [m.content for m in scene.bot_messages()] == [understanding.NO_ANSWER] * 2
    assert result.response.content == understanding.NO_ANSWER
    assert all(text.strip() for text in scene.contents())


# ---- attachments that cannot be used ------------------------------------------------------------------


async def test_unusable_attachments_get_a_polite_note_and_the_bot_keeps_serving(scene, make_bot, png_bytes):
    await scene.env.restart_bot(
        await make_bot(max_answer_tokens=TOKENS, max_attachment_mb=0.001)
    )  # 1,048 bytes
    noise = Image.effect_noise((64, 64), 80).convert("RGB")
    big = io.BytesIO()
    noise.save(big, format="PNG")
    assert len(big.getvalue()) > 1048
    cases = [
        ("notes.txt", b"shopping list", "isn't an image"),
        ("photo.png", b"definitely not a PNG", "couldn't read that file as an image"),
        ("cut.png", png_bytes((64, 64))[:60], "damaged"),
        ("big.png", big.getvalue(), "KiB; the limit is"),
    ]

    for name, data, note in cases:
        question = await scene.alice.send(
            scene.channel, f"{scene.mention} what is this?", attachments=[(name, data)]
        )
        reply = scene.bot_messages()[-1]
        assert reply.reference.message_id == question.id
        assert note in reply.content and len(reply.content) < 200, reply.content

    # /describe refuses what it can judge before downloading privately, before "thinking" in public ...
    for name, data, note in cases[0], cases[3]:
        result = await scene.alice.slash(scene.channel, "describe", image=(name, data))
        assert result.ephemeral and note in result.response.content
    assert len(scene.bot_messages()) == len(cases)
    # ... and what turns out unreadable once downloaded in its "thinking" message, instead of an answer.
    result = await scene.alice.slash(scene.channel, "describe", image=cases[1][:2])
    assert cases[1][2] in result.response.content and len(result.response.content) < 200

    question = await scene.bob.send(scene.channel, f"{scene.mention} hello, are you there?")
    reply = scene.bot_messages()[-1]
    assert reply.reference.message_id == question.id
    assert reply.content and not any(note in reply.content for *_, note in cases)
