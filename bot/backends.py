"""Where the cogs' model jobs run. The default runs them in this process on the GPU thread; the same two calls
can be served by GPU workers elsewhere (bot/redis_backend.py). Cogs only ever see `Job`s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from bot.executor import GpuExecutor, Job, Reporter
from bot.requests import AskRequest, ImagineRequest
from bot.store import Charge


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
    created_at: float = 0.0  # when the interaction was made (POSIX seconds): its token dies 15 minutes later


class Backend(Protocol):
    """What the cogs need from whatever runs the model."""

    def ask(self, request: AskRequest, *, owner: int, origin: Origin | None = None,
            charge: Charge | None = None) -> Job[str]: ...
    def imagine(self, request: ImagineRequest, *, owner: int, origin: Origin | None = None,
                charge: Charge | None = None) -> Job[list[Image.Image]]: ...
    def jobs_of(self, owner: int) -> int: ...


class LocalBackend:
    """Jobs on this process's GPU thread, through the executor's queue (imagine requests batch together).
    `origin` and `charge` matter only to a backend whose jobs outlive the bot; here they die with it."""

    def __init__(self, executor: GpuExecutor, studio: Callable[[], Any]) -> None:
        self.executor = executor
        self.studio = studio  # read when a job runs, so jobs may queue while the model is still loading

    def ask(self, request: AskRequest, *, owner: int, origin: Origin | None = None,
            charge: Charge | None = None) -> Job[str]:
        return self.executor.submit_batched(self.ask_batch, request, kind="ask", owner=owner)

    def imagine(self, request: ImagineRequest, *, owner: int, origin: Origin | None = None,
                charge: Charge | None = None) -> Job[list[Image.Image]]:
        return self.executor.submit_batched(self.imagine_batch, request, weight=request.count, kind="imagine",
                                            owner=owner)

    def imagine_batch(self, requests: list[ImagineRequest], reports: list[Reporter]) -> list[Any]:
        """The batch runner (a bound method, so waiting requests batch together)."""
        return self.studio().imagine_batch(requests, reports)

    def ask_batch(self, requests: list[AskRequest], reports: list[Reporter]) -> list[Any]:
        """Questions waiting together are answered in one left-padded batch."""
        return self.studio().ask_batch(requests, reports)

    def jobs_of(self, owner: int) -> int:
        return self.executor.jobs_of(owner)
