"""/imagine: one Components V2 message that shows the queue position, then the progress with the rows drawn so
far, then becomes the gallery (cogs/gallery.py has its layout and actions)."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands
from PIL import Image

from bot.client import SORRY, acknowledge, reply_privately
from bot.delivery import Delivery, ResumedInteraction, TokenLife, origin_of
from bot.errors import UserFacingError
from bot.images import encode_png
from bot.jobs import Job, Origin
from bot.media import clean_text, image_files, quote, upload_limit
from bot.places import member_contexts, pin
from bot.requests import Drawing, ImagineRequest
from bot.store import Gallery
from cogs.gallery import Lineage, gallery_caption, gallery_layout, notice_layout

if TYPE_CHECKING:
    from bot.client import JanusBot

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # px of each preview tile in the status message
PREVIEW = "preview.png"


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
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 2000],
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

    async def run(
        self, interaction: discord.Interaction, request: ImagineRequest, parent: Lineage | None = None
    ) -> None:
        """Admit, queue, show progress and deliver one /imagine request; also every new gallery a button or
        form makes (Re-roll, Vary, Remix, Imagine n), whose presser is admitted and charged the same way.
        `parent` names the gallery and image a variation keeps the top of. Whatever goes wrong once it is
        admitted, the member is told where they are looking and the charge is refunded."""
        if not request.prompt:
            await reply_privately(interaction, "Please tell me what to draw.")
            return
        try:
            charge = await self.bot.quota.admit(
                "imagine",
                guild=interaction.guild,
                channel=interaction.channel,  # type: ignore[arg-type]
                user=interaction.user,
                text=request.prompt,
            )
        except UserFacingError as error:
            await reply_privately(interaction, str(error))
            return
        delivery = Delivery(interaction, self.token_of(interaction))
        job: Job[list[Drawing]] | None = None
        try:
            # With a remote backend the job outlives this process: a restarted bot keeps editing this response
            # through the interaction's token, and refunds the charge if the job fails.
            origin = origin_of(interaction)
            job = self.bot.backend.imagine(request, owner=interaction.user.id, origin=origin, charge=charge)
            self.bot.quota.queued(charge)
            await acknowledge(interaction)
            drawings = await self.follow(job, request, delivery)
            await self.deliver(interaction, request, drawings, delivery, note=job.note, parent=parent)
        except UserFacingError as error:
            if (
                job is not None and job.elsewhere
            ):  # another process of the bot delivered it (and kept the charge)
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
            await delivery.send(f"⚠️ {text}", [], notice_layout, first=True)
        except (UserFacingError, discord.HTTPException) as error:
            log.warning("Could not tell %s why their /imagine ended (%s): %s", interaction.user, error, text)
            if delivery.token.alive:
                await reply_privately(interaction, f"⚠️ {text}")

    async def follow(
        self, job: Job[list[Drawing]], request: ImagineRequest, delivery: Delivery
    ) -> list[Drawing]:
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
            fields: dict[str, Any] = {}
            if preview is not None and preview is not shown_preview:
                shown_preview = preview
                data = await asyncio.to_thread(render_preview, preview)
                fields["attachments"] = [discord.File(io.BytesIO(data), PREVIEW)]
            # The same V2 message throughout: the status now, the gallery later (the flag cannot be removed).
            fields["view"] = notice_layout(
                status_text(job, request), PREVIEW if shown_preview is not None else None
            )
            await delivery.edit(**fields)
        return await job

    async def deliver(
        self,
        interaction: discord.Interaction,
        request: ImagineRequest,
        drawings: list[Drawing],
        delivery: Delivery,
        note: str | None = None,
        parent: Lineage | None = None,
    ) -> None:
        """Replace the status with the gallery: one message, or more when the server's upload limit needs."""
        images = [drawing.image for drawing in drawings]
        gallery_id = await self.bot.store.save_gallery(
            Gallery(
                guild_id=interaction.guild_id or 0,
                requester_id=interaction.user.id,
                prompt=request.prompt,
                count=request.count,
                guidance=request.guidance,
                temperature=request.temperature,
                seed=request.seed,
                keep=request.keep,
                parent_id=parent[0] if parent else None,
                parent_index=parent[1] if parent else None,
            ),
            [drawing.tokens for drawing in drawings],
        )
        groups = await image_files(images, f"janus_{request.seed}", limit=upload_limit(interaction.guild))
        caption = gallery_caption(request, interaction.user, images[0].size if images else (0, 0))
        if parent is not None:
            _, index, url = parent
            caption += f"\n-# 🔀 Variations of image {index + 1} of " + (
                f"[this gallery]({url})" if url else "a gallery"
            )
        elif request.keep:  # a variation whose lineage a restarted bot no longer knows
            caption += "\n-# 🔀 Variations"
        caption += f"\n-# {note}" if note else ""  # e.g. a GPU worker stopped and another one took over
        upscale = self.bot.settings.upscaling_enabled
        messages, first = [], 0
        for part, files in enumerate(groups):
            text = caption + (f" ({part + 1}/{len(groups)})" if len(groups) > 1 else "")

            def layout(
                shown: str, files: list[discord.File] = files, first: int = first, part: int = part
            ) -> discord.ui.LayoutView:
                return gallery_layout(
                    gallery_id, shown, files, first=first, shared_actions=part == 0, upscale=upscale
                )

            messages.append(await delivery.send(text, files, layout, first=part == 0))
            first += len(files)
        await self.bot.store.add_gallery_messages(
            gallery_id, messages[0].channel.id, [m.id for m in messages]
        )
        first_message = messages[0]
        await self.bot.quota.report(
            "imagine",
            guild=interaction.guild,
            channel=interaction.channel,  # type: ignore[arg-type]
            user=interaction.user,
            text=request.prompt,
            result=first_message,
            images=images,
        )

    # ---- jobs that outlived a restart of the bot (EXECUTOR=redis) -------------------------------------

    async def cog_load(self) -> None:
        await self.bot.backend.reattach("imagine", self.deliver_reattached)  # jobs that outlived a restart

    async def deliver_reattached(
        self, job: Job[list[Drawing]], request: ImagineRequest, origin: Origin
    ) -> None:
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
                await delivery.send(f"⚠️ {error}", [], notice_layout, first=True)
            except (UserFacingError, discord.HTTPException) as failure:
                log.warning(
                    "Could not tell %s why their /imagine ended (%s): %s", resumed.user, failure, error
                )


def status_text(job: Job[Any], request: ImagineRequest) -> str:
    what = f"**{quote(request.prompt, 200)}**"
    if job.position:
        ahead = job.position - 1
        waiting = f"🕐 Waiting in line: #{job.position} ({ahead} ahead) — {what}"
        return f"{waiting}\n⏳ {job.notice}" if job.notice else waiting  # e.g. no GPU worker is online
    if job.progress is None:
        return f"🎨 Starting… — {what}"
    done, total = job.progress.done, job.progress.total
    filled = round(10 * done / max(total, 1))
    bar = "▰" * filled + "▱" * (10 - filled)
    return f"🎨 Drawing {request.count} image(s): {bar} {100 * done // max(total, 1)}% — {what}"


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


async def setup(bot: JanusBot) -> None:
    await bot.add_cog(Generation(bot))
