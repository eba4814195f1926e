"""/imagine: a live status (queue position, progress, row-by-row previews), then a gallery with buttons."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import re
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands
from PIL import Image

from bot.client import SORRY, acknowledge, reply_privately
from bot.delivery import Delivery, ResumedInteraction, TokenLife
from bot.errors import UserFacingError
from bot.images import encode_png
from bot.jobs import Job, Origin
from bot.media import clean_text, image_files, quote, upload_limit
from bot.places import member_contexts, pin
from bot.requests import Drawing, ImagineRequest
from bot.store import Gallery

if TYPE_CHECKING:
    from bot.client import JanusBot

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # px of each preview tile in the status message


class Generation(commands.Cog):
    """Draws images with Janus-Pro and upscales them."""

    def __init__(self, bot: JanusBot) -> None:
        self.bot = bot
        pin(self.imagine, contexts=member_contexts(bot.settings.allow_dms))

    def token_of(self, interaction: discord.Interaction, *, dead: bool = False) -> TokenLife:
        return TokenLife(interaction.created_at, self.bot.settings.interaction_token_seconds, dead=dead)

    @app_commands.command()
    @app_commands.describe(
        prompt="What to draw",
        count="How many images (1-10)",
        guidance="How closely to follow the prompt (1-10, default 5)",
        temperature="Randomness (0-1, default 1; 0 always picks the likeliest)",
        seed="Same seed and settings, same images",
    )
    async def imagine(
        self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 2000],
        count: app_commands.Range[int, 1, 10] | None = None,
        guidance: app_commands.Range[float, 1.0, 10.0] | None = None,
        temperature: app_commands.Range[float, 0.0, 1.0] | None = None,
        seed: app_commands.Range[int, 0, 2**31 - 1] | None = None,
    ) -> None:
        """Draw images from a prompt."""
        request = ImagineRequest(
            prompt=clean_text(prompt),
            count=count or self.bot.settings.images_per_prompt,
            guidance=5.0 if guidance is None else guidance,
            temperature=1.0 if temperature is None else temperature,
            seed=random.randrange(2**31) if seed is None else seed,
        )
        await self.run(interaction, request)

    async def run(self, interaction: discord.Interaction, request: ImagineRequest) -> None:
        """Admit, queue, show progress and deliver one /imagine request (also used by Re-roll). Whatever goes
        wrong once it is admitted, the member is told where they are looking and the charge is refunded."""
        if not request.prompt:
            await reply_privately(interaction, "Please tell me what to draw.")
            return
        try:
            charge = await self.bot.quota.admit("imagine", guild=interaction.guild, channel=interaction.channel,  # type: ignore[arg-type]
                                                user=interaction.user, text=request.prompt)
        except UserFacingError as error:
            await reply_privately(interaction, str(error))
            return
        delivery = Delivery(interaction, self.token_of(interaction))
        job: Job[list[Drawing]] | None = None
        try:
            # With a remote backend the job outlives this process: a restarted bot keeps editing this response
            # through the interaction's token, and refunds the charge if the job fails.
            origin = Origin(interaction.guild_id or 0, interaction.channel_id or 0, interaction.application_id,
                            interaction.token, created_at=interaction.created_at.timestamp())
            job = self.bot.backend.imagine(request, owner=interaction.user.id, origin=origin, charge=charge)
            self.bot.quota.queued(charge)
            await acknowledge(interaction)
            drawings = await self.follow(job, request, delivery)
            await self.deliver(interaction, request, drawings, delivery, note=job.note)
        except UserFacingError as error:
            if job is not None and job.elsewhere:  # another process of the bot delivered it (and kept the charge)
                return
            await self.bot.quota.refund(charge)
            await self.tell(interaction, delivery, str(error))
        except Exception:  # a bug or a failure between here and the engine: still an answer, and a refund
            log.exception("/imagine for %s failed", interaction.user.id)
            await self.bot.quota.refund(charge)
            await self.tell(interaction, delivery, SORRY)
        except BaseException:
            if job is None or not job.handed_over:  # else a restarted bot delivers it, or refunds it
                await self.bot.quota.refund(charge)
            raise
        finally:
            self.bot.quota.release(charge)

    async def tell(self, interaction: discord.Interaction, delivery: Delivery, text: str) -> None:
        """Say why a request ended without images where its member looks: before it was acknowledged,
        privately; then in the status message, else in the channel, else (while the token lives) privately."""
        if not interaction.response.is_done():
            await reply_privately(interaction, text)
            return
        try:
            await delivery.send(f"⚠️ {text}", [], None, first=True)
        except (UserFacingError, discord.HTTPException) as error:
            log.warning("Could not tell %s why their /imagine ended (%s): %s", interaction.user, error, text)
            if delivery.token.alive:
                await reply_privately(interaction, f"⚠️ {text}")

    async def follow(self, job: Job[list[Drawing]], request: ImagineRequest,
                     delivery: Delivery) -> list[Drawing]:
        """Keep the status message current until the job is done; return its drawings."""
        interval, last = self.bot.settings.status_update_seconds, float("-inf")
        shown_preview = None
        job.changed.set()  # show the queue position at once, not only once it changes
        while not job.done():
            await job.changed.wait()
            job.changed.clear()
            if job.done() or time.perf_counter() - last < interval:
                continue
            last = time.perf_counter()
            preview = job.progress.preview if job.progress else None
            fields: dict[str, Any] = {"content": status_text(job, request)}
            if preview is not None and preview is not shown_preview:
                shown_preview = preview
                data = await asyncio.to_thread(render_preview, preview)
                fields["attachments"] = [discord.File(io.BytesIO(data), "preview.png")]
            await delivery.edit(**fields)
        return await job

    async def deliver(self, interaction: discord.Interaction, request: ImagineRequest, drawings: list[Drawing],
                      delivery: Delivery, note: str | None = None) -> None:
        images = [drawing.image for drawing in drawings]
        gallery_id = await self.bot.store.save_gallery(
            Gallery(guild_id=interaction.guild_id or 0, requester_id=interaction.user.id, prompt=request.prompt,
                    count=request.count, guidance=request.guidance, temperature=request.temperature,
                    seed=request.seed)
        )
        groups = await image_files(images, f"janus_{request.seed}", limit=upload_limit(interaction.guild))
        caption = gallery_caption(request, interaction.user, images[0].size if images else (0, 0))
        caption += f"\n-# {note}" if note else ""  # e.g. a GPU worker stopped and another one took over
        first_message = None
        for index, files in enumerate(groups):
            part = f" ({index + 1}/{len(groups)})" if len(groups) > 1 else ""
            view = GalleryView(gallery_id, len(files)) if index == 0 else None
            message = await delivery.send(caption + part, files, view, first=index == 0)
            first_message = first_message or message
        await self.bot.quota.report("imagine", guild=interaction.guild, channel=interaction.channel,  # type: ignore[arg-type]
                                    user=interaction.user, text=request.prompt, result=first_message,
                                    images=images)

    # ---- jobs that outlived a restart of the bot (EXECUTOR=redis) -------------------------------------

    async def cog_load(self) -> None:
        await self.bot.backend.reattach("imagine", self.deliver_reattached)  # jobs that outlived a restart

    async def deliver_reattached(self, job: Job[list[Drawing]], request: ImagineRequest,
                                 origin: Origin) -> None:
        """Show and deliver a job an earlier run of the bot was waiting for, as `run` does: its status and
        gallery go into the original response while the interaction's token lives, else to the channel it was
        asked in, mentioning whoever asked. A job that fails is refunded."""
        resumed = await ResumedInteraction.of(self.bot, origin, job.owner or 0)
        delivery = Delivery(resumed, self.token_of(resumed, dead=resumed.expired))  # type: ignore[arg-type]
        try:
            drawings = await self.follow(job, request, delivery)
            await self.deliver(resumed, request, drawings, delivery, note=job.note)  # type: ignore[arg-type]
        except UserFacingError as error:
            if job.elsewhere:  # another process of the bot claimed and delivers it
                return
            if job.charge is not None:
                await self.bot.store.refund(job.charge)
            try:
                await delivery.send(f"⚠️ {error}", [], None, first=True)
            except (UserFacingError, discord.HTTPException) as failure:
                log.warning("Could not tell %s why their /imagine ended (%s): %s", resumed.user, failure, error)

    # ---- buttons ---------------------------------------------------------------------------------------

    async def reroll(self, interaction: discord.Interaction, gallery_id: int) -> None:
        gallery = await self.bot.store.gallery(gallery_id)
        if gallery is None:
            await reply_privately(interaction, "I no longer know this gallery's prompt; please use /imagine.")
            return
        count = min(gallery.count, 10)
        await self.run(interaction, ImagineRequest(gallery.prompt, count=count, guidance=gallery.guidance,
                                                   temperature=gallery.temperature, seed=random.randrange(2**31)))

    async def delete(self, interaction: discord.Interaction, gallery_id: int) -> None:
        gallery = await self.bot.store.gallery(gallery_id)
        permissions = interaction.permissions
        if not (gallery and gallery.requester_id == interaction.user.id) and not permissions.manage_messages:
            await reply_privately(interaction, "Only the person who asked for these images, or a moderator, "
                                               "can delete them.")
            return
        try:
            await interaction.message.delete()  # type: ignore[union-attr]
        except discord.HTTPException as error:
            await reply_privately(interaction, f"I couldn't delete that message ({error.text or error.status}).")
            return
        await reply_privately(interaction, "Deleted.")

    async def describe(self, interaction: discord.Interaction, index: int) -> None:
        attachments = interaction.message.attachments if interaction.message else []
        if not 0 <= index < len(attachments):
            await reply_privately(interaction, "That image is no longer there.")
            return
        understanding = self.bot.get_cog("Understanding")
        await understanding.answer_interaction(interaction, [attachments[index]], "Describe this image in detail.")  # type: ignore[union-attr]


def status_text(job: Job[Any], request: ImagineRequest) -> str:
    what = f"**{quote(request.prompt, 200)}**"
    if job.position:
        ahead = job.position - 1
        return f"🕐 Waiting in line: #{job.position} ({ahead} ahead) — {what}"
    if job.progress is None:
        return f"🎨 Starting… — {what}"
    done, total = job.progress.done, job.progress.total
    filled = round(10 * done / max(total, 1))
    return f"🎨 Drawing {request.count} image(s): {'▰' * filled}{'▱' * (10 - filled)} {100 * done // max(total, 1)}% — {what}"


def gallery_caption(request: ImagineRequest, user: discord.abc.User, size: tuple[int, int]) -> str:
    return (f"**{quote(request.prompt, 1500)}** — {user.mention}\n"
            f"seed `{request.seed}` · guidance {request.guidance:g} · temperature {request.temperature:g} · "
            f"{request.count} image(s) · {size[0]}×{size[1]}")


def render_preview(images: list[Image.Image]) -> bytes:
    return encode_png(contact_sheet(images))


def contact_sheet(images: list[Image.Image], columns: int = 4) -> Image.Image:
    """Previews side by side (up to `columns` per row), each shrunk to PREVIEW_SIDE."""
    tiles = [image.resize((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.NEAREST) for image in images]
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * PREVIEW_SIDE, rows * PREVIEW_SIDE), (32, 32, 32))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % cols) * PREVIEW_SIDE, (index // cols) * PREVIEW_SIDE))
    return sheet


# ---- persistent components: they carry the gallery id, so they keep working after a restart -----------


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"janus:reroll:(?P<gallery>\d+)"):
    def __init__(self, gallery_id: int) -> None:
        super().__init__(discord.ui.Button(label="Re-roll", emoji="🎲", style=discord.ButtonStyle.primary,
                                           custom_id=f"janus:reroll:{gallery_id}"))
        self.gallery_id = gallery_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: re.Match[str]) -> RerollButton:
        return cls(int(match["gallery"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, generation_cog(interaction).reroll(interaction, self.gallery_id))


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"janus:delete:(?P<gallery>\d+)"):
    def __init__(self, gallery_id: int) -> None:
        super().__init__(discord.ui.Button(label="Delete", emoji="🗑️", style=discord.ButtonStyle.danger,
                                           custom_id=f"janus:delete:{gallery_id}"))
        self.gallery_id = gallery_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: re.Match[str]) -> DeleteButton:
        return cls(int(match["gallery"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, generation_cog(interaction).delete(interaction, self.gallery_id))


class DescribeSelect(discord.ui.DynamicItem[discord.ui.Select], template=r"janus:describe:(?P<gallery>\d+):(?P<n>\d+)"):
    def __init__(self, gallery_id: int, count: int) -> None:
        options = [discord.SelectOption(label=f"Image {i + 1}", value=str(i)) for i in range(max(count, 1))]
        super().__init__(discord.ui.Select(placeholder="🔍 Describe an image…", options=options,
                                           custom_id=f"janus:describe:{gallery_id}:{count}"))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Select,
                             match: re.Match[str]) -> DescribeSelect:
        return cls(int(match["gallery"]), int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await pressed(interaction, generation_cog(interaction).describe(interaction, int(self.item.values[0])))


class GalleryView(discord.ui.View):
    """Re-roll, Delete and Describe under a gallery; built from persistent dynamic items."""

    def __init__(self, gallery_id: int, count: int) -> None:
        super().__init__(timeout=None)
        self.add_item(RerollButton(gallery_id))
        self.add_item(DeleteButton(gallery_id))
        self.add_item(DescribeSelect(gallery_id, count))


async def pressed(interaction: discord.Interaction, action: Awaitable[None]) -> None:
    """Run a button's or menu's action. discord.py only logs what a dynamic item raises, so what goes wrong is
    told to whoever pressed it here."""
    try:
        await action
    except UserFacingError as error:
        await reply_privately(interaction, str(error))
    except Exception:
        log.exception("A button or menu under message %s failed", interaction.message and interaction.message.id)
        await reply_privately(interaction, SORRY)


def generation_cog(interaction: discord.Interaction) -> Generation:
    return interaction.client.get_cog("Generation")  # type: ignore[attr-defined,return-value]


async def setup(bot: JanusBot) -> None:
    bot.add_dynamic_items(RerollButton, DeleteButton, DescribeSelect)
    await bot.add_cog(Generation(bot))
