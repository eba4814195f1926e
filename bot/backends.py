"""Where the cogs' model jobs run. The default runs them in this process on the GPU thread; the same two calls
can be served by GPU workers elsewhere (bot/redis/). Cogs only ever see `Job`s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from PIL import Image

from bot.executor import GpuExecutor, Job
from bot.jobs import Charge, Origin, Reporter
from bot.requests import AskRequest, ImagineRequest, UpscaleRequest


class Backend(Protocol):
    """What the cogs need from whatever runs the model."""

    def ask(self, request: AskRequest, *, owner: int, origin: Origin | None = None,
            charge: Charge | None = None) -> Job[str]: ...
    def imagine(self, request: ImagineRequest, *, owner: int, origin: Origin | None = None,
                charge: Charge | None = None) -> Job[list[Image.Image]]: ...
    def upscale(self, request: UpscaleRequest, *, owner: int, origin: Origin | None = None,
                charge: Charge | None = None) -> Job[Image.Image]: ...
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

    def upscale(self, request: UpscaleRequest, *, owner: int, origin: Origin | None = None,
                charge: Charge | None = None) -> Job[Image.Image]:
        return self.executor.submit(lambda report: self.studio().upscale(request, report), kind="upscale",
                                    owner=owner)

    def imagine_batch(self, requests: list[ImagineRequest], reports: list[Reporter]) -> list[Any]:
        """The batch runner (a bound method, so waiting requests batch together)."""
        return self.studio().imagine_batch(requests, reports)

    def ask_batch(self, requests: list[AskRequest], reports: list[Reporter]) -> list[Any]:
        """Questions waiting together are answered in one left-padded batch."""
        return self.studio().ask_batch(requests, reports)

    def jobs_of(self, owner: int) -> int:
        return self.executor.jobs_of(owner)
