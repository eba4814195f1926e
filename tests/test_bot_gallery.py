"""User stories of the Components V2 gallery (cogs/gallery.py): one message that is the status and then the
gallery, Upscale and Vary per image, Remix, Re-roll, Describe, Delete, /describe's prompts with their Imagine
buttons, all also after a restart, and every action under the presser's limits. The tiny Janus draws 64 px
images
from a 4 x 4 token grid; the gallery shows them upscaled x2 (128 px) and Upscale posts 256 px."""

from __future__ import annotations

import io
import math
import re

import discord
import pytest
from PIL import Image, ImageChops, ImageStat
from scene import Scene, components_of, decode, labels, open_scene, text_displays, text_of

from bot.errors import OUT_OF_MEMORY_UPSCALING, JobFailed
from bot.requests import AskRequest
from cogs.gallery import kept_rows
from cogs.understanding import NO_PROMPTS

SIDE = 128
V2 = 1 << 15
WRITTEN = (
    "Here you go:\n1. **A red fox in deep snow**, watercolor\n2) a small fox asleep under pine trees\n"
    '3: "foxes playing in a winter meadow"\n4 - a fox portrait, oil painting\n5. one too many here'
)


@pytest.fixture
async def simcord_bot(make_bot):
    return await make_bot(images_per_prompt=2)


@pytest.fixture
def scene(simcord_env) -> Scene:
    return open_scene(simcord_env)


class PromptWriter:
    """Stands in for the model's answers (drawing stays real): the prompts question gets `answer`, any other
    question a fingerprint of its image."""

    def __init__(self, real, answer: str = WRITTEN) -> None:
        self.real, self.answer = real, answer

    def ask_batch(self, requests: list[AskRequest], reports):
        return [
            self.answer if "numbered list" in r.question else f"saw {fingerprint(r.images[0])}"
            for r in requests
        ]

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def fingerprint(image: Image.Image) -> str:
    return str(hash(image.convert("RGB").tobytes()) % 10**8)


async def images_of(message) -> list[Image.Image]:
    return [(await decode(attachment)).convert("RGB") for attachment in message.attachments]


def gallery_id(message) -> int:
    """The gallery id its Delete button carries."""
    [custom_id] = [
        c["custom_id"] for c in components_of(message) if c.get("custom_id", "").startswith("janus:delete")
    ]
    return int(custom_id.rsplit(":", 1)[1])


async def tokens_of(scene: Scene, message) -> list[tuple[int, ...]]:
    gallery = gallery_id(message)
    stored = await scene.bot.store.gallery(gallery)
    assert stored is not None
    tokens = [await scene.bot.store.image_tokens(gallery, i) for i in range(stored.count)]
    assert all(row is not None for row in tokens)
    return [row for row in tokens if row is not None]


