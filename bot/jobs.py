"""What a job carries besides its request, as plain data both sides can import without the executor, the store
or torch: its progress reports, the usage charge it was admitted with, and where it was asked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bot.limits import Decision, Kind


@dataclass(frozen=True)
class Progress:
    """What a running job last reported: `done` of `total` steps, and an optional preview (image or text)."""

    done: int
    total: int
    preview: Any = None


Reporter = Callable[[Progress], None]


@dataclass(eq=False)
class Charge:
    """The outcome of one `UsageStore.charge`, with what `refund` needs to give it back."""

    decision: Decision
    guild_id: int
    user_id: int
    kind: Kind
    day: str  # the UTC day the request was counted on
    charged_at: datetime
    previous_request_at: datetime | None  # restored by a refund, lifting the cooldown this charge started
    refunded: bool = False


@dataclass(frozen=True)
class Origin:
    """Where a request was made, so that a restarted bot can still post its result there (EXECUTOR=redis).
    With the interaction's application id and token (valid 15 minutes), it can also keep editing the original
    response; the token is a credential: it is never shown in a repr, and Redis keeps it only as long as the
    job's other keys. A question asked in a message keeps that message's id, to answer it in a reply."""

    guild_id: int
    channel_id: int
    application_id: int = 0
    token: str = field(default="", repr=False)
    message_id: int = 0
