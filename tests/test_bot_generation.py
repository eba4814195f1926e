"""User stories of cogs/generation.py (/imagine), through the real discord.py client against SimCord and the
tiny Janus + Real-ESRGAN x2: images are drawn at 64 px and delivered at 128 px."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time

import discord
import pytest
from PIL import Image
from scene import Scene, components_of, decode, open_scene, text_displays, text_of

from bot.engine import AskRequest
from bot.media import MESSAGE_LIMIT

SIDE = 128  # 64 px from the tiny Janus, upscaled x2
GREY = (64, 64, 64)  # rows of a preview not drawn yet


@pytest.fixture
async def simcord_bot(make_bot):
    return await make_bot(images_per_prompt=3)


@pytest.fixture
def scene(simcord_env) -> Scene:
    return open_scene(simcord_env)


async def images_of(message) -> list[Image.Image]:
    return [await decode(attachment) for attachment in message.attachments]


def hold_gpu(scene: Scene, *until_shown: str, then=None) -> None:
    """Queue one GPU job per text, each holding the GPU until the bot shows that text (10 s at most); then
    call `then()` on the GPU thread. Jobs run in order, so the texts must appear in order."""

    def hold(text: str):
        def job(_report) -> None:
            deadline = time.perf_counter() + 10
            while not any(text in content for content in scene.contents()) and time.perf_counter() < deadline:
                time.sleep(0.005)
            if then:
                then()

        return job

    for text in until_shown:
        scene.bot.executor.submit(hold(text), kind="hold")


class PixelEchoModel:
    """Stands in for the model's `ask`: answers with a fingerprint of each image it was given."""

    def __init__(self, real) -> None:
        self.real = real

    def ask_batch(self, requests, reports):  # the bot batches questions; this stand-in answers each alone
        return [self.ask(request, report) for request, report in zip(requests, reports, strict=True)]

    def ask(self, request: AskRequest, report=None) -> str:
        return "saw " + " ".join(fingerprint(image) for image in request.images)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def fingerprint(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:12]


# ---- /imagine ---------------------------------------------------------------------------------------


async def test_imagine_acknowledges_at_once_then_posts_the_upscaled_gallery(scene):
    result = await scene.alice.slash(scene.channel, "imagine", prompt="a red fox in snow", seed=42)

    requests = [(e.method, e.path, e.json) for e in scene.env.http_requests]
    [defer_at] = [i for i, (method, path, _) in enumerate(requests) if path.endswith("/callback")]
    assert requests[defer_at][2] == {"type": 5}  # "thinking…", before any work was shown
    assert all(i > defer_at for i, (method, *_rest) in enumerate(requests) if method == "PATCH")
    gallery = result.response
    assert not result.ephemeral and not result.deferred
    assert [a.filename for a in gallery.attachments] == [
        f"janus_42_{i}.png" for i in (1, 2, 3)
    ]  # IMAGES_PER_PROMPT
    assert [(im.format, im.size) for im in await images_of(gallery)] == [("PNG", (SIDE, SIDE))] * 3
    caption = text_of(gallery)
    for shown in (
        "a red fox in snow",
        scene.alice.mention,
        "seed `42`",
        "guidance 5",
        "temperature 1",
        "3 image(s)",
        f"{SIDE}×{SIDE}",
    ):
        assert shown in caption

    result = await scene.alice.slash(
        scene.channel, "imagine", prompt="a red fox", count=1, guidance=7.5, temperature=0.5, seed=7
    )
    assert len(result.response.attachments) == 1
    assert "guidance 7.5 · temperature 0.5" in text_of(result.response) and "seed `7`" in text_of(
        result.response
    )


