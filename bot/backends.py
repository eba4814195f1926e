"""Where the cogs' model jobs run: the one `Backend` protocol, and local mode, which runs them in this process
on the GPU thread. With EXECUTOR=redis, GPU workers elsewhere serve the same protocol (bot/redis/). Cogs, the
client, /status and the metrics only ever see a `Backend` and `bot.jobs.Job`s."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from PIL import Image

from bot.errors import JobFailed, QueueFull
from bot.executor import GPU_STUCK, GpuExecutor, Stepper
from bot.jobs import Charge, Job, JobKind, Origin, Reporter
from bot.requests import AskRequest, Drawing, ImagineRequest, UpscaleRequest
from bot.settings import Settings
from bot.status import BackendStatus, WorkerStatus

NOT_ACCEPTING = "The bot is not taking new requests right now (it may be restarting)."

# How a cog shows and delivers a job an earlier run of the bot was waiting for: (job, its request, its
# origin).
Deliver = Callable[[Job[Any], Any, Origin], Coroutine[Any, Any, None]]


class Backend(Protocol):
    """Everything the cogs, the client, /status and the metrics need from whatever runs the model."""

    def ask(
        self, request: AskRequest, *, owner: int, origin: Origin | None = None, charge: Charge | None = None
    ) -> Job[str]:
        """Queue a question (raises QueueFull, or another UserFacingError, when it cannot be taken).
        `origin` and `charge` let a later run of the bot deliver or refund it, where jobs outlive the bot."""
        ...

    def imagine(
        self,
        request: ImagineRequest,
        *,
        owner: int,
        origin: Origin | None = None,
        charge: Charge | None = None,
    ) -> Job[list[Drawing]]:
        """Queue a gallery, as `ask` does."""
        ...

    def upscale(
        self,
        request: UpscaleRequest,
        *,
        owner: int,
        origin: Origin | None = None,
        charge: Charge | None = None,
    ) -> Job[Image.Image]:
        """Queue one gallery image's upscale, as `ask` does."""
        ...

    async def reattach(self, kind: JobKind, deliver: Deliver) -> int:
        """Follow again the jobs of `kind` an earlier run of the bot was waiting for, calling `deliver` at
        once for each (their `charge` is set); returns how many. Where jobs die with the bot there are
        none."""
        ...

    def jobs_of(self, owner: int) -> int:
        """How many of this member's jobs are waiting or running."""
        ...

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (shutdown); the jobs already queued go on."""
        ...

    async def status(self) -> BackendStatus:
        """The queue's depth and the live workers' figures."""
        ...


class LocalBackend:
    """Jobs on this process's GPU thread, through the executor's queue: requests of a kind that wait together
    run as one batch. A GPU worker (bot/redis/worker.py) runs its jobs through this same class. `origin` and
    `charge` are kept on the job only: here jobs die with the process."""

    def __init__(self, executor: GpuExecutor, studio: Callable[[], Any], settings: Settings) -> None:
        self.executor = executor
        self.studio = studio  # read when a job runs, so jobs may queue while the model is still loading
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.accepting = True
        # SCHEDULER=step: questions and galleries join one running loop of steps, and upscales run between
        # its steps; batch: batches in turn.
        self.stepper = _StudioStepper(studio, settings) if settings.scheduler == "step" else None

    def ask(
        self, request: AskRequest, *, owner: int, origin: Origin | None = None, charge: Charge | None = None
    ) -> Job[str]:
        self._check_accepting()
        if self.stepper is not None:
            job = self.executor.submit_stepped(self.stepper, request, kind="ask", owner=owner)
        else:
            job = self.executor.submit_batched(self.ask_batch, request, kind="ask", owner=owner)
        job.origin, job.charge = origin, charge
        return job

    def imagine(
        self,
        request: ImagineRequest,
        *,
        owner: int,
        origin: Origin | None = None,
        charge: Charge | None = None,
    ) -> Job[list[Drawing]]:
        self._check_accepting()
        if self.stepper is not None:
            job = self.executor.submit_stepped(
                self.stepper, request, weight=request.count, kind="imagine", owner=owner
            )
        else:
            job = self.executor.submit_batched(
                self.imagine_batch, request, weight=request.count, kind="imagine", owner=owner
            )
        job.origin, job.charge = origin, charge
        return job

    def upscale(
        self,
        request: UpscaleRequest,
        *,
        owner: int,
        origin: Origin | None = None,
        charge: Charge | None = None,
    ) -> Job[Image.Image]:
        self._check_accepting()
        if self.stepper is not None:  # between two steps of the running loop; it takes no slot (weight 0)
            job = self.executor.submit_stepped(self.stepper, request, weight=0, kind="upscale", owner=owner)
        else:
            job = self.executor.submit(
                lambda report: self.studio().upscale(request, report), kind="upscale", owner=owner
            )
        job.origin, job.charge = origin, charge
        return job

    def imagine_batch(self, requests: list[ImagineRequest], reports: list[Reporter]) -> list[Any]:
        """The batch runner (a bound method, so waiting requests batch together)."""
        return self.studio().imagine_batch(requests, reports)

    def ask_batch(self, requests: list[AskRequest], reports: list[Reporter]) -> list[Any]:
        """Questions waiting together are answered in one left-padded batch."""
        return self.studio().ask_batch(requests, reports)

    async def reattach(self, kind: JobKind, deliver: Deliver) -> int:
        return 0  # nothing outlives this process

    def jobs_of(self, owner: int) -> int:
        return self.executor.jobs_of(owner)

    def stop_accepting(self) -> None:
        self.accepting = False

    def _check_accepting(self) -> None:
        if self.executor.stuck:
            raise QueueFull(GPU_STUCK)
        if not self.accepting:
            raise QueueFull(NOT_ACCEPTING)

    async def status(self) -> BackendStatus:
        return self.snapshot()

    def snapshot(self) -> BackendStatus:
        """The figures, read without waiting (a worker publishes them from here too)."""
        executor = self.executor
        running = len(executor.running)
        return BackendStatus(
            waiting=max(executor.depth - running, 0),
            running=running,
            workers=(self.worker_status(),),
            remote=False,
        )

    def worker_status(self) -> WorkerStatus:
        """This process as a worker: its model, device, slots in use, jobs done and timings."""
        studio = self.studio()
        device: dict[str, Any] = studio.describe() if studio is not None else {}
        busy = sum(job.weight for job in self.executor.running)
        return WorkerStatus(
            name=self.name,
            host=self.name.rpartition(":")[0],
            model=self.settings.janus_model,
            device=str(device.get("device", self.settings.janus_device)),
            dtype=str(device.get("dtype", self.settings.janus_dtype)),
            loaded=studio is not None,
            gpu_stuck=self.executor.stuck,
            gpu_memory_bytes=device.get("gpu_memory_bytes"),
            # Step mode: questions have slots of their own beside the images' (one weight each).
            slots=self.executor.max_batch + (self.settings.answer_slots if self.stepper else 0),
            busy=busy,
            jobs_done=self.executor.jobs_done,
            timings=self.executor.timings(),
        )


class _StudioStepper:
    """The loaded studio's step scheduler (bot/scheduler.py) as the executor's `Stepper`: looked up when a
    job is admitted, so jobs may queue while the model is still loading."""

    def __init__(self, studio: Callable[[], Any], settings: Settings) -> None:
        self.studio, self.settings = studio, settings

    def _scheduler(self) -> Stepper:
        studio = self.studio()
        if studio is None:
            raise JobFailed("The model is not loaded; please ask again in a minute.")
        return studio.scheduler(self.settings.max_batch_images, self.settings.answer_slots)

    def admit(self, payload: Any, report: Reporter, finish: Callable[[Any], None]) -> bool:
        return self._scheduler().admit(payload, report, finish)

    def run(self) -> None:
        self._scheduler().run()

    def pending(self) -> bool:
        return self._scheduler().pending()