def difference(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


async def draw(scene: Scene, member=None, **options):
    options = {"prompt": "a paper boat", "count": 2, "seed": 11, **options}
    return (await (member or scene.alice).slash(scene.channel, "imagine", **options)).response


# ---- one V2 message: the status, then the gallery ----------------------------------------------------------


async def test_the_status_becomes_the_gallery_in_one_components_v2_message(scene):
    gallery = await draw(scene, count=3, seed=42)

    edits = scene.bodies("PATCH", "@original")
    assert edits and all(
        edit["flags"] & V2 and not edit.get("content") for edit in edits
    )  # V2 from the first edit
    assert any("Drawing 3 image(s)" in text_displays(edit["components"]) for edit in edits)
    assert gallery.flags.value & V2
    [container] = gallery.components
    assert container["type"] == 17  # everything in one container
    [media] = [c for c in components_of(gallery) if c["type"] == 12]
    names = [a.filename for a in gallery.attachments]
    assert names == ["janus_42_1.png", "janus_42_2.png", "janus_42_3.png"]  # the preview was replaced
    assert [item["media"]["url"] for item in media["items"]] == [a.url for a in gallery.attachments]
    caption = text_of(gallery)
    for shown in (
        "a paper boat",
        scene.alice.mention,
        "seed `42`",
        "guidance 5",
        "temperature 1",
        "3 image(s)",
        f"{SIDE}×{SIDE}",
    ):
        assert shown in caption
    assert labels(gallery) == [
        "U1",
        "U2",
        "U3",
        "V1",
        "V2",
        "V3",
        "💬 Describe an image…",
        "Re-roll",
        "Remix",
        "Delete",
    ]


async def test_a_gallery_of_more_than_four_offers_menus_to_upscale_and_vary(scene):
    gallery = await draw(scene, count=5, seed=4)

    assert labels(gallery) == [
        "🔍 Upscale an image…",
        "🔀 Vary an image…",
        "💬 Describe an image…",
        "Re-roll",
        "Remix",
        "Delete",
    ]
    upscale_menu = next(c for c in components_of(gallery) if c.get("custom_id", "").startswith("janus:upsel"))
    assert [o["label"] for o in upscale_menu["options"]] == [f"Image {i}" for i in range(1, 6)]

    upscaled = await scene.bob.select(gallery, ["4"], custom_id=upscale_menu["custom_id"])  # image 5
    [reply] = [m for m in scene.bot_messages() if m.reference and m.reference.message_id == gallery.id]
    assert upscaled.ephemeral and "Image 5, upscaled" in text_of(reply)
    vary_menu = next(c for c in components_of(gallery) if c.get("custom_id", "").startswith("janus:varysel"))
    varied = (await scene.bob.select(gallery, ["1"], custom_id=vary_menu["custom_id"])).response
    assert "Variations of image 2 of" in text_of(varied) and len(varied.attachments) == 4


async def test_a_gallery_over_the_upload_limit_is_split_with_each_images_actions(scene, monkeypatch):
    monkeypatch.setattr(discord.Guild, "filesize_limit", property(lambda _guild: 60_000))  # about 2 images
    result = await scene.alice.slash(scene.channel, "imagine", prompt="a field of tulips", count=5, seed=2)

    messages = [result.response, *result.followups]
    assert len(messages) >= 2 and all(m.flags.value & V2 for m in messages)
    assert sum(len(m.attachments) for m in messages) == 5
    numbers = [label for m in messages for label in labels(m) if re.fullmatch(r"U\d", label)]
    assert numbers == ["U1", "U2", "U3", "U4", "U5"]  # each message's images, numbered across the gallery
    assert [labels(m).count("Re-roll") for m in messages] == [1] + [0] * (len(messages) - 1)
    assert (await scene.alice.click(messages[0], label="Delete")).response.content == "Deleted."
    remaining = {m.id for m in scene.channel.history()}
    assert not remaining & {m.id for m in messages}  # every part went


# ---- Upscale
# -------------------------------------------------------------------------------------------------


async def test_upscale_posts_that_image_alone_at_twice_the_side_as_a_reply(scene, studio):
    gallery = await draw(scene)
    first, second = await images_of(gallery)

    pressed = await scene.bob.click(gallery, label="U2")

    assert pressed.ephemeral and pressed.response.content.startswith("Here it is: ")
    [reply] = [m for m in scene.bot_messages() if m.reference and m.reference.message_id == gallery.id]
    assert reply.flags.components_v2 and scene.bob.mention in text_of(reply)
    assert "Image 2, upscaled to 256×256" in text_of(reply)
    assert scene.env.backend.get_message(scene.channel.id, reply.id).ping_user_ids == [scene.bob.id]
    [image] = await images_of(reply)
    assert image.size == (2 * SIDE, 2 * SIDE)
    # It is image 2 run through the upscaler once more (up to rounding between batched and single runs).
    again = [studio.upscaler.enlarge(shown, 2) for shown in (first, second)]
    assert difference(image, again[1]) < 1 < difference(image, again[0])
    assert (await scene.alice.click(reply, label="Delete")).ephemeral  # not hers: refused
    assert (await scene.bob.click(reply, label="Delete")).response.content == "Deleted."


class FailingUpscale:
    """The real studio, except that upscaling fails as an out-of-memory GPU would make it."""

    def __init__(self, real) -> None:
        self.real = real

    def upscale(self, request, report=None):
        raise JobFailed(OUT_OF_MEMORY_UPSCALING)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


async def test_a_failed_upscale_is_told_privately_and_refunded(scene, studio):
    gallery = await draw(scene)
    scene.env.bot.studio = FailingUpscale(studio)

    told = await scene.bob.click(gallery, label="U1")

    assert told.ephemeral and told.response.content == f"⚠️ {OUT_OF_MEMORY_UPSCALING}"
    assert not [m for m in scene.bot_messages() if m.reference and m.reference.message_id == gallery.id]
    assert "Generations: 0/20 used" in (await scene.bob.slash(scene.channel, "usage")).response.content


# ---- Vary
# ------------------------------------------------------------------------------------------------------


async def test_vary_keeps_exactly_the_first_token_rows_of_that_image_and_redraws_the_rest(scene):
    gallery = await draw(scene)
    parent = await tokens_of(scene, gallery)
    grid = math.isqrt(len(parent[1]))
    kept = kept_rows(grid, None) * grid
    assert kept == grid  # a third of 4 rows: one row

    varied = (await scene.bob.click(gallery, label="V2")).response

    assert len(varied.attachments) == 4
    assert f"Variations of image 2 of [this gallery]({gallery.message.jump_url})" in text_of(varied)
    children = await tokens_of(scene, varied)
    assert all(child[:kept] == parent[1][:kept] for child in children)  # the kept rows, exactly
    assert any(child[kept:] != parent[1][kept:] for child in children)  # the rest redrawn
    assert len({child[kept:] for child in children}) > 1  # with new random numbers for each
    again = (await scene.alice.click(gallery, label="V2")).response  # same seed and settings: same variations
    assert await tokens_of(scene, again) == children
    other = (await scene.alice.click(gallery, label="V1")).response
    assert all(child[:kept] == parent[0][:kept] for child in await tokens_of(scene, other))


# ---- Remix, Re-roll, Describe
# ------------------------------------------------------------------------------------


async def test_remix_opens_a_prefilled_form_and_draws_the_edit_with_the_same_seed(scene):
    gallery = await draw(scene, guidance=6.5, temperature=0.8)

    shown = await scene.bob.click(gallery, label="Remix")

    fields = {c["custom_id"]: c.get("value") for row in shown.modal["components"] for c in row["components"]}
    assert fields == {"prompt": "a paper boat", "guidance": "6.5", "temperature": "0.8"}
    remixed = (
        await scene.bob.submit_modal(
            shown, {"prompt": "a paper boat at night", "guidance": "7", "temperature": "0.5"}
        )
    ).response
    caption = text_of(remixed)
    assert "a paper boat at night" in caption and scene.bob.mention in caption
    assert "seed `11` · guidance 7 · temperature 0.5 · 2 image(s)" in caption
    same = await draw(scene, prompt="a paper boat at night", guidance=7.0, temperature=0.5)
    assert [im.tobytes() for im in await images_of(remixed)] == [im.tobytes() for im in await images_of(same)]

    refused = await scene.bob.submit_modal(
        await scene.bob.click(gallery, label="Remix"),
        {"prompt": "a boat", "guidance": "12", "temperature": "0.5"},
    )
    assert refused.ephemeral and refused.response.content == "Guidance must be from 1 to 10, not 12."


async def test_every_action_works_after_a_restart(scene, studio, make_bot):
    gallery = await draw(scene)
    scene.env.bot.studio = PromptWriter(studio)
    written = await scene.alice.slash(scene.channel, "describe", image=("boat.png", png()))

    await scene.env.restart_bot(await make_bot(images_per_prompt=2))
    scene.env.bot.studio = PromptWriter(studio)

    assert "Image 1, upscaled" in text_of(
        next(
            m
            for m in (await _after(scene, scene.alice.click(gallery, label="U1")))
            if m.reference and m.reference.message_id == gallery.id
        )
    )
    assert "Variations of image 2" in text_of((await scene.alice.click(gallery, label="V2")).response)
    assert "seed `" in text_of((await scene.alice.click(gallery, label="Re-roll")).response)
    shown = await scene.alice.click(gallery, label="Remix")
    remixed = await scene.alice.submit_modal(
        shown, {"prompt": "a paper plane", "guidance": "5", "temperature": "1"}
    )
    assert "a paper plane" in text_of(remixed.response)
    opened = await scene.bob.click(gallery, label="Remix")  # a form open while the bot restarts
    await scene.env.restart_bot(await make_bot(images_per_prompt=2))
    scene.env.bot.studio = PromptWriter(studio)
    sent = await scene.bob.submit_modal(
        opened, {"prompt": "a paper crane", "guidance": "5", "temperature": "1"}
    )
    assert text_of(sent.response).startswith(f"**a paper crane** — {scene.bob.mention}")
    described = await scene.alice.select(gallery, ["1"])
    assert described.response.content == f"saw {fingerprint((await images_of(gallery))[1])}"
    imagined = (await scene.bob.click(written.response, label="Imagine 3")).response
    assert text_of(imagined).startswith(f"**foxes playing in a winter meadow** — {scene.bob.mention}")
    assert (await scene.alice.click(gallery, label="Delete")).response.content == "Deleted."


async def _after(scene: Scene, action) -> list[discord.Message]:
    await action
    return scene.bot_messages()


def png(color=(20, 90, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- /describe writes prompts
# ------------------------------------------------------------------------------------


async def test_describe_without_a_question_writes_four_prompts_to_imagine(scene, studio):
    scene.env.bot.studio = PromptWriter(studio)

    written = await scene.alice.slash(scene.channel, "describe", image=("fox.png", png()))

    assert not written.ephemeral
    assert written.response.content == (
        "**Prompts that could draw this image**\n1. A red fox in deep snow, watercolor\n"
        "2. a small fox asleep under pine trees\n3. foxes playing in a winter meadow\n"
        "4. a fox portrait, oil painting"
    )
    assert labels(written.response) == ["Imagine 1", "Imagine 2", "Imagine 3", "Imagine 4"]
    drawn = (await scene.bob.click(written.response, label="Imagine 2")).response
    assert text_of(drawn).startswith(f"**a small fox asleep under pine trees** — {scene.bob.mention}")
    assert len(drawn.attachments) == 2  # IMAGES_PER_PROMPT

    asked = await scene.alice.slash(
        scene.channel, "describe", image=("fox.png", png()), question="What colour is it?"
    )
    assert asked.response.content.startswith("saw ") and not labels(asked.response)  # a question: an answer


@pytest.mark.parametrize("answer", ["qz#@ 12 ▁▁ xx\n~~ 7", "", "1. 2. 3. 4."])
async def test_describe_says_so_politely_when_the_answer_is_no_list_of_prompts(scene, studio, answer):
    scene.env.bot.studio = PromptWriter(studio, answer)

    written = await scene.alice.slash(scene.channel, "describe", image=("fox.png", png()))

    assert written.response.content == NO_PROMPTS and not labels(written.response)


async def test_describe_with_the_real_tiny_model_writes_prompts_or_says_it_could_not(scene):
    written = await scene.alice.slash(scene.channel, "describe", image=("fox.png", png()))

    text = written.response.content
    numbered = re.findall(r"^(\d)\. ", text, flags=re.MULTILINE)
    assert text == NO_PROMPTS or (numbered and labels(written.response) == [f"Imagine {n}" for n in numbered])


# ---- limits: the presser is the requester
# -------------------------------------------------------------------------


async def test_every_action_admits_and_charges_whoever_presses(scene, studio):
    scene.env.bot.studio = PromptWriter(studio)
    gallery = await draw(scene)
    await scene.bot.store.set_limits(scene.guild.id, generations_per_user=3, questions_per_user=1)

    assert not (await scene.bob.click(gallery, label="U1")).response.content.startswith("You've used")
    assert not (await scene.bob.click(gallery, label="V1")).ephemeral
    assert not (await scene.bob.click(gallery, label="Re-roll")).ephemeral
    for refused in (await scene.bob.click(gallery, label="U2"), await scene.bob.click(gallery, label="V2")):
        assert refused.ephemeral and refused.response.content.startswith("You've used 3/3 generations today")
    shown = await scene.bob.click(gallery, label="Remix")
    remix = await scene.bob.submit_modal(shown, {"prompt": "a boat", "guidance": "5", "temperature": "1"})
    assert remix.ephemeral and remix.response.content.startswith("You've used 3/3 generations today")

    written = await scene.bob.slash(scene.channel, "describe", image=("fox.png", png()))
    assert labels(written.response)[0] == "Imagine 1"  # one question
    again = await scene.bob.slash(scene.channel, "describe", image=("fox.png", png()))
    assert again.ephemeral and again.response.content.startswith("You've used 1/1 questions today")
    imagine = await scene.bob.click(written.response, label="Imagine 1")
    assert imagine.ephemeral and imagine.response.content.startswith("You've used 3/3 generations today")
    assert not (await scene.alice.click(written.response, label="Imagine 1")).ephemeral  # alice has one left
    usage = (await scene.bob.slash(scene.channel, "usage")).response.content
    assert "3/3" in usage and "1/1" in usage
