"""Where results go on Discord: a gallery into the interaction's original response (else the channel), an
answer streamed into a reply or into the response; and, for a job that outlived a restart of the bot
(EXECUTOR=redis), the interaction as the restarted bot still has it, so that the same code shows and delivers
it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import discord
from discord.utils import MISSING

# discord.py's own helper for building a webhook call's payload (not in its public API): editing a response
# through a resumed webhook must lay out files and components exactly as discord.py does.
from discord.webhook.async_ import (
    async_context,
    handle_message_parameters,  # pyright: ignore[reportPrivateImportUsage]
)

from bot.errors import UserFacingError
from bot.jobs import Origin
from bot.media import cannot_post, missing_permission, with_prefix

log = logging.getLogger(__name__)

# Discord's answers to a token it will never take again: 404 Unknown Webhook / Unknown Interaction before it
# was used, and, 15 minutes after the interaction, 401 Invalid Webhook Token. Each refusal counts against the
# bot's IP (10,000 invalid requests in 10 minutes ban it), so a token is dropped after the first.
DEAD_TOKEN_CODES = frozenset({10015, 10062, 50027})


def token_refused(error: discord.HTTPException) -> bool:
    """Whether `error` says the interaction's token is dead (unknown or expired), not a passing failure."""
    return error.status in (401, 404) or error.code in DEAD_TOKEN_CODES


def origin_of(interaction: discord.Interaction) -> Origin:
    """Where an interaction's job comes from, kept with the job: its server and channel, its application id
    and token (to edit the response), and when it was made (the token's age)."""
    return Origin(
        interaction.guild_id or 0,
        interaction.channel_id or 0,
        interaction.application_id,
        interaction.token,
        created_at=interaction.created_at.timestamp(),
    )


@dataclass
class TokenLife:
    """Whether an interaction's token may still be used: young enough, and never refused by Discord."""

    created_at: datetime
    max_seconds: float  # INTERACTION_TOKEN_SECONDS: a little less than Discord's 15 minutes
    dead: bool = False

    @property
    def alive(self) -> bool:
        if not self.dead and (discord.utils.utcnow() - self.created_at).total_seconds() >= self.max_seconds:
            log.info(
                "An interaction token is %.0f s old; posting in the channel from now on", self.max_seconds
            )
            self.dead = True
        return not self.dead

    def refused(self, error: discord.HTTPException) -> bool:
        """Note Discord's refusal; True (and the token is dropped) when it means the token is dead."""
        if token_refused(error):
            self.dead = True
        return self.dead


@dataclass
class Delivery:
    """Where a gallery goes: the interaction's original response while its token lives (young enough, never
    refused), else the channel. Every message is Components V2 (a status, an error, a gallery), built by a
    `layout` from its text."""

    interaction: discord.Interaction
    token: TokenLife

    async def edit(self, **fields: Any) -> discord.Message | None:
        if not self.token.alive:
            return None
        try:
            return await self.interaction.edit_original_response(**fields)
        except discord.HTTPException as error:
            if not self.token.refused(error):
                log.warning("Could not update the /imagine response: %s", error)
        return None

    async def send(
        self,
        text: str,
        files: list[discord.File],
        layout: Callable[[str], discord.ui.LayoutView],
        first: bool,
    ) -> discord.Message:
        """The first message replaces the original response; later ones are follow-ups. In the channel instead
        (once the token is gone), the text starts with the requester's mention, who alone is pinged."""
        if first:
            message = await self.edit(view=layout(text), attachments=files)
            if message is not None:
                return message
        elif self.token.alive:
            try:
                return await self.interaction.followup.send(view=layout(text), files=files, wait=True)
            except discord.HTTPException as error:
                self.token.refused(error)
                log.warning("Follow-up failed (%s); posting in the channel instead", error)
        for file in files:
            file.reset()
        user, channel = self.interaction.user, self.interaction.channel
        try:
            return await channel.send(  # type: ignore[union-attr]
                view=layout(f"{user.mention} {text}"),
                files=files,
                allowed_mentions=discord.AllowedMentions(users=[user]),
            )
        except discord.Forbidden as error:  # say which permission to ask an admin for
            missing = missing_permission(channel, files=bool(files))
            log.warning(
                "Could not post /imagine results in #%s of server %s: %s (missing: %s)",
                channel,
                self.interaction.guild_id,
                error,
                missing or "unknown",
            )
            raise UserFacingError(cannot_post(missing)) from None


class AnswerOutput(Protocol):
    """Where a streamed answer goes: a reply to a message, or an interaction's response."""

    def working(self) -> contextlib.AbstractAsyncContextManager[object]: ...
    async def show(self, text: str) -> None: ...
    async def finish(self, chunks: list[str]) -> None: ...


