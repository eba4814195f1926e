"""Per-server usage policy as pure functions: may this member make one more request now, and if not, why.

Counts are per UTC day. A per-day count of 0 turns the action off (for the whole server when it is
`generations_per_server`; for every member without an exempt role otherwise); `max_queued_per_user` 0 turns
off requests for members without an exempt role; `cooldown_seconds` 0 means no cooldown.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bot.settings import Settings

Kind = Literal["imagine", "ask"]

LIMIT_FIELDS: tuple[str, ...] = (
    "generations_per_user",
    "questions_per_user",
    "generations_per_server",
    "cooldown_seconds",
    "max_queued_per_user",
)
"""The integer limits an admin sets with `/limits set`."""


@dataclass(frozen=True)
class Policy:
    """A server's effective limits: the bot-wide defaults with the server's overrides applied."""

    generations_per_user: int
    questions_per_user: int
    generations_per_server: int
    cooldown_seconds: int
    max_queued_per_user: int
    max_prompt_length: int
    allowed_channels: frozenset[int] = frozenset()  # empty = every channel
    exempt_roles: frozenset[int] = frozenset()
    banned_words: frozenset[str] = frozenset()  # case-folded words and phrases
    nsfw_only: bool = False
    log_channel_id: int | None = None

    @classmethod
    def defaults(cls, settings: Settings) -> Policy:
        """The policy of a server that has changed nothing."""
        return cls(
            generations_per_user=settings.generations_per_user,
            questions_per_user=settings.questions_per_user,
            generations_per_server=settings.generations_per_server,
            cooldown_seconds=settings.cooldown_seconds,
            max_queued_per_user=settings.max_queued_per_user,
            max_prompt_length=settings.max_prompt_length,
        )

    def allows_channel(self, channel_id: int) -> bool:
        return not self.allowed_channels or channel_id in self.allowed_channels

    def exempts(self, role_ids: Iterable[int]) -> bool:
        return not self.exempt_roles.isdisjoint(role_ids)


@dataclass(frozen=True)
class Usage:
    """What a member and their server have used today, and what the member has in flight now."""

    user_generations: int = 0
    user_questions: int = 0
    server_generations: int = 0
    last_request_at: datetime | None = None
    queued: int = 0  # the member's jobs waiting or running


@dataclass(frozen=True)
class Decision:
    """Whether a request may go ahead; `reason` is the polite refusal for the member (empty if allowed)."""

    allowed: bool
    reason: str = ""


ALLOWED = Decision(True)

_NOUNS: dict[Kind, str] = {"imagine": "generations", "ask": "questions"}
_TURNED_OFF: dict[Kind, str] = {
    "imagine": "Image generation is turned off {place}.",
    "ask": "Questions are turned off {place}.",
}


def check(
    kind: Kind, usage: Usage, policy: Policy, *, now: datetime, exempt: bool, place: str = "on this server"
) -> Decision:
    """May a member make one more `kind` request now? Exempt members skip all but the server-wide limit.
    `place` is where the member's limits apply, as the refusal says it ("in direct messages")."""
    if kind == "imagine":
        cap = policy.generations_per_server
        if cap == 0:
            return Decision(False, _TURNED_OFF[kind].format(place=place))
        if usage.server_generations >= cap:
            return Decision(
                False,
                f"This server has used {usage.server_generations}/{cap} generations today; "
                f"resets in {format_duration(resets_in(now))}.",
            )
    if exempt:
        return ALLOWED

    used, cap = (
        (usage.user_generations, policy.generations_per_user)
        if kind == "imagine"
        else (usage.user_questions, policy.questions_per_user)
    )
    if cap == 0:
        return Decision(False, _TURNED_OFF[kind].format(place=place))
    if used >= cap:
        return Decision(
            False,
            f"You've used {used}/{cap} {_NOUNS[kind]} today {place}; "
            f"resets in {format_duration(resets_in(now))}.",
        )

    if policy.max_queued_per_user == 0:
        return Decision(False, "This server is not taking requests right now.")
    if usage.queued >= policy.max_queued_per_user:
        waiting = "1 request" if usage.queued == 1 else f"{usage.queued} requests"
        them = "it" if usage.queued == 1 else "them"
        return Decision(False, f"You already have {waiting} waiting; please wait for {them} to finish.")

    if policy.cooldown_seconds and usage.last_request_at is not None:
        wait = usage.last_request_at + timedelta(seconds=policy.cooldown_seconds) - _utc(now)
        if wait > timedelta(0):
            return Decision(False, f"Please wait {format_duration(wait)} before your next request.")
    return ALLOWED


def day_of(now: datetime) -> str:
    """The UTC day `now` falls on, as YYYY-MM-DD: the key daily counters reset on."""
    return _utc(now).date().isoformat()


def resets_in(now: datetime) -> timedelta:
    """Time from `now` to the next UTC midnight, when daily counts start again."""
    now = _utc(now)
    return datetime.combine(now.date() + timedelta(days=1), time(), UTC) - now


def format_duration(duration: timedelta) -> str:
    """A wait as members read it: "42 s", "12 min", "3 h 12 min"; rounded up so it never promises too soon."""
    seconds = math.ceil(duration.total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def banned_word_in(text: str, words: Iterable[str]) -> str | None:
    """The first of `words` found in `text` as a whole word or phrase, ignoring case and Unicode look-alike
    forms (NFKC: full-width letters, ligatures, ...); None if none is.

    A banned "cat" does not match "category"; "bad word" matches "BAD  word!" and "ｂａｄ ｗｏｒｄ".
    """
    folded = fold(text)
    for word in words:
        pattern = _word_pattern(word)
        if pattern is not None and pattern.search(folded):
            return word
    return None


@functools.lru_cache(maxsize=1024)
def _word_pattern(word: str) -> re.Pattern[str] | None:
    parts = fold(word).split()
    if not parts:
        return None
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, parts)) + r"(?!\w)")


def fold(text: str) -> str:
    """Text as moderation compares it: NFKC-normalised (compatibility forms unified), then case-folded."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no timezone; pass an aware datetime such as datetime.now(UTC)")
    return moment.astimezone(UTC)
