"""An interaction as a restarted bot still has it (EXECUTOR=redis): not the event, only what its job kept in
Redis. With the application id and token (valid 15 minutes) the original response can still be edited and
followed up through the interaction's webhook; without them (or once they expire) results go to the channel.

It offers what cogs/generation.py's `Delivery` and `deliver` use of a `discord.Interaction`, so a re-attached job
is shown and delivered by the same code as a live one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import discord
from discord.utils import MISSING
from discord.webhook.async_ import async_context, handle_message_parameters

from bot.backends import Origin

log = logging.getLogger(__name__)

# Discord's answers to a token it will never take again: 404 Unknown Webhook / Unknown Interaction before it
# was used, and, 15 minutes after the interaction, 401 Invalid Webhook Token. Each refusal counts against the
# bot's IP (10,000 invalid requests in 10 minutes ban it), so a token is dropped after the first.
DEAD_TOKEN_CODES = frozenset({10015, 10062, 50027})


def token_refused(error: discord.HTTPException) -> bool:
    """Whether `error` says the interaction's token is dead (unknown or expired), not a passing failure."""
    return error.status in (401, 404) or error.code in DEAD_TOKEN_CODES


@dataclass
class TokenLife:
    """Whether an interaction's token may still be used: young enough, and never refused by Discord."""

    created_at: datetime
    max_seconds: float
    dead: bool = False

    @property
    def alive(self) -> bool:
        if not self.dead and (discord.utils.utcnow() - self.created_at).total_seconds() >= self.max_seconds:
            log.info("An interaction token is %.0f s old; posting in the channel from now on", self.max_seconds)
            self.dead = True
        return not self.dead

    def refused(self, error: discord.HTTPException) -> bool:
        """Note Discord's refusal; True (and the token is dropped) when it means the token is dead."""
        if token_refused(error):
            self.dead = True
        return self.dead


@dataclass
class ResumedInteraction:
    user: discord.abc.User
    channel: discord.abc.Messageable
    guild_id: int | None
    guild: discord.Guild | None
    followup: discord.Webhook | None  # None without a token: nothing to edit, everything goes to the channel
    created_at: datetime = field(default_factory=discord.utils.utcnow)  # the interaction's: its token's age

    @classmethod
    async def of(cls, bot: discord.Client, origin: Origin, owner: int) -> ResumedInteraction:
        user = bot.get_user(owner) or await bot.fetch_user(owner)
        guild_id = origin.guild_id or None
        channel = bot.get_channel(origin.channel_id) or bot.get_partial_messageable(origin.channel_id,
                                                                                     guild_id=guild_id)
        webhook = None
        if origin.application_id and origin.token:
            webhook = discord.Webhook.partial(origin.application_id, origin.token, client=bot)
        created = datetime.fromtimestamp(origin.created_at, UTC) if origin.created_at else discord.utils.utcnow()
        return cls(user, channel, guild_id, bot.get_guild(origin.guild_id) if guild_id else None,  # type: ignore[arg-type]
                   webhook, created)

    @property
    def expired(self) -> bool:
        return self.followup is None

    async def edit_original_response(self, *, content: Any = MISSING, attachments: Any = MISSING,
                                     view: Any = MISSING) -> discord.WebhookMessage:
        """PATCH /webhooks/{application}/{token}/messages/@original, as `Interaction.edit_original_response`
        sends it (`Webhook.edit_message("@original")` would send the "@" percent-encoded)."""
        webhook = self.followup
        if webhook is None or webhook.token is None:
            raise ValueError("no interaction token to edit the original response with")
        with handle_message_parameters(content=content, attachments=attachments, view=view,
                                       previous_allowed_mentions=webhook._state.allowed_mentions) as params:
            data = await async_context.get().edit_original_interaction_response(
                webhook.id, webhook.token, session=webhook.session, proxy=webhook.proxy,
                proxy_auth=webhook.proxy_auth, payload=params.payload, multipart=params.multipart,
                files=params.files)
        message = webhook._create_message(data, thread=MISSING)
        if view and not view.is_finished() and view.is_dispatchable():
            webhook._state.store_view(view, message.id)
        return message