class ReplyOutput:
    """Streams into a reply to `message`; further chunks reply to the previous one, keeping the chain
    walkable."""

    def __init__(self, message: discord.Message) -> None:
        self.message, self.reply = message, None

    def working(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self.message.channel.typing()  # the typing indicator while the answer is prepared

    async def show(self, text: str) -> None:
        try:
            if self.reply is None:
                self.reply = await self.message.reply(text)
            else:
                await self.reply.edit(content=text)
        except discord.HTTPException as error:  # a missed progress update is harmless
            log.debug("Streaming update failed: %s", error)

    async def finish(self, chunks: list[str]) -> None:
        first, *rest = chunks
        try:
            previous = await self._final_first(first)
        except discord.HTTPException:  # e.g. the question was deleted meanwhile: to the channel, mentioning
            author = self.message.author
            for part in with_prefix(author.mention, chunks):
                await self.message.channel.send(
                    part, allowed_mentions=discord.AllowedMentions(users=[author])
                )
            return
        for chunk in rest:
            previous = await previous.reply(chunk, mention_author=False)

    async def _final_first(self, text: str) -> discord.Message:
        if self.reply is not None:
            try:
                return await self.reply.edit(content=text)
            except discord.HTTPException:
                log.warning("Could not edit the streamed reply; sending the answer anew")
        return await self.message.reply(text)


class InteractionOutput:
    """Streams into a deferred interaction's original response while its token lives (young enough, never
    refused); further chunks are follow-ups; what the token can no longer carry goes to the channel."""

    def __init__(self, interaction: discord.Interaction, token: TokenLife) -> None:
        self.interaction, self.token = interaction, token

    def working(self) -> contextlib.AbstractAsyncContextManager[object]:
        return contextlib.nullcontext()  # the deferred "thinking…" response already says so

    async def show(self, text: str) -> None:
        if not self.token.alive:
            return
        try:
            await self.interaction.edit_original_response(content=text)
        except discord.HTTPException as error:
            self.token.refused(error)
            log.debug("Streaming update failed: %s", error)

    async def finish(self, chunks: list[str], view: discord.ui.View | None = None) -> None:
        """The answer in full; `view` (buttons) goes under its last chunk."""
        sent = 0
        last = len(chunks) - 1
        try:
            if self.token.alive:
                await self.interaction.edit_original_response(
                    content=chunks[0], view=view if last == 0 else None
                )
                sent = 1
            while sent < len(chunks) and self.token.alive:
                await self.interaction.followup.send(
                    chunks[sent], view=view if view is not None and sent == last else MISSING
                )
                sent += 1
        except discord.HTTPException as error:  # the token is dead, or Discord failed: to the channel
            self.token.refused(error)
            log.warning("Could not answer through the interaction (%s); posting in the channel", error)
        user = self.interaction.user
        parts = with_prefix(user.mention, chunks[sent:])
        for index, part in enumerate(parts, 1):
            await self.interaction.channel.send(  # type: ignore[union-attr]
                part,
                view=view if view is not None and index == len(parts) else MISSING,
                allowed_mentions=discord.AllowedMentions(users=[user]),
            )


class _Acknowledged:
    """`Interaction.response` of an interaction answered before the restart, as far as the cogs ask it."""

    def is_done(self) -> bool:
        return True


@dataclass
class ResumedInteraction:
    """An interaction as a restarted bot still has it: not the event, only what its job kept in Redis (its
    `origin_of`). With the application id and token (valid 15 minutes) the original response can still be
    edited and followed up through the interaction's webhook; without them (or once they expire) results go to
    the channel. It offers what `Delivery`, `InteractionOutput` and the cogs' delivery use of a
    `discord.Interaction`."""

    user: discord.abc.User
    channel: discord.abc.Messageable
    guild_id: int | None
    guild: discord.Guild | None
    followup: discord.Webhook | None  # None without a token: nothing to edit, everything goes to the channel
    created_at: datetime = field(default_factory=discord.utils.utcnow)  # the interaction's: its token's age

    @classmethod
    async def of(cls, bot: discord.Client, origin: Origin, owner: int) -> ResumedInteraction:
        # Re-attaching starts in setup_hook, before the gateway's READY fills the guild and channel caches.
        await bot.wait_until_ready()
        user = bot.get_user(owner) or await bot.fetch_user(owner)
        guild_id = origin.guild_id or None
        channel = bot.get_channel(origin.channel_id) or bot.get_partial_messageable(
            origin.channel_id, guild_id=guild_id
        )
        webhook = None
        if origin.application_id and origin.token:
            webhook = discord.Webhook.partial(origin.application_id, origin.token, client=bot)
        created = (
            datetime.fromtimestamp(origin.created_at, UTC) if origin.created_at else discord.utils.utcnow()
        )
        return cls(
            user,
            channel,  # type: ignore[arg-type]  # a channel the job came from can be sent to
            guild_id,
            bot.get_guild(origin.guild_id) if guild_id else None,
            webhook,
            created,
        )

    @property
    def expired(self) -> bool:
        return self.followup is None

    @property
    def response(self) -> _Acknowledged:
        """The first run acknowledged the interaction (it defers at once): edits and follow-ups are left."""
        return _Acknowledged()

    async def edit_original_response(
        self, *, content: Any = MISSING, attachments: Any = MISSING, view: Any = MISSING
    ) -> discord.WebhookMessage:
        """PATCH /webhooks/{application}/{token}/messages/@original, as `Interaction.edit_original_response`
        sends it (`Webhook.edit_message("@original")` would send the "@" percent-encoded)."""
        webhook = self.followup
        if webhook is None or webhook.token is None:
            raise ValueError("no interaction token to edit the original response with")
        with handle_message_parameters(
            content=content,
            attachments=attachments,
            view=view,
            previous_allowed_mentions=webhook._state.allowed_mentions,
        ) as params:
            data = await async_context.get().edit_original_interaction_response(
                webhook.id,
                webhook.token,
                session=webhook.session,
                proxy=webhook.proxy,
                proxy_auth=webhook.proxy_auth,
                payload=params.payload,
                multipart=params.multipart,
                files=params.files,
            )
        message = webhook._create_message(data, thread=MISSING)
        if view and not view.is_finished() and view.is_dispatchable():
            webhook._state.store_view(view, message.id)
        return message
