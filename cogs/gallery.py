"""The /imagine gallery as one Components V2 message, and what members can do with it: upscale or vary one
image,
re-roll, remix the prompt, describe an image, delete; and draw one of the prompts /describe wrote. Every
button
and menu is a persistent dynamic item whose state is in SQLite, so all keep working after a restart."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Self, cast

import discord
from discord.ext import commands
from PIL import Image

from bot.client import SORRY, reply_privately
from bot.delivery import ResumedInteraction, TokenLife, origin_of
from bot.errors import JobFailed, UserFacingError
from bot.jobs import Charge, Job, Origin
from bot.media import cannot_post, clean_text, image_files, missing_permission, quote, upload_limit
from bot.requests import ImagineRequest, UpscaleRequest
from bot.store import Gallery

if TYPE_CHECKING:
    from bot.client import JanusBot
    from cogs.generation import Generation

log = logging.getLogger(__name__)

Lineage = tuple[
    int, int, str | None
]  # a variation's gallery id, image index (0-based) and link to that gallery
VARIATIONS = 4  # images a Vary draws
BUTTONS_UP_TO = 4  # a message with more images offers a select menu instead of one button per image


# ---- the layouts ----------------------------------------------------------------------------------------


def notice_layout(text: str, preview: str | None = None) -> discord.ui.LayoutView:
    """A text (a status, an error) in a container, with the named attachment shown below it if given."""
    view = discord.ui.LayoutView(timeout=None)
    container = discord.ui.Container(discord.ui.TextDisplay(text[:4000]))
    if preview is not None:
        container.add_item(discord.ui.MediaGallery(discord.MediaGalleryItem(f"attachment://{preview}")))
    view.add_item(container)
    return view


def gallery_layout(
    gallery_id: int,
    text: str,
    files: Sequence[discord.File],
    *,
    first: int = 0,
    shared_actions: bool = True,
    upscale: bool = True,
) -> discord.ui.LayoutView:
    """One message of a gallery: its text, its images (numbered from `first`, 0-based) and their actions.
    A gallery split over several messages has Re-roll, Remix and Delete on its first message only."""
    view = discord.ui.LayoutView(timeout=None)
    container = discord.ui.Container(
        discord.ui.TextDisplay(text[:4000]),
        discord.ui.MediaGallery(
            *(discord.MediaGalleryItem(f"attachment://{file.filename}") for file in files)
        ),
    )
    indices = range(first, first + len(files))
    if len(files) <= BUTTONS_UP_TO:
        if upscale:
            container.add_item(discord.ui.ActionRow[Any](*(UpscaleButton(gallery_id, i) for i in indices)))
        container.add_item(discord.ui.ActionRow[Any](*(VaryButton(gallery_id, i) for i in indices)))
    else:
        if upscale:
            container.add_item(discord.ui.ActionRow[Any](UpscaleSelect(gallery_id, first, len(files))))
        container.add_item(discord.ui.ActionRow[Any](VarySelect(gallery_id, first, len(files))))
    container.add_item(discord.ui.ActionRow[Any](DescribeSelect(gallery_id, len(files), first)))
    if shared_actions:
        container.add_item(
            discord.ui.ActionRow[Any](
                RerollButton(gallery_id), RemixButton(gallery_id), DeleteButton(gallery_id)
            )
        )
    view.add_item(container)
    return view


def upscaled_layout(record_id: int, text: str, file: discord.File) -> discord.ui.LayoutView:
    """One upscaled image, with a Delete button for whoever asked."""
    view = discord.ui.LayoutView(timeout=None)
    view.add_item(
        discord.ui.Container(
            discord.ui.TextDisplay(text[:4000]),
            discord.ui.MediaGallery(discord.MediaGalleryItem(f"attachment://{file.filename}")),
            discord.ui.ActionRow[Any](DeleteButton(record_id)),
        )
    )
    return view


def gallery_caption(request: ImagineRequest, user: discord.abc.User, size: tuple[int, int]) -> str:
    return (
        f"**{quote(request.prompt, 1500)}** — {user.mention}\n"
        f"seed `{request.seed}` · guidance {request.guidance:g} · temperature {request.temperature:g} · "
        f"{request.count} image(s) · {size[0]}×{size[1]}"
    )


def message_url(guild_id: int, channel_id: int, message_id: int) -> str:
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}/{message_id}"


# ---- pure helpers ----------------------------------------------------------------------------------------


def kept_rows(grid: int, setting: int | None) -> int:
    """How many token rows Vary keeps: VARY_KEEP_ROWS, else a third; always at least one and one fewer
    than all."""
    rows = setting if setting is not None else round(grid / 3)
    return min(max(rows, 1), grid - 1)


def variation_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s variations: new random numbers, the same for the same gallery and image."""
    digest = hashlib.sha256(f"vary:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def parse_number(text: str, low: float, high: float, name: str) -> float:
    """A number typed in a form, within bounds, or UserFacingError saying what is allowed."""
    try:
        value = float(text.strip().replace(",", "."))
    except ValueError:
        raise UserFacingError(
            f"{name} must be a number from {low:g} to {high:g}, not “{quote(text, 20)}”."
        ) from None
    if not (math.isfinite(value) and low <= value <= high):
        raise UserFacingError(f"{name} must be from {low:g} to {high:g}, not {quote(text, 20)}.")
    return value


# ---- what the buttons do ----------------------------------------------------------------------------------


class GalleryActions(commands.Cog):
    """Upscale, Vary, Re-roll, Remix, Describe and Delete under a gallery; Imagine under /describe's
    prompts."""

    def __init__(self, bot: JanusBot) -> None:
        self.bot = bot

    @property
    def generation(self) -> Generation:
        return self.bot.get_cog("Generation")  # type: ignore[return-value]

    async def known_gallery(self, interaction: discord.Interaction, gallery_id: int) -> Gallery | None:
        gallery = await self.bot.store.gallery(gallery_id)
        if gallery is None:
            await reply_privately(interaction, "I no longer know this gallery's prompt; please use /imagine.")
        return gallery

    async def known_tokens(
        self, interaction: discord.Interaction, gallery_id: int, index: int
    ) -> tuple[int, ...] | None:
        tokens = await self.bot.store.image_tokens(gallery_id, index)
        if tokens is None:
            await reply_privately(
                interaction,
                f"I no longer have image {index + 1} of this gallery; please draw it again with /imagine.",
            )
        return tokens

    async def lineage(self, gallery: Gallery) -> Lineage | None:
        """(parent gallery, image index, link to its first message) of a variation gallery."""
        if gallery.parent_id is None or gallery.parent_index is None:
            return None
        posted = await self.bot.store.gallery_messages(gallery.parent_id)
        url = message_url(gallery.guild_id, *posted[0]) if posted else None
        return gallery.parent_id, gallery.parent_index, url

    # ---- new galleries from an old one -----------------------------------------------------------------

    async def reroll(self, interaction: discord.Interaction, gallery_id: int) -> None:
        """The same prompt and settings with a new seed (a variation gallery keeps its kept rows)."""
        if (gallery := await self.known_gallery(interaction, gallery_id)) is None:
            return
        request = ImagineRequest(
            gallery.prompt,
            count=min(gallery.count, 10),
            guidance=gallery.guidance,
            temperature=gallery.temperature,
            seed=random.randrange(2**31),
            keep=gallery.keep,
        )
        await self.generation.run(interaction, request, parent=await self.lineage(gallery))

    async def vary(self, interaction: discord.Interaction, gallery_id: int, index: int) -> None:
        """Four images that keep the top rows of image `index` and redraw the rest with new random numbers."""
        if (gallery := await self.known_gallery(interaction, gallery_id)) is None:
            return
        if (tokens := await self.known_tokens(interaction, gallery_id, index)) is None:
            return
        grid = math.isqrt(len(tokens))
        keep = tokens[: kept_rows(grid, self.bot.settings.vary_keep_rows) * grid]
        request = ImagineRequest(
            gallery.prompt,
            count=VARIATIONS,
            guidance=gallery.guidance,
            temperature=gallery.temperature,
            seed=variation_seed(gallery.seed, index),
            keep=keep,
        )
        url = interaction.message.jump_url if interaction.message else None
        await self.generation.run(interaction, request, parent=(gallery_id, index, url))

    async def remix(self, interaction: discord.Interaction, gallery_id: int) -> None:
        """A form with the prompt, guidance and temperature; what is sent is drawn with the same seed."""
        if (gallery := await self.known_gallery(interaction, gallery_id)) is None:
            return
        await interaction.response.send_modal(RemixModal(gallery_id, gallery))

    @commands.Cog.listener()
    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """A submitted Remix form, whenever it was opened (see RemixModal)."""
        data: dict[str, Any] = interaction.data or {}  # type: ignore[assignment]
        if interaction.type is not discord.InteractionType.modal_submit:
            return
        if (match := REMIX_FORM.fullmatch(str(data.get("custom_id", "")))) is None:
            return
        values = submitted_values(data.get("components") or [])
        await pressed(
            interaction,
            self.remixed(
                interaction,
                int(match["gallery"]),
                values.get("prompt", ""),
                values.get("guidance", ""),
                values.get("temperature", ""),
            ),
        )

    async def remixed(
        self, interaction: discord.Interaction, gallery_id: int, prompt: str, guidance: str, temperature: str
    ) -> None:
        if (gallery := await self.known_gallery(interaction, gallery_id)) is None:
            return
        try:
            request = ImagineRequest(
                clean_text(prompt),
                count=min(gallery.count, 10),
                guidance=parse_number(guidance, 1, 10, "Guidance"),
                temperature=parse_number(temperature, 0, 1, "Temperature"),
                seed=gallery.seed,
                keep=gallery.keep,
            )
        except UserFacingError as error:
            await reply_privately(interaction, str(error))
            return
        await self.generation.run(interaction, request, parent=await self.lineage(gallery))

    async def imagine_suggested(self, interaction: discord.Interaction, prompt_id: int) -> None:
        """Draw one of the prompts /describe wrote, as /imagine would with that prompt."""
        prompt = await self.bot.store.suggested_prompt(prompt_id)
        if prompt is None:
            await reply_privately(interaction, "I no longer have that prompt; please use /imagine.")
            return
        request = ImagineRequest(
            prompt, count=self.bot.settings.images_per_prompt, seed=random.randrange(2**31)
        )
        await self.generation.run(interaction, request)

    # ---- upscale ---------------------------------------------------------------------------------------

    async def upscale(self, interaction: discord.Interaction, gallery_id: int, index: int) -> None:
        """Image `index` alone at twice the gallery's side, posted as a reply to the gallery. The presser is
        charged one generation; while it waits, the queue position is shown to them privately."""
        if (gallery := await self.known_gallery(interaction, gallery_id)) is None:
            return
        if (tokens := await self.known_tokens(interaction, gallery_id, index)) is None:
            return
        if not self.bot.settings.upscaling_enabled:
            await reply_privately(interaction, "Upscaling is turned off on this bot.")
            return
        try:  # the prompt is checked against the server's words again; its length was the first member's
            charge = await self.bot.quota.admit(
                "imagine",
                guild=interaction.guild,
                channel=interaction.channel,  # type: ignore[arg-type]
                user=interaction.user,
                text=gallery.prompt,
                typed="",
            )
        except UserFacingError as error:
            await reply_privately(interaction, str(error))
            return
        token = TokenLife(interaction.created_at, self.bot.settings.interaction_token_seconds)
        job: Job[Image.Image] | None = None
        try:
            # The pressed message: a restarted bot (EXECUTOR=redis) posts the upscale as a reply to it.
            origin = dataclasses.replace(
                origin_of(interaction), message_id=interaction.message.id if interaction.message else 0
            )
            request = UpscaleRequest(tokens, gallery_id, index)
            job = self.bot.backend.upscale(request, owner=interaction.user.id, origin=origin, charge=charge)
            self.bot.quota.queued(charge)
            try:
                await interaction.response.defer(ephemeral=True, thinking=True)
            except discord.HTTPException as error:
                token.refused(error)
                log.warning("Could not acknowledge %s's upscale (%s); it goes ahead", interaction.user, error)
            image = await self.follow_privately(interaction, token, job, f"image {index + 1}")
            reference = (
                interaction.message.to_reference(fail_if_not_exists=False) if interaction.message else None
            )
            message = await self.post_upscaled(interaction, token, request, gallery, image, reference)
        except UserFacingError as error:
            # Another process of the bot delivered it (and kept the charge).
            if job is not None and job.elsewhere:
                return
            await self.bot.quota.refund(charge)
            await self.tell(interaction, token, f"⚠️ {error}")
            return
        except Exception:  # a bug or a failure between here and the engine: still an answer, and a refund
            log.exception("Upscaling for %s failed", interaction.user.id)
            await self.bot.quota.refund(charge)
            await self.tell(interaction, token, f"⚠️ {SORRY}")
            return
        except BaseException:
            if job is None or not job.handed_over:
                await self.bot.quota.refund(charge)
            raise
        finally:
            self.bot.quota.release(charge)
        await self.posted(interaction, charge, gallery, message, image)

    async def posted(
        self,
        interaction: discord.Interaction,
        charge: Charge | None,
        gallery: Gallery,
        message: discord.Message | None,
        image: Image.Image,
    ) -> None:
        """Refund an upscale that had nowhere to go (the presser was told which permission is missing), else
        log it where the server logs what members make."""
        if message is None:
            if charge is not None:
                await self.bot.quota.refund(charge)
            return
        await self.bot.quota.report(
            "imagine",
            guild=interaction.guild,
            channel=interaction.channel,  # type: ignore[arg-type]
            user=interaction.user,
            text=gallery.prompt,
            result=message,
            images=[image],
        )

    # ---- upscales that outlived a restart of the bot (EXECUTOR=redis) ----------------------------------

    async def cog_load(self) -> None:
        await self.bot.backend.reattach("upscale", self.deliver_reattached)

    async def deliver_reattached(
        self, job: Job[Image.Image], request: UpscaleRequest, origin: Origin
    ) -> None:
        """Post an upscale an earlier run of the bot was waiting for, as `upscale` does: as a reply to the
        gallery, with the link in the presser's private response while its token lives. One that fails is
        refunded and the presser told: privately while the token lives, else in the channel."""
        resumed = await ResumedInteraction.of(self.bot, origin, job.owner or 0)
        interaction = cast(discord.Interaction, resumed)  # it offers what posting an upscale uses of one
        token = TokenLife(
            resumed.created_at, self.bot.settings.interaction_token_seconds, dead=resumed.expired
        )
        try:
            image = await self.follow_privately(interaction, token, job, f"image {request.index + 1}")
            gallery = await self.bot.store.gallery(request.gallery_id)
            if gallery is None:
                raise JobFailed("I no longer know that gallery; please draw it again with /imagine.")
            reference = (  # the gallery message it was pressed on
                discord.MessageReference(
                    message_id=origin.message_id, channel_id=origin.channel_id, fail_if_not_exists=False
                )
                if origin.message_id
                else None
            )
            message = await self.post_upscaled(interaction, token, request, gallery, image, reference)
        except UserFacingError as error:
            if job.elsewhere:  # another process of the bot claimed and delivers it
                return
            await self.refund_and_tell(resumed, token, job.charge, f"⚠️ {error}")
            return
        except Exception:  # a bug between the job's end and the post: still an answer, and a refund
            log.exception("Posting the re-attached upscale for %s failed", resumed.user.id)
            await self.refund_and_tell(resumed, token, job.charge, f"⚠️ {SORRY}")
            return
        await self.posted(interaction, job.charge, gallery, message, image)

    async def refund_and_tell(
        self, resumed: ResumedInteraction, token: TokenLife, charge: Charge | None, text: str
    ) -> None:
        """Refund a re-attached upscale and tell its presser why: privately while the token lives, else (or
        should that edit fail) in the channel."""
        if charge is not None:
            await self.bot.store.refund(charge)
        if token.alive:
            try:
                await resumed.edit_original_response(content=text)
                return
            except discord.HTTPException as error:
                token.refused(error)
        try:
            await resumed.channel.send(
                f"{resumed.user.mention} {text}",
                allowed_mentions=discord.AllowedMentions(users=[resumed.user]),
            )
        except discord.HTTPException as error:
            log.warning("Could not tell %s why their upscale ended (%s): %s", resumed.user, error, text)

    async def post_upscaled(
        self,
        interaction: discord.Interaction,
        token: TokenLife,
        request: UpscaleRequest,
        gallery: Gallery,
        image: Image.Image,
        reference: discord.MessageReference | None,
    ) -> discord.Message | None:
        """Post the upscaled image as a reply to the gallery (`reference`), with a Delete button for the
        presser; None if the bot cannot post in the channel."""
        gallery_id, index, tokens = request.gallery_id, request.index, request.tokens
        record = await self.bot.store.save_gallery(
            Gallery(
                guild_id=interaction.guild_id or 0,
                requester_id=interaction.user.id,
                prompt=gallery.prompt,
                count=1,
                guidance=gallery.guidance,
                temperature=gallery.temperature,
                seed=gallery.seed,
                parent_id=gallery_id,
                parent_index=index,
            ),
            [tokens],
        )
        [[file]] = await image_files(
            [image], f"janus_{gallery.seed}_{index + 1}_upscaled", limit=upload_limit(interaction.guild)
        )
        text = (
            f"**{quote(gallery.prompt, 1500)}** — {interaction.user.mention}\n"
            f"-# Image {index + 1}, upscaled to {image.width}×{image.height}"
        )
        message = await self.post_reply(
            interaction, token, upscaled_layout(record, text, file), file, reference
        )
        if message is not None:
            await self.bot.store.add_gallery_messages(record, message.channel.id, [message.id])
            await self.tell(interaction, token, f"Here it is: {message.jump_url}")
        return message

    async def follow_privately(
        self, interaction: discord.Interaction, token: TokenLife, job: Job[Any], what: str
    ) -> Any:
        """Show the presser their place in line, then that it runs; return the job's result."""
        interval, last, shown = self.bot.settings.status_update_seconds, float("-inf"), ""
        job.changed.set()
        while not job.done():
            await job.changed.wait()
            job.changed.clear()
            if job.done() or time.perf_counter() - last < interval:
                continue
            last = time.perf_counter()
            text = (
                f"🕐 Waiting in line: #{job.position} — upscaling {what}"
                if job.position
                else f"🔍 Upscaling {what}…"
            )
            if text != shown:
                shown = text
                await self.tell(interaction, token, text)
        return await job

    async def tell(self, interaction: discord.Interaction, token: TokenLife, text: str) -> None:
        """Edit the presser's private response while its token lives (or answer privately, before it was
        acknowledged); a missed update is harmless."""
        if not interaction.response.is_done():
            await reply_privately(interaction, text)
            return
        if not token.alive:
            return
        try:
            await interaction.edit_original_response(content=text)
        except discord.HTTPException as error:
            token.refused(error)
            log.debug("Could not update %s's private status: %s", interaction.user, error)

    async def post_reply(
        self,
        interaction: discord.Interaction,
        token: TokenLife,
        view: discord.ui.LayoutView,
        file: discord.File,
        reference: discord.MessageReference | None,
    ) -> discord.Message | None:
        """Reply to the gallery, pinging the presser; in the channel if replying is refused; None (and the
        presser told which permission is missing) if the bot cannot post there at all."""
        channel, user = interaction.channel, interaction.user
        mentions = discord.AllowedMentions(users=[user], replied_user=False)
        for attempt in [reference, None] if reference else [None]:
            file.reset()
            try:
                return await channel.send(  # type: ignore[union-attr]  # a button's message has a channel
                    view=view,
                    file=file,
                    reference=attempt,  # type: ignore[call-overload]
                    allowed_mentions=mentions,
                )
            except discord.Forbidden as error:
                log.info("Could not post an upscaled image in #%s (%s)", channel, error)
            except discord.HTTPException as error:
                log.warning("Could not post an upscaled image in #%s: %s", channel, error)
        missing = missing_permission(channel, files=True)
        await self.tell(interaction, token, cannot_post(missing))
        return None

    # ---- describe, delete ------------------------------------------------------------------------------

    async def describe(self, interaction: discord.Interaction, index: int) -> None:
        """Ask Janus about the `index`-th image of this message (counted in this message)."""
        attachments = interaction.message.attachments if interaction.message else []
        if not 0 <= index < len(attachments):
            await reply_privately(interaction, "That image is no longer there.")
            return
        understanding = self.bot.get_cog("Understanding")
        await understanding.answer_interaction(  # type: ignore[union-attr]  # the cog is always loaded
            interaction, [attachments[index]], "Describe this image in detail."
        )

    async def delete(self, interaction: discord.Interaction, gallery_id: int) -> None:
        """Delete every message of the gallery, for whoever asked for it or a moderator."""
        gallery = await self.bot.store.gallery(gallery_id)
        permissions = interaction.permissions
        if not (gallery and gallery.requester_id == interaction.user.id) and not permissions.manage_messages:
            await reply_privately(
                interaction, "Only the person who asked for these images, or a moderator, can delete them."
            )
            return
        pressed = interaction.message
        others = [
            message_id
            for channel_id, message_id in await self.bot.store.gallery_messages(gallery_id)
            if pressed is None or message_id != pressed.id
        ]
        try:
            if pressed is not None:
                await pressed.delete()
            for message_id in others:
                try:
                    await interaction.channel.get_partial_message(message_id).delete()  # type: ignore[union-attr]
                except discord.NotFound:
                    pass  # deleted already
        except discord.HTTPException as error:
            await reply_privately(
                interaction, f"I couldn't delete that message ({error.text or error.status})."
            )
            return
        await reply_privately(interaction, "Deleted.")


async def pressed(interaction: discord.Interaction, action: Awaitable[None]) -> None:
    """Run a button's, menu's or form's action. discord.py only logs what a dynamic item raises, so what goes
    wrong is told to whoever pressed it here."""
    try:
        await action
    except UserFacingError as error:
        await reply_privately(interaction, str(error))
    except Exception:
        log.exception(
            "A button or menu under message %s failed", interaction.message and interaction.message.id
        )
        await reply_privately(interaction, SORRY)


def actions(interaction: discord.Interaction) -> GalleryActions:
    return interaction.client.get_cog("GalleryActions")  # type: ignore[attr-defined,return-value]


# ---- persistent components: the custom id carries the gallery (or prompt) id and the image ---------------


class UpscaleButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"janus:up:(?P<gallery>\d+):(?P<i>\d+)"
):
    def __init__(self, gallery_id: int, index: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"U{index + 1}",
                style=discord.ButtonStyle.secondary,
                custom_id=f"janus:up:{gallery_id}:{index}",
            )
        )
        self.gallery_id, self.index = gallery_id, index

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["gallery"]), int(match["i"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, actions(interaction).upscale(interaction, self.gallery_id, self.index))


class VaryButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"janus:vary:(?P<gallery>\d+):(?P<i>\d+)"
):
    def __init__(self, gallery_id: int, index: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"V{index + 1}",
                style=discord.ButtonStyle.secondary,
                custom_id=f"janus:vary:{gallery_id}:{index}",
            )
        )
        self.gallery_id, self.index = gallery_id, index

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["gallery"]), int(match["i"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, actions(interaction).vary(interaction, self.gallery_id, self.index))


def image_options(first: int, count: int) -> list[discord.SelectOption]:
    return [
        discord.SelectOption(label=f"Image {i + 1}", value=str(i))
        for i in range(first, first + max(count, 1))
    ]


class UpscaleSelect(
    discord.ui.DynamicItem[discord.ui.Select],
    template=r"janus:upsel:(?P<gallery>\d+):(?P<first>\d+):(?P<n>\d+)",
):
    def __init__(self, gallery_id: int, first: int, count: int) -> None:
        super().__init__(
            discord.ui.Select(
                placeholder="🔍 Upscale an image…",
                options=image_options(first, count),
                custom_id=f"janus:upsel:{gallery_id}:{first}:{count}",
            )
        )
        self.gallery_id = gallery_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["gallery"]), int(match["first"]), int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        index = int(self.item.values[0])
        await pressed(interaction, actions(interaction).upscale(interaction, self.gallery_id, index))


