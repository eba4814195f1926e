"""What the cogs see of a job, and what it carries besides its request, as plain types every side can import
without the executor, the store or torch: the `Job` surface both backends implement, its progress reports,
the usage charge it was admitted with, and where it was asked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

from bot.limits import Decision, Kind

T_co = TypeVar("T_co", covariant=True)

JobKind = Literal["ask", "imagine", "upscale"]  # the jobs a restarted bot re-attaches to


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
    job's other keys. A question asked in a message keeps that message's id, to answer it in a reply; an
    upscale, the gallery message it was pressed on, to post it as a reply there."""

    guild_id: int
    channel_id: int
    application_id: int = 0
    token: str = field(default="", repr=False)
    message_id: int = 0
    created_at: float = 0.0  # when the interaction was made (POSIX seconds): its token dies 15 minutes later


class Job(Protocol[T_co]):
    """A model job as the cogs follow it, whichever backend runs it: awaitable for its result, cancellable,
    observable while it waits and runs."""

    kind: str
    owner: int | None
    progress: Progress | None  # the last report
    changed: asyncio.Event  # set when position, progress, notice or state changed; whoever shows it clears it
    charge: Charge | None  # what its requester was charged (a re-attached job's, to refund if it fails)
    origin: Origin | None  # where it was asked, when its result may be delivered by a later run of the bot
    note: str | None  # said with the result, e.g. that another GPU worker took it over and started again
    notice: str | None  # said while it waits, e.g. that no GPU worker is online to take it
    elsewhere: bool  # another process of the bot delivers it (and keeps the charge): nothing to do here
    handed_over: bool  # this process let go of it at shutdown: the next run of the bot delivers or refunds it

    @property
    def position(self) -> int:
        """1 for the next job to run, 2 behind it, ...; 0 once it runs or has finished."""
        ...

    def done(self) -> bool: ...

    def cancel(self, reason: str = ...) -> bool:
        """Withdraw the job (or stop it at its next report); False when it had already ended."""
        ...

    def __await__(self) -> Generator[Any, None, T_co]: ...