async def test_status_shows_queue_position_then_progress_with_previews(scene):
    hold_gpu(scene, "Waiting in line: #2", "Waiting in line: #1")  # two jobs ahead of Alice's

    result = await scene.alice.slash(scene.channel, "imagine", prompt="a lighthouse", count=2, seed=1)

    edits = scene.bodies("PATCH", "@original")
    texts = [text_displays(edit["components"]) for edit in edits]
    first = {
        key: next(i for i, t in enumerate(texts) if key in t)
        for key in ("Waiting in line: #2", "Waiting in line: #1", "Drawing 2 image(s)")
    }
    assert first["Waiting in line: #2"] < first["Waiting in line: #1"] < first["Drawing 2 image(s)"]
    assert len({t for t in texts if "Drawing" in t}) >= 3  # the progress moves
    previews = [
        i for i, edit in enumerate(edits) if edit.get("attachments") == [{"id": 0, "filename": "preview.png"}]
    ]
    assert previews and all("Drawing" in texts[i] for i in previews)
    assert len(result.response.attachments) == 2 and "a lighthouse" in text_of(result.response)

    # The first preview shown: each image's top rows are drawn, the rest still grey. It is made once a quarter
    # of the rows is drawn, but a loaded machine's bot may see a later one first (it shows the newest).
    sheet = await first_preview(scene)
    assert sheet.size == (2 * 256, 256)
    for left in (0, 256):
        image = sheet.crop((left, 0, left + 256, 256))
        grey_from = [top for top in (64, 128, 192) if all_grey(image.crop((0, top, 256, 256)))]
        assert grey_from, "nothing of the image is left grey in the first preview"
        for top in range(0, grey_from[0], 64):  # every row above is drawn
            assert not all_grey(image.crop((0, top, 256, top + 64)))


def all_grey(image: Image.Image) -> bool:
    pixels = image.width * image.height
    return image.getcolors(pixels) == [(pixels, GREY)]


async def first_preview(scene: Scene) -> Image.Image:
    """The first preview.png the status message showed (SimCord keeps every upload in its CDN)."""
    for kind, event, payload in scene.env.backend.transcript:
        for attachment in (
            payload.get("attachments", []) if kind == "GATEWAY" and event == "MESSAGE_UPDATE" else []
        ):
            if attachment["filename"] == "preview.png":
                stored = scene.env.backend.cdn.get(attachment["url"])
                assert stored is not None
                return Image.open(io.BytesIO(stored)).convert("RGB")
    raise AssertionError("no preview was shown")


async def test_same_seed_same_images_and_another_seed_other_images(scene):
    async def draw(seed: int) -> bytes:
        result = await scene.alice.slash(
            scene.channel, "imagine", prompt="a bowl of fruit", count=1, seed=seed
        )
        [image] = await images_of(result.response)
        return image.convert("RGB").tobytes()

    first, again, other = await draw(5), await draw(5), await draw(6)

    assert first == again != other


# ---- buttons -----------------------------------------------------------------------------------------


async def test_gallery_buttons_reroll_describe_and_delete(scene, studio):
    scene.env.bot.studio = PixelEchoModel(studio)  # understanding answers with fingerprints; drawing is real
    carol = scene.guild.add_member(scene.env.create_user("carol"))
    moderators = scene.guild.create_role("mods", permissions=discord.Permissions(manage_messages=True))
    mod = scene.guild.add_member(scene.env.create_user("mod"), roles=[moderators])
    gallery = (
        await scene.alice.slash(scene.channel, "imagine", prompt="a paper boat", count=2, seed=11)
    ).response

    reroll = (await scene.alice.click(gallery, label="Re-roll")).response
    caption = text_of(reroll)
    assert "a paper boat" in caption and "seed `11`" not in caption and "seed `" in caption
    assert [im.size for im in await images_of(reroll)] == [(SIDE, SIDE)] * 2
    assert [im.tobytes() for im in await images_of(reroll)] != [
        im.tobytes() for im in await images_of(gallery)
    ]

    described = await scene.bob.select(gallery, ["1"])  # "Image 2"; anyone may ask
    first, second = await images_of(gallery)
    assert not described.ephemeral
    assert described.response.content == f"saw {fingerprint(second)}" != f"saw {fingerprint(first)}"

    refused = await carol.click(gallery, label="Delete")
    assert refused.ephemeral and "Only the person who asked" in refused.response.content
    assert (await mod.click(reroll, label="Delete")).response.content == "Deleted."
    deleted = await scene.alice.click(gallery, label="Delete")
    assert deleted.ephemeral and deleted.response.content == "Deleted."
    remaining = {m.id for m in scene.channel.history()}
    assert gallery.id not in remaining and reroll.id not in remaining and described.response.id in remaining


async def test_gallery_buttons_keep_working_after_a_restart(scene, studio, make_bot):
    gallery = (await scene.alice.slash(scene.channel, "imagine", prompt="a kite", count=2, seed=3)).response

    await scene.env.restart_bot(await make_bot(images_per_prompt=3))
    scene.env.bot.studio = PixelEchoModel(studio)

    reroll = (await scene.alice.click(gallery, label="Re-roll")).response
    assert "a kite" in text_of(reroll) and [im.size for im in await images_of(reroll)] == [(SIDE, SIDE)] * 2
    described = await scene.alice.select(gallery, ["0"])
    assert described.response.content == f"saw {fingerprint((await images_of(gallery))[0])}"
    assert (await scene.alice.click(gallery, label="Delete")).response.content == "Deleted."
    assert gallery.id not in {m.id for m in scene.channel.history()}