class VarySelect(
    discord.ui.DynamicItem[discord.ui.Select],
    template=r"janus:varysel:(?P<gallery>\d+):(?P<first>\d+):(?P<n>\d+)",
):
    def __init__(self, gallery_id: int, first: int, count: int) -> None:
        super().__init__(
            discord.ui.Select(
                placeholder="🔀 Vary an image…",
                options=image_options(first, count),
                custom_id=f"janus:varysel:{gallery_id}:{first}:{count}",
            )
        )
        self.gallery_id = gallery_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["gallery"]), int(match["first"]), int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        index = int(self.item.values[0])
        await pressed(interaction, actions(interaction).vary(interaction, self.gallery_id, index))


class DescribeSelect(
    discord.ui.DynamicItem[discord.ui.Select],
    template=r"janus:describe:(?P<gallery>\d+):(?P<n>\d+)(?::(?P<first>\d+))?",
):
    """Its values count the images of its own message (so galleries posted before V2 keep working); the labels
    number them across the gallery."""

    def __init__(self, gallery_id: int, count: int, first: int = 0) -> None:
        options = [
            discord.SelectOption(label=f"Image {first + i + 1}", value=str(i)) for i in range(max(count, 1))
        ]
        custom_id = f"janus:describe:{gallery_id}:{count}" + (f":{first}" if first else "")
        super().__init__(
            discord.ui.Select(placeholder="💬 Describe an image…", options=options, custom_id=custom_id)
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["gallery"]), int(match["n"]), int(match["first"] or 0))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, actions(interaction).describe(interaction, int(self.item.values[0])))


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"janus:reroll:(?P<gallery>\d+)"):
    def __init__(self, gallery_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Re-roll",
                emoji="🎲",
                style=discord.ButtonStyle.primary,
                custom_id=f"janus:reroll:{gallery_id}",
            )
        )
        self.gallery_id = gallery_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["gallery"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, actions(interaction).reroll(interaction, self.gallery_id))


