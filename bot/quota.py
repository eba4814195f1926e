"""Admission of each request against its server's rules, and the moderation log those rules may ask for."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import discord
from PIL import Image

from bot.errors import BadPrompt, QuotaExceeded
from bot.jobs import Charge
from bot.limits import Kind, Policy, banned_word_in
from bot.media import image_files, quote, upload_limit

if TYPE_CHECKING:
    from bot.client import JanusBot

log = logging.getLogger(__name__)

Place = discord.abc.Messageable


def is_nsfw(channel: object) -> bool:
    """Age-restricted channel (threads follow their parent); DMs count as not."""
    checker = getattr(channel, "is_nsfw", None)
    return bool(checker and checker())


class Quota:
    """Channel, NSFW, prompt and usage checks in one call, then an atomic charge that can be refunded.

    An admitted request holds a place among its member's requests (MAX_QUEUED_PER_USER) from admission until
    its job is queued (`queued`), when the backend starts counting the job instead, or until it is refunded
    or `release`d: requests sent together cannot all see the same short queue while they download."""

    def __init__(self, bot: JanusBot) -> None:
        self.bot = bot
        self.defaults = Policy.defaults(bot.settings)
        self._charging = asyncio.Lock()  # counting a member's requests and charging happen together
        self._reserved: Counter[int] = Counter()  # member id -> admitted requests not queued yet
        self._holding: dict[int, Charge] = {}  # id(charge) -> charge, for those
        # The tasks serving admitted requests, until they end: a shutdown lets them deliver before
        # logging out.
        self.in_flight: set[asyncio.Task[Any]] = set()

    async def policy(self, guild: discord.Guild | None) -> Policy:
        return self.defaults if guild is None else await self.bot.store.policy(guild.id, self.defaults)

    async def admit(
        self,
        kind: Kind,
        *,
        guild: discord.Guild | None,
        channel: Place,
        user: discord.abc.User,
        text: str,
        typed: str | None = None,
    ) -> Charge:
        """Charge one request or raise QuotaExceeded/BadPrompt with the text the member should see, before
        anything is downloaded or read. `text` is checked for banned words (check the rest of what the model
        will read, such as quoted messages and earlier turns, with `moderate` once it is read); `typed` is the
        part the member wrote, whose length the limit counts (default: all of `text`). The request holds its
        member's place until `queued`, `refund` or `release`."""
        if guild is None and not self.bot.settings.allow_dms:
            raise QuotaExceeded("I only work in servers, not in direct messages.")
        policy = await self.policy(guild)
        channel_id = getattr(channel, "parent_id", None) or getattr(channel, "id", 0)
        if guild is not None and not policy.allows_channel(channel_id):
            places = ", ".join(f"<#{cid}>" for cid in sorted(policy.allowed_channels)[:10])
            raise QuotaExceeded(f"I'm not enabled in this channel on this server; try {places}.")
        if kind == "imagine" and policy.nsfw_only and not is_nsfw(channel):
            raise QuotaExceeded("On this server, /imagine works only in age-restricted (NSFW) channels.")
        length = len(text if typed is None else typed)
        if length > policy.max_prompt_length:
            raise BadPrompt(
                f"That's {length} characters; the limit here is {policy.max_prompt_length}. "
                "Please shorten it and try again."
            )
        await self.moderate(kind, [text], guild=guild, channel=channel, user=user, policy=policy)
        roles = [role.id for role in getattr(user, "roles", ())]
        async with self._charging:
            charge = await self.bot.store.charge(
                guild.id if guild else 0,
                user.id,
                kind,
                now=discord.utils.utcnow(),
                policy=policy,
                exempt=policy.exempts(roles),
                queued=self.bot.backend.jobs_of(user.id) + self._reserved[user.id],
            )
            if charge.decision.allowed:
                self._holding[id(charge)] = charge
                self._reserved[user.id] += 1
        if not charge.decision.allowed:
            raise QuotaExceeded(charge.decision.reason)
        if (task := asyncio.current_task()) is not None:
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
        return charge

    def queued(self, charge: Charge) -> None:
        """The request's job is queued: the backend counts it from now on, so its reservation ends."""
        self.release(charge)

    def release(self, charge: Charge) -> None:
        """End the request's reservation, if it still has one (any number of calls)."""
        if self._holding.pop(id(charge), None) is not None:
            self._reserved[charge.user_id] -= 1
            if self._reserved[charge.user_id] <= 0:
                del self._reserved[charge.user_id]

    async def refund(self, charge: Charge) -> None:
        self.release(charge)
        await self.bot.store.refund(charge)

    async def moderate(
        self,
        kind: Kind,
        texts: Iterable[str],
        *,
        guild: discord.Guild | None,
        channel: Place,
        user: discord.abc.User,
        policy: Policy | None = None,
    ) -> None:
        """Raise BadPrompt if any of `texts` (what the model will read) has one of the server's banned words,
        after telling the moderation log what was refused."""
        policy = policy or await self.policy(guild)
        for text in texts:
            if (word := banned_word_in(text, policy.banned_words)) is not None:
                what = "/imagine" if kind == "imagine" else "question"
                where = getattr(channel, "mention", "?")
                await self._post_to_log(
                    guild,
                    policy,
                    [
                        f"**Refused {what}** by {user.mention} (`{user.id}`) in {where}: "
                        f"it contains “{quote(word, 40)}”",
                        f"> {quote(text, 1000)}",
                    ],
                )
                raise BadPrompt(f"That contains “{quote(word, 40)}”, which this server doesn't allow.")

    async def report(
        self,
        kind: Kind,
        *,
        guild: discord.Guild | None,
        channel: Place,
        user: discord.abc.User,
        text: str,
        result: discord.Message | None = None,
        answer: str | None = None,
        images: Sequence[Image.Image] = (),
    ) -> None:
        """Post who asked what, where, and what came back, to the server's moderation log channel (if any)."""
        if guild is None:
            return
        what = "/imagine" if kind == "imagine" else "question"
        lines = [
            f"**{what}** by {user.mention} (`{user.id}`) in {getattr(channel, 'mention', '?')}",
            f"> {quote(text, 1000)}",
        ]
        if answer is not None:
            lines.append(f"Answer: {quote(answer, 700)}")
        if result is not None:
            lines.append(f"Result: {result.jump_url}")
        await self._post_to_log(guild, await self.policy(guild), lines, images)

    async def _post_to_log(
        self,
        guild: discord.Guild | None,
        policy: Policy,
        lines: list[str],
        images: Sequence[Image.Image] = (),
    ) -> None:
        target = guild.get_channel(policy.log_channel_id) if guild and policy.log_channel_id else None
        if guild is None or not isinstance(target, discord.abc.Messageable):
            return
        groups = await image_files(images, "log", limit=upload_limit(guild)) if images else [[]]
        try:
            await target.send(
                "\n".join(lines)[:2000], files=groups[0], allowed_mentions=discord.AllowedMentions.none()
            )
        except discord.HTTPException as error:
            log.warning("Could not post to the moderation log of %s: %s", guild.id, error)
