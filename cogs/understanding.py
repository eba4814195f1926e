"""Questions about images: mentions, replies and reply chains, /describe, and the "Ask Janus" menu."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands
from PIL import Image

from bot import prompts
from bot.client import SORRY, acknowledge, reply_privately
from bot.delivery import (
    AnswerOutput,
    InteractionOutput,
    ReplyOutput,
    ResumedInteraction,
    TokenLife,
    origin_of,
)
from bot.errors import UserFacingError
from bot.jobs import Charge, Job, Origin
from bot.media import (
    check_attachment,
    clean_text,
    is_image,
    missing_permission,
    quote,
    read_images,
    split_message,
)
from bot.places import member_contexts, pin
from bot.requests import AskRequest, Turn
from cogs.gallery import prompt_buttons

if TYPE_CHECKING:
    from bot.client import JanusBot

log = logging.getLogger(__name__)

MAX_IMAGES = 4  # images per question
MAX_TURNS = 8  # earlier messages of a reply chain given as context
MAX_HISTORY_IMAGES = 2  # images from earlier turns of a reply chain
DESCRIBE = "Describe this image in detail."
NO_ANSWER = "I don't have an answer to that. Could you rephrase it?"
TYPING_CURSOR = " ▌"
NO_PROMPTS = (
    "I couldn't write prompts for this image this time: my answer wasn't a list of prompts. "
    "Please try again, or ask me about it with `question:`."
)


class Understanding(commands.Cog):
    """Janus answers questions about images (and without them, as a language model)."""

    def __init__(self, bot: JanusBot) -> None:
        self.bot = bot
        self.decoding = asyncio.Semaphore(
            bot.settings.decode_concurrency
        )  # images downloaded and decoded at once
        self.ask_menu = app_commands.ContextMenu(name="Ask Janus", callback=self.ask_about_message)
        for command in (self.describe, self.ask_menu):
            pin(command, contexts=member_contexts(bot.settings.allow_dms))
        bot.tree.add_command(self.ask_menu)

    def output_for(self, interaction: discord.Interaction, *, dead: bool = False) -> InteractionOutput:
        token = TokenLife(interaction.created_at, self.bot.settings.interaction_token_seconds, dead=dead)
        return InteractionOutput(interaction, token)

    async def cog_load(self) -> None:
        await self.bot.backend.reattach("ask", self.deliver_reattached)  # questions that outlived a restart

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.ask_menu.name, type=self.ask_menu.type)

    # ---- the shared path -------------------------------------------------------------------------------

    async def answer(
        self,
        output: AnswerOutput,
        charge: Charge,
        *,
        user: discord.abc.User,
        guild: discord.Guild | None,
        channel: discord.abc.Messageable,
        question: str,
        images: list[Image.Image],
        history: list[Turn] | None = None,
        origin: Origin | None = None,
    ) -> None:
        """Queue, stream and deliver one admitted answer. A request that fails is refunded and the
        UserFacingError (or unexpected error) goes to the caller. With a remote backend the job outlives this
        process: a restarted bot answers it at `origin` (see `deliver_reattached`), and refunds it if
        it fails."""
        request = AskRequest(
            question,
            tuple(images),
            tuple(history or ()),
            seed=random.randrange(2**31),
            max_new_tokens=self.bot.settings.max_answer_tokens,
        )
        job: Job[str] | None = None
        try:
            job = self.bot.backend.ask(request, owner=user.id, origin=origin, charge=charge)
            self.bot.quota.queued(charge)
            async with output.working():
                answer = await self.stream(job, output)
        except UserFacingError:
            if (
                job is not None and job.elsewhere
            ):  # another process of the bot delivered it (and kept the charge)
                return
            await self.bot.quota.refund(charge)
            raise
        except BaseException:
            if job is None or not job.handed_over:  # else a restarted bot delivers it, or refunds it
                await self.bot.quota.refund(charge)
            raise
        try:
            await output.finish(split_message(answer) or [NO_ANSWER])
        except BaseException:
            await self.bot.quota.refund(charge)  # an answer the member never got is not counted
            raise
        await self.bot.quota.report(
            "ask", guild=guild, channel=channel, user=user, text=question, answer=answer
        )

    async def stream(self, job: Job[str], output: AnswerOutput) -> str:
        """Show the answer as it grows, at most once per STATUS_UPDATE_SECONDS; return the final text."""
        interval, last, shown = self.bot.settings.status_update_seconds, float("-inf"), None
        told = None
        job.changed.set()  # say at once why it waits, if it does
        while not job.done():
            await job.changed.wait()
            job.changed.clear()
            if job.notice and job.notice != told and not job.done():  # e.g. no GPU worker is online
                told = job.notice
                await output.show(f"⏳ {job.notice}")
            partial = job.progress.preview if job.progress else None
            if partial and partial != shown and not job.done() and time.perf_counter() - last >= interval:
                last, shown = time.perf_counter(), partial
                await output.show(split_message(partial)[-1][:1990] + TYPING_CURSOR)
        return await job

    # ---- questions that outlived a restart of the bot (EXECUTOR=redis) --------------------------------

    async def deliver_reattached(self, job: Job[str], request: AskRequest, origin: Origin) -> None:
        """Stream and deliver a question an earlier run of the bot was answering, as `answer` does: in a reply
        to the member's message, or into the original interaction response while its token lives; else in the
        channel it was asked in, mentioning whoever asked. A question that fails is refunded and told."""
        resumed = await ResumedInteraction.of(self.bot, origin, job.owner or 0)
        output: AnswerOutput = self.output_for(resumed, dead=resumed.expired)  # type: ignore[arg-type]
        if origin.message_id:
            try:
                output = ReplyOutput(await resumed.channel.fetch_message(origin.message_id))
            except discord.HTTPException as error:  # deleted meanwhile, or unreadable: the channel will do
                log.info("Cannot reply to message %s any more: %s", origin.message_id, error)
        try:
            answer = await self.stream(job, output)
        except UserFacingError as error:
            if job.elsewhere:  # another process of the bot claimed and delivers it
                return
            if job.charge is not None:
                await self.bot.store.refund(job.charge)
            await output.finish([str(error)])
            return
        await output.finish(split_message(answer) or [NO_ANSWER])
        await self.bot.quota.report(
            "ask",
            guild=resumed.guild,
            channel=resumed.channel,
            user=resumed.user,
            text=request.question,
            answer=answer,
        )

    # ---- mentions and replies --------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not await self.is_for_me(message):
            return
        if (missing := missing_permission(message.channel)) is not None:  # nowhere to answer: spend nothing
            log.warning(
                "Not answering %s in #%s of server %s: I lack the %s permission there",
                message.author,
                message.channel,
                message.guild and message.guild.id,
                missing,
            )
            return
        try:  # admitted (limits, cooldown, channel, queue) before anything is downloaded or fetched
            charge = await self.bot.quota.admit(
                "ask",
                guild=message.guild,
                channel=message.channel,
                user=message.author,
                text=self.strip_mention(message.content),
            )
        except UserFacingError as error:
            await self.tell(message, str(error))
            return
        try:
            try:
                question, images, history = await self.read_conversation(message)
                await self.bot.quota.moderate(
                    "ask",
                    [question, *(turn.text for turn in history)],  # all it reads
                    guild=message.guild,
                    channel=message.channel,
                    user=message.author,
                )
            except BaseException:
                await self.bot.quota.refund(charge)
                raise
            origin = Origin(
                message.guild.id if message.guild else 0, message.channel.id, message_id=message.id
            )
            await self.answer(
                ReplyOutput(message),
                charge,
                user=message.author,
                guild=message.guild,
                channel=message.channel,
                question=question,
                images=images,
                history=history,
                origin=origin,
            )
        except UserFacingError as error:
            await self.tell(message, str(error))
        except Exception:  # the member must hear back even when something unexpected broke
            log.exception("Answering message %s failed", message.id)
            await self.tell(message, SORRY)
        finally:
            self.bot.quota.release(charge)

    async def tell(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(text, mention_author=False)
        except discord.HTTPException as error:
            log.warning("Could not answer %s in %s: %s", message.author, message.channel, error)

    async def is_for_me(self, message: discord.Message) -> bool:
        """A member's message that mentions the bot, replies to it, or is a direct message."""
        me = self.bot.user
        if message.author.bot or me is None or message.author.id == me.id:
            return False
        if message.guild is None:  # answered, or politely refused when ALLOW_DMS is off
            return True
        if me in message.mentions:
            return True
        replied = await self.resolve(message)
        return replied is not None and replied.author.id == me.id

    async def read_conversation(self, message: discord.Message) -> tuple[str, list[Image.Image], list[Turn]]:
        """The question, its images and, for a reply chain with the bot, the earlier turns."""
        question = self.strip_mention(message.content)
        max_bytes = int(self.bot.settings.max_attachment_mb * 2**20)
        images = await read_images(
            message.attachments, max_bytes=max_bytes, limit=MAX_IMAGES, decoding=self.decoding
        )
        history: list[Turn] = []
        replied = await self.resolve(message)
        if replied is not None and self.bot.user and replied.author.id == self.bot.user.id:
            history = await self.earlier_turns(replied)
        elif replied is not None:  # a question about someone else's message
            pictures = [a for a in replied.attachments if is_image(a)]
            images = (
                await read_images(pictures, max_bytes=max_bytes, limit=MAX_IMAGES, decoding=self.decoding)
                + images
            )
            if not pictures and replied.content:
                question = f'About this message: "{clean_text(replied.content)[:1000]}"\n\n{question}'.strip()
        if not question:
            question = DESCRIBE if images else "Hello!"
        return question, images[:MAX_IMAGES], history

    async def earlier_turns(self, newest: discord.Message) -> list[Turn]:
        """Walk the reply chain back from the bot's message: bounded turns and images, oldest first."""
        turns: list[Turn] = []
        budget = MAX_HISTORY_IMAGES
        current: discord.Message | None = newest
        max_bytes = int(self.bot.settings.max_attachment_mb * 2**20)
        while current is not None and len(turns) < MAX_TURNS:
            if self.bot.user and current.author.id == self.bot.user.id:
                if turns and turns[-1].role == "assistant":  # an answer split over several messages
                    turns[-1] = Turn("assistant", f"{current.content}\n{turns[-1].text}")
                else:
                    turns.append(Turn("assistant", current.content))
            else:
                pictures = [a for a in current.attachments if is_image(a)][:budget]
                try:
                    images = await read_images(
                        pictures, max_bytes=max_bytes, limit=budget, decoding=self.decoding
                    )
                except UserFacingError:
                    images = []
                budget -= len(images)
                turns.append(Turn("user", self.strip_mention(current.content) or DESCRIBE, tuple(images)))
            current = await self.resolve(current)
        return turns[::-1]

    async def resolve(self, message: discord.Message) -> discord.Message | None:
        """The message this one replies to, if it still exists."""
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        if isinstance(reference.resolved, discord.Message):
            return reference.resolved
        try:
            return await message.channel.fetch_message(reference.message_id)
        except discord.HTTPException:
            return None

    def strip_mention(self, text: str) -> str:
        if self.bot.user is not None:
            text = re.sub(rf"<@!?{self.bot.user.id}>", "", text)
        return clean_text(text)

    # ---- slash command and context menu ----------------------------------------------------------------

    @app_commands.command()
    @app_commands.describe(
        image="The image to look at",
        question="What you want to know (default: four prompts that could draw it)",
    )
    async def describe(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        question: app_commands.Range[str, 1, 2000] | None = None,
    ) -> None:
        """Ask Janus about an image, or have it write prompts that could draw it."""
        if question is None:
            await self.write_prompts(interaction, image)
        else:  # a question of only invisible characters: describe it
            await self.answer_interaction(interaction, [image], clean_text(question) or DESCRIBE)

    async def write_prompts(self, interaction: discord.Interaction, attachment: discord.Attachment) -> None:
        """Up to four short prompts that could draw the image, numbered, each with an "Imagine n" button; one
        question for the limits. An answer that is no list of prompts gets a polite word instead;
        whatever else
        goes wrong once admitted, the member is told in the response and the charge is refunded."""
        max_bytes = int(self.bot.settings.max_attachment_mb * 2**20)
        try:
            check_attachment(attachment, max_bytes=max_bytes)
            charge = await self.bot.quota.admit(
                "ask",
                guild=interaction.guild,
                channel=interaction.channel,  # type: ignore[arg-type]
                user=interaction.user,
                text=prompts.QUESTION,
                typed="",
            )
        except UserFacingError as error:
            await reply_privately(interaction, str(error))
            return
        output = self.output_for(interaction)
        job: Job[str] | None = None
        try:
            await acknowledge(interaction)
            images = await read_images([attachment], max_bytes=max_bytes, limit=1, decoding=self.decoding)
            request = AskRequest(
                prompts.QUESTION,
                tuple(images),
                seed=random.randrange(2**31),
                max_new_tokens=self.bot.settings.max_answer_tokens,
            )
            origin = origin_of(interaction)
            job = self.bot.backend.ask(request, owner=interaction.user.id, origin=origin, charge=charge)
            self.bot.quota.queued(charge)
            answer = await job
            if written := prompts.parse_prompts(answer):
                ids = await self.bot.store.save_prompts(
                    interaction.guild_id or 0, interaction.user.id, written
                )
                lines = "\n".join(
                    f"{number}. {quote(prompt, prompts.MAX_PROMPT_CHARS)}"
                    for number, prompt in enumerate(written, 1)
                )
                await output.finish(
                    [f"**Prompts that could draw this image**\n{lines}"], view=prompt_buttons(ids)
                )
            else:
                await output.finish([NO_PROMPTS])
        except UserFacingError as error:
            if (
                job is not None and job.elsewhere
            ):  # another process of the bot delivered it (and kept the charge)
                return
            await self.bot.quota.refund(charge)
            await output.finish([str(error)])
            return
        except Exception:  # a bug or a failure between here and the engine: still an answer, and a refund
            log.exception("Writing prompts for %s failed", interaction.user.id)
            await self.bot.quota.refund(charge)
            await output.finish([SORRY])
            return
        except BaseException:
            if job is None or not job.handed_over:  # else a restarted bot delivers it, or refunds it
                await self.bot.quota.refund(charge)
            raise
        finally:
            self.bot.quota.release(charge)
        await self.bot.quota.report(
            "ask",
            guild=interaction.guild,
            channel=interaction.channel,  # type: ignore[arg-type]
            user=interaction.user,
            text=prompts.QUESTION,
            answer=answer,
        )

    async def ask_about_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """Context menu: ask about the images of any message (a short form asks what to ask)."""
        pictures = [a for a in message.attachments if is_image(a)]
        if not pictures:
            await reply_privately(interaction, "That message has no image to ask about.")
            return
        await interaction.response.send_modal(AskModal(self, pictures))

    async def answer_interaction(
        self, interaction: discord.Interaction, attachments: list[discord.Attachment], question: str
    ) -> None:
        """The interaction flavour: refusals are ephemeral, the answer is public. Whatever goes wrong once the
        request is admitted, the member is told in the response and the charge is refunded."""
        max_bytes = int(self.bot.settings.max_attachment_mb * 2**20)
        try:
            for attachment in attachments[:MAX_IMAGES]:
                check_attachment(attachment, max_bytes=max_bytes)
            charge = await self.bot.quota.admit(
                "ask",
                guild=interaction.guild,
                channel=interaction.channel,  # type: ignore[arg-type]
                user=interaction.user,
                text=question,
            )
        except UserFacingError as error:
            await reply_privately(interaction, str(error))
            return
        output = self.output_for(interaction)
        try:
            await acknowledge(interaction)
            try:
                images = await read_images(
                    attachments, max_bytes=max_bytes, limit=MAX_IMAGES, decoding=self.decoding
                )
            except (
                BaseException
            ):  # unreadable once downloaded: a public "thinking" message can't turn private
                await self.bot.quota.refund(charge)
                raise
            origin = origin_of(interaction)
            await self.answer(
                output,
                charge,
                user=interaction.user,
                guild=interaction.guild,
                channel=interaction.channel,  # type: ignore[arg-type]
                question=question,
                images=images,
                origin=origin,
            )
        except UserFacingError as error:
            await output.finish([str(error)])
        except Exception:  # a bug or a failure between here and the engine: still an answer
            log.exception("Answering %s's question failed", interaction.user.id)
            await output.finish([SORRY])
        finally:
            self.bot.quota.release(charge)


class AskModal(discord.ui.Modal, title="Ask Janus"):
    """The question to ask about a message's images."""

    question: discord.ui.TextInput[AskModal] = discord.ui.TextInput(
        label="Your question",
        placeholder=DESCRIBE,
        required=False,
        max_length=2000,
        style=discord.TextStyle.paragraph,
    )

    def __init__(self, cog: Understanding, attachments: list[discord.Attachment]) -> None:
        super().__init__()
        self.cog, self.attachments = cog, attachments

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.cog.answer_interaction(
            interaction, self.attachments, clean_text(self.question.value) or DESCRIBE
        )


async def setup(bot: JanusBot) -> None:
    await bot.add_cog(Understanding(bot))