class RemixButton(discord.ui.DynamicItem[discord.ui.Button], template=r"janus:remix:(?P<gallery>\d+)"):
    def __init__(self, gallery_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Remix",
                emoji="🖌️",
                style=discord.ButtonStyle.primary,
                custom_id=f"janus:remix:{gallery_id}",
            )
        )
        self.gallery_id = gallery_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["gallery"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, actions(interaction).remix(interaction, self.gallery_id))


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"janus:delete:(?P<gallery>\d+)"):
    def __init__(self, gallery_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Delete",
                emoji="🗑️",
                style=discord.ButtonStyle.danger,
                custom_id=f"janus:delete:{gallery_id}",
            )
        )
        self.gallery_id = gallery_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["gallery"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, actions(interaction).delete(interaction, self.gallery_id))


class ImaginePromptButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"janus:imagine:(?P<prompt>\d+):(?P<n>\d+)"
):
    """ "Imagine n" under the prompts /describe wrote."""

    def __init__(self, prompt_id: int, number: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"Imagine {number}",
                emoji="🎨",
                style=discord.ButtonStyle.secondary,
                custom_id=f"janus:imagine:{prompt_id}:{number}",
            )
        )
        self.prompt_id = prompt_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        return cls(int(match["prompt"]), int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, actions(interaction).imagine_suggested(interaction, self.prompt_id))