# ---- the 15-minute interaction token -----------------------------------------------------------------


async def test_job_finishing_after_the_token_expired_is_posted_in_the_channel(scene):
    # SimCord's public advance_time cannot run while /imagine waits for the GPU: it first settles the bot, and
    # a cog awaiting its job is not a wait SimCord can park. So the job holding the GPU moves SimCord's clock
    # itself, once the member saw their place in line: the token then dies while the request waits.
    loop = asyncio.get_running_loop()
    hold_gpu(
        scene,
        "Waiting in line: #1",
        then=lambda: loop.call_soon_threadsafe(scene.env.backend.advance_clock, 16 * 60),
    )

    result = await scene.alice.slash(scene.channel, "imagine", prompt="a snowy owl", count=2, seed=9)

    assert "Waiting in line" in text_of(result.response)  # the response could not be edited any more
    posted = scene.bot_messages()[-1]
    assert posted.id != result.response.id
    assert text_of(posted).startswith(f"{scene.alice.mention} **a snowy owl**")
    assert scene.env.backend.get_message(scene.channel.id, posted.id).ping_user_ids == [
        scene.alice.id
    ]  # pinged
    assert [im.size for im in await images_of(posted)] == [(SIDE, SIDE)] * 2
    assert {c["custom_id"].split(":")[1] for c in components_of(posted) if "custom_id" in c} == {
        "up",
        "vary",
        "reroll",
        "remix",
        "delete",
        "describe",
    }
    [body] = scene.bodies("POST", f"/channels/{scene.channel.id}/messages")
    assert body["allowed_mentions"]["parse"] == [] and body["allowed_mentions"]["users"] == [scene.alice.id]


# ---- Discord's limits ----------------------------------------------------------------------------------


async def test_gallery_respects_the_servers_upload_size(scene, monkeypatch):
    limit = 12_000  # bytes per message; each 128 px PNG of the tiny model is about 13 kB
    monkeypatch.setattr(discord.Guild, "filesize_limit", property(lambda _guild: limit))

    result = await scene.alice.slash(scene.channel, "imagine", prompt="a field of tulips", count=4, seed=2)

    messages = [result.response, *result.followups]
    assert len(messages) >= 2
    sizes = [[attachment.size for attachment in m.attachments] for m in messages]
    assert all(sum(group) <= limit for group in sizes)
    images = [image for m in messages for image in await images_of(m)]
    assert [image.size for image in images] == [(SIDE, SIDE)] * 4
    assert {image.format for image in images} == {"JPEG"}  # re-encoded to fit
    assert all(text_of(m).endswith(f"({i}/{len(messages)})") for i, m in enumerate(messages, 1))


async def test_long_prompt_keeps_every_message_within_2000_characters(scene, make_bot):
    await scene.env.restart_bot(await make_bot(max_prompt_length=2000))
    prompt = ("a very detailed harbour scene with boats, gulls and old houses " * 40)[:2000]

    result = await scene.alice.slash(scene.channel, "imagine", prompt=prompt, count=1, seed=8)

    assert result.response.attachments and "harbour scene" in text_of(result.response)
    assert all(len(text) <= MESSAGE_LIMIT for text in scene.contents())


async def test_echoed_prompt_never_pings_everyone_or_roles(scene):
    role = scene.guild.create_role("town", mentionable=True)
    prompt = f"@everyone @here <@&{role.id}> <@{scene.bob.id}> a parade"

    result = await scene.alice.slash(scene.channel, "imagine", prompt=prompt, count=1, seed=10)

    gallery = result.response
    assert "@everyone" in text_of(gallery) and f"<@&{role.id}>" in text_of(gallery)  # echoed, but inert:
    stored = scene.env.backend.get_message(scene.channel.id, gallery.id)  # SimCord's record of who was pinged
    assert (
        not stored.mention_everyone
        and stored.ping_role_ids == []
        and scene.bob.id not in stored.ping_user_ids
    )
    for body in scene.bodies():
        if "@everyone" in body.get("content", "") + text_displays(body.get("components") or []):
            assert body["allowed_mentions"]["parse"] == [] and not body["allowed_mentions"].get("roles")