def prompt_buttons(prompt_ids: Sequence[int]) -> discord.ui.View:
    """Imagine 1 … Imagine n, one per prompt."""
    view = discord.ui.View(timeout=None)
    for number, prompt_id in enumerate(prompt_ids, 1):
        view.add_item(ImaginePromptButton(prompt_id, number))
    return view


class RemixModal(discord.ui.Modal):
    """The gallery's prompt, guidance and temperature, to edit; drawn with the same seed. The form is not
    kept in
    memory: `GalleryActions.on_interaction` reads each submission from its custom id and values alone, so
    a form
    opened before a restart still works after it."""

    def __init__(self, gallery_id: int, gallery: Gallery) -> None:
        super().__init__(title="Remix", custom_id=f"janus:remix-form:{gallery_id}", timeout=None)
        self.add_item(
            discord.ui.TextInput(
                label="Prompt",
                default=gallery.prompt[:2000],
                max_length=2000,
                style=discord.TextStyle.paragraph,
                custom_id="prompt",
            )
        )
        self.add_item(
            discord.ui.TextInput(
                label="Guidance (1-10)", default=f"{gallery.guidance:g}", max_length=8, custom_id="guidance"
            )
        )
        self.add_item(
            discord.ui.TextInput(
                label="Temperature (0-1)",
                default=f"{gallery.temperature:g}",
                max_length=8,
                custom_id="temperature",
            )
        )
        self.stop()  # a finished modal is not stored by send_modal: every submission goes to the listener


REMIX_FORM = re.compile(r"janus:remix-form:(?P<gallery>\d+)")


def submitted_values(components: Sequence[Any]) -> dict[str, str]:
    """custom id -> value of every text input in a modal submission's components (rows and labels nest
    them)."""
    values: dict[str, str] = {}
    for component in components:
        if isinstance(component.get("value"), str) and component.get("custom_id"):
            values[component["custom_id"]] = component["value"]
        nested = component.get("components") or (
            [component["component"]] if component.get("component") else []
        )
        values.update(submitted_values(nested))
    return values


DYNAMIC_ITEMS = (
    UpscaleButton,
    VaryButton,
    UpscaleSelect,
    VarySelect,
    DescribeSelect,
    RerollButton,
    RemixButton,
    DeleteButton,
    ImaginePromptButton,
)


async def setup(bot: JanusBot) -> None:
    bot.add_dynamic_items(*DYNAMIC_ITEMS)
    await bot.add_cog(GalleryActions(bot))
