"""One GPU thread behind one bounded queue.

A dedicated single-worker thread owns the model, so CUDA state and compiled graphs stay on one thread and
jobs never compete for the GPU. An asyncio dispatcher task feeds it through `loop.run_in_executor`.
Jobs that share a batch runner (image generation) and wait in the queue together are merged into one
batch and split back when done.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from bot.errors import JobCancelled, JobFailed, QueueFull
from bot.jobs import Charge, Origin, Progress, Reporter

log = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")

BatchRunner = Callable[[list[Any], list[Reporter]], list[Any]]

LEFT_BEHIND = "Sorry, something went wrong on the GPU with this request. Please try again."
GPU_STUCK = (
    "The GPU is stuck on an earlier request, so the bot cannot take any work right now; its operator "
    "has been alerted and it will restart. Please ask again in a few minutes."
)


class Job(Generic[T]):
    """A unit of GPU work: awaitable for its result, cancellable while queued, observable while it runs."""

    def __init__(
        self,
        *,
        kind: str,
        owner: int | None,
        weight: int,
        loop: asyncio.AbstractEventLoop,
        notify_interval: float = 1.0,
    ) -> None:
        self.kind, self.owner, self.weight = kind, owner, weight
        self.future: asyncio.Future[T] = loop.create_future()
        self.progress: Progress | None = None  # written by the GPU thread, read by the loop
        # Set (on the loop) when position, progress or state changed; whoever shows the job clears it.
        self.changed = asyncio.Event()
        self._loop, self._notify_interval, self._last_notify = loop, notify_interval, 0.0
        self.queued_at = time.perf_counter()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._abandoned = False  # set by the loop; the GPU thread sees it at its next report
        self.timed = True  # False: exempt from the executor's job timeout (loading the model)
        self._executor: GpuExecutor | None = None
        # The rest of the `bot.jobs.Job` surface: what the cogs read whichever backend runs the job.
        self.charge: Charge | None = None
        self.origin: Origin | None = None
        self.note: str | None = None
        self.notice: str | None = None
        self.elsewhere = False
        self.handed_over = False

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self.future.done()

    @property
    def position(self) -> int:
        """1 for the next job to run, 2 behind it, ...; 0 once it runs or has finished."""
        if self._executor is None or self.started_at is not None or self.future.done():
            return 0
        return self._executor.position_of(self)

    def done(self) -> bool:
        return self.future.done()

    def report(self, progress: Progress) -> None:
        """Called from the GPU thread; stops the work there if the job was abandoned meanwhile."""
        if self._abandoned:
            raise JobCancelled("This request was cancelled.")
        self._publish(progress)

    def _publish(self, progress: Progress) -> None:
        """Store the progress; wake the loop side at most every notify_interval (always for a preview)."""
        self.progress = progress
        now = time.perf_counter()
        if progress.preview is not None or now - self._last_notify >= self._notify_interval:
            self._last_notify = now
            self._loop.call_soon_threadsafe(self.changed.set)

    def _batch_reporter(self, batch: list[Job[Any]]) -> Reporter:
        """A reporter that stops the shared work only once every job of the batch was abandoned."""

        def report(progress: Progress) -> None:
            if all(member._abandoned for member in batch):
                raise JobCancelled("This request was cancelled.")
            self._publish(progress)

        return report

    def cancel(self, reason: str = "This request was cancelled.") -> bool:
        """Withdraw a job that is still waiting, or stop a running one at its next progress report."""
        if self.future.done():
            return False
        self._abandoned = True
        if self._executor is not None:
            self._executor.discard(self)
        self.future.set_exception(JobCancelled(reason))
        self.changed.set()
        return True

    def __await__(self) -> Generator[Any, None, T]:
        try:
            return (yield from asyncio.shield(self.future).__await__())
        except asyncio.CancelledError:
            self.cancel()  # the awaiting task went away: nobody wants the result any more
            raise


class Stepper(Protocol):
    """Continuous batching on the GPU thread (bot/scheduler.py): requests join a running loop of steps."""

    def admit(self, payload: Any, report: Reporter, finish: Callable[[Any], None]) -> bool:
        """From the loop: take `payload` into the loop if there is room for it now (False: not now; its slots
        are taken, or, for work between steps, the work before it still waits). `finish` is called once, on
        the GPU thread, with its result or the exception for it."""
        ...

    def run(self) -> None:
        """On the GPU thread: step until no admitted request is left."""
        ...

    def pending(self) -> bool:
        """Whether an admitted request is not finished yet."""
        ...


@dataclass(eq=False)
class _Waiting:
    """A queued job and how it will run: a plain function, a batch runner's payload, or a stepper's."""

    job: Job[Any]
    fn: Callable[[], Any] | None = None
    runner: BatchRunner | None = None
    stepper: Stepper | None = None
    payload: Any = None


@dataclass
class _Work:
    """What the GPU thread runs for one or more jobs."""

    jobs: list[Job[Any]]
    run: Callable[[], list[Any]]


class GpuExecutor:
    """Serialises all model work onto one thread; a bounded FIFO queue feeds it."""

    def __init__(
        self,
        queue_size: int = 16,
        *,
        max_batch: int = 16,
        job_timeout: float | None = None,
        stuck_grace: float = 120.0,
        notify_interval: float = 1.0,
    ) -> None:
        """A timed-out job that has not given the thread back `stuck_grace` seconds later leaves the
        GPU stuck:
        the executor then takes no more work and calls `on_stuck` (on the loop)."""
        self.queue_size, self.max_batch, self.job_timeout = queue_size, max_batch, job_timeout
        self.stuck_grace = stuck_grace
        self.stuck = False
        self.on_stuck: Callable[[], None] | None = None
        self.notify_interval = notify_interval
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        # The dispatcher runs only while there is work and exits when the queue is empty, so an idle bot
        # has no task parked on a queue (which also lets test harnesses see when the bot is idle).
        self._dispatcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # set on the loop when a job arrives or a stepped job finishes
        self._stepper: Stepper | None = None  # the stepper of the jobs admitted last
        self._step_run: asyncio.Future[None] | None = None  # the stepper's run on the GPU thread
        self._timed_out: dict[Job[Any], float] = {}  # running stepped jobs stopped for the job timeout: when
        self._accepting = False
        self.running: list[Job[Any]] = []
        self.jobs_done = 0
        self.durations: dict[str, collections.deque[float]] = {}  # kind -> recent run times, seconds

    async def __aenter__(self) -> GpuExecutor:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start taking jobs."""
        self._accepting = True

    @property
    def depth(self) -> int:
        """Jobs waiting plus jobs running."""
        return len(self._waiting) + len(self.running)

    def timings(self) -> dict[str, tuple[int, float, float]]:
        """For each job kind: (recent jobs, mean seconds, 95th percentile seconds)."""
        stats = {}
        for kind, times in self.durations.items():
            ordered = sorted(times)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            stats[kind] = (len(ordered), sum(ordered) / len(ordered), p95)
        return stats

    def position_of(self, job: Job[Any]) -> int:
        for index, waiting in enumerate(self._waiting):
            if waiting.job is job:
                return index + 1
        return 0

    def jobs_of(self, owner: int) -> int:
        """How many of this owner's jobs are waiting or running."""
        return sum(1 for job in self._all_jobs() if job.owner == owner)

    def _all_jobs(self) -> list[Job[Any]]:
        return [entry.job for entry in self._waiting] + self.running

    def submit(
        self, fn: Callable[[Reporter], T], *, kind: str = "job", owner: int | None = None, timed: bool = True
    ) -> Job[T]:
        """Queue `fn(report)` for the GPU thread; raises QueueFull when the queue is at capacity. A
        job that is
        not `timed` may run as long as it takes (loading the model)."""
        job = self._enqueue(kind, owner, 1, lambda job: _Waiting(job, fn=lambda: fn(job.report)))
        job.timed = timed
        return job

    def submit_batched(
        self,
        runner: BatchRunner,
        payload: Any,
        *,
        weight: int = 1,
        kind: str = "job",
        owner: int | None = None,
    ) -> Job[Any]:
        """Queue `payload` for `runner(payloads, reporters) -> results`, batched with other waiting payloads
        for the same runner up to `max_batch` total weight."""
        return self._enqueue(kind, owner, weight, lambda job: _Waiting(job, runner=runner, payload=payload))

    def submit_stepped(
        self,
        stepper: Stepper,
        payload: Any,
        *,
        weight: int = 1,
        kind: str = "job",
        owner: int | None = None,
    ) -> Job[Any]:
        """Queue `payload` for `stepper`: it joins the stepper's running loop as soon as its slots are free,
        while the loop goes on for the requests already in it."""
        return self._enqueue(kind, owner, weight, lambda job: _Waiting(job, stepper=stepper, payload=payload))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the GPU thread through the queue and return its result."""
        job = self.submit(lambda _report: fn(*args), kind=getattr(fn, "__name__", "call"))
        return await job

    def _enqueue(
        self,
        kind: str,
        owner: int | None,
        weight: int,
        entry: Callable[[Job[Any]], _Waiting],
    ) -> Job[Any]:
        if self.stuck:
            raise QueueFull(GPU_STUCK)
        if not self._accepting:
            raise QueueFull("The bot is not taking new requests right now (it may be restarting).")
        if len(self._waiting) >= self.queue_size:
            waiting = "1 request is" if len(self._waiting) == 1 else f"{len(self._waiting)} requests are"
            raise QueueFull(f"I'm busy: {waiting} already waiting. Please try again in a minute.")
        loop = asyncio.get_running_loop()
        job: Job[Any] = Job(
            kind=kind, owner=owner, weight=weight, loop=loop, notify_interval=self.notify_interval
        )
        job._executor = self
        self._waiting.append(entry(job))
        self._wake.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch(), name="gpu-dispatcher")
        return job

    def discard(self, job: Job[Any]) -> None:
        """Drop a job from the waiting queue (no-op when it already runs)."""
        for entry in self._waiting:
            if entry.job is job:
                self._waiting.remove(entry)
                self._positions_changed()
                return

    def _positions_changed(self) -> None:
        for entry in self._waiting:
            entry.job.changed.set()

    def _next_work(self) -> _Work:
        first = self._waiting.popleft()
        job, fn, runner = first.job, first.fn, first.runner
        if runner is None:
            assert fn is not None
            return _Work([job], lambda: [fn()])
        batch, payloads, weight = [job], [first.payload], job.weight
        for entry in list(self._waiting):
            # Bound methods compare equal (not identical) when they share function and instance.
            if entry.runner == runner and weight + entry.job.weight <= self.max_batch:
                self._waiting.remove(entry)
                batch.append(entry.job)
                payloads.append(entry.payload)
                weight += entry.job.weight
        reporters = [member._batch_reporter(batch) for member in batch]
        return _Work(batch, lambda: runner(payloads, reporters))

    async def _dispatch(self) -> None:
        while (self._waiting or self.running or self._stepping()) and not self.stuck:
            head = self._waiting[0] if self._waiting else None
            if head is not None and head.stepper is None and not self.running and not self._stepping():
                await self._run_work(self._next_work())
            else:  # stepped jobs join the stepper's loop; other work waits for that loop to drain
                self._admit_stepped()
                await self._tend_steps()

    def _stepping(self) -> bool:
        return self._step_run is not None and not self._step_run.done()

    async def _run_work(self, work: _Work) -> None:
        """Run plain or batched work on the GPU thread and hand each job its result."""
        loop = asyncio.get_running_loop()
        self.running = work.jobs
        started = time.perf_counter()
        for job in work.jobs:
            job.started_at = started
            job.changed.set()
        self._positions_changed()
        thread_future = loop.run_in_executor(self._thread, work.run)
        try:
            results = await self._await_thread(thread_future, work)
        except asyncio.CancelledError:  # the loop is going away: tell the jobs' awaiters why
            for job in work.jobs:
                job.cancel("The bot is shutting down; please ask again once it is back.")
            raise
        except BaseException as error:  # noqa: BLE001 - every failure goes to the jobs' awaiters
            self._fail(work.jobs, error)
        else:
            for job, result in zip(work.jobs, results, strict=True):
                if isinstance(result, BaseException):
                    self._fail([job], result)
                elif not job.future.done():
                    job.future.set_result(result)
        finally:
            finished = time.perf_counter()
            for job in work.jobs:
                job.finished_at = finished
                job.changed.set()
                self.durations.setdefault(job.kind, collections.deque(maxlen=500)).append(finished - started)
            self.jobs_done += len(work.jobs)
            self.running = []

    def _admit_stepped(self) -> None:
        """Hand waiting stepped jobs, oldest first, to their stepper while it has room. A job that does not
        fit holds back the later ones of its kind (no small gallery overtakes a big one forever), and plain
        or batched work holds back everything behind it."""
        blocked: set[str] = set()
        admitted = False
        for entry in list(self._waiting):
            if entry.stepper is None:
                break
            job = entry.job
            if job.kind in blocked:
                continue
            try:
                taken = entry.stepper.admit(entry.payload, job.report, self._finisher(job))
            except Exception as error:  # noqa: BLE001 - a request the stepper can never take: its requester is told
                self._waiting.remove(entry)
                self._fail([job], error)
                job.changed.set()
                admitted = True
                continue
            if not taken:
                blocked.add(job.kind)
                continue
            self._waiting.remove(entry)
            self._stepper = entry.stepper
            job.started_at = time.perf_counter()
            job.changed.set()
            self.running.append(job)
            admitted = True
        if admitted:
            self._positions_changed()

    def _finisher(self, job: Job[Any]) -> Callable[[Any], None]:
        loop = asyncio.get_running_loop()

        def finish(outcome: Any) -> None:
            loop.call_soon_threadsafe(self._stepped_done, job, outcome)

        return finish

    def _stepped_done(self, job: Job[Any], outcome: Any) -> None:
        """On the loop: a stepped job left the stepper, with its result or the exception for it."""
        if job not in self.running:
            return
        self.running.remove(job)
        self._timed_out.pop(job, None)
        if not job.future.done():
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        finished = time.perf_counter()
        job.finished_at = finished
        job.changed.set()
        self.durations.setdefault(job.kind, collections.deque(maxlen=500)).append(
            finished - (job.started_at or finished)
        )
        self.jobs_done += 1
        self._wake.set()

    async def _tend_steps(self) -> None:
        """Keep the stepper running while it has work; wait for a job to arrive or finish, or a deadline."""
        loop = asyncio.get_running_loop()
        run = self._step_run
        if run is not None and run.done():
            self._step_run = run = None
        if run is None and self._stepper is not None and self._stepper.pending():
            self._step_run = run = loop.run_in_executor(self._thread, self._stepper.run)
            run.add_done_callback(self._run_ended)
        if run is None:
            # The stepper has nothing left: whoever still counts as running, or waits for a stepper that
            # refuses while idle, would wait forever (a bug): tell them, and keep serving the rest.
            self._settle_orphans()
            return
        self._wake.clear()
        waiter = loop.create_task(self._wake.wait())
        try:
            await asyncio.wait(
                [waiter, run],
                timeout=self._next_deadline(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:  # the loop is going away: tell the jobs' awaiters why
            for job in list(self.running):
                job.cancel("The bot is shutting down; please ask again once it is back.")
            raise
        finally:
            waiter.cancel()
        self._enforce_timeouts(run)

    def _settle_orphans(self) -> None:
        """Fail the jobs still counted as running, and the stepped ones at the head of the queue."""
        orphans = list(self.running)
        for entry in self._waiting:
            if entry.stepper is None:
                break
            orphans.append(entry.job)
        for job in orphans:
            log.error("A %s job was left behind by the step scheduler; telling its requester", job.kind)
            self.discard(job)
            if job in self.running:
                self._stepped_done(job, JobFailed(LEFT_BEHIND))
            elif not job.future.done():
                job.future.set_exception(JobFailed(LEFT_BEHIND))
                job.changed.set()

    def _run_ended(self, run: asyncio.Future[None]) -> None:
        """The stepper's run returned; should it have crashed, nobody it held is left waiting."""
        self._wake.set()
        if run.cancelled() or (error := run.exception()) is None:
            return
        log.error("The step scheduler stopped with an error: %r", error)
        for job in list(self.running):
            self._stepped_done(job, error)

    def _next_deadline(self) -> float | None:
        """Seconds until a running stepped job times out, or one that timed out counts as stuck."""
        if self.job_timeout is None:
            return None
        now, deadlines = time.perf_counter(), []
        for job in self.running:
            if job in self._timed_out:
                deadlines.append(self._timed_out[job] + self.stuck_grace)
            elif job.timed and job.started_at is not None:
                deadlines.append(job.started_at + self.job_timeout)
        return max(min(deadlines) - now, 0.0) if deadlines else None

    def _enforce_timeouts(self, run: asyncio.Future[None]) -> None:
        """Stop stepped jobs past the job timeout; give up on the GPU when one is not let go of."""
        if self.job_timeout is None:
            return
        now = time.perf_counter()
        for job in list(self.running):
            if job in self._timed_out:
                if now - self._timed_out[job] >= self.stuck_grace:
                    self._give_up(job.kind, run)
                    for stuck in list(self.running):
                        stuck.cancel(GPU_STUCK)
                    self.running = []
                    return
            elif job.timed and job.started_at is not None and now - job.started_at >= self.job_timeout:
                self._timed_out[job] = now
                job.cancel(self._timeout_message())
                log.error("%s job timed out after %.0fs; the step loop drops it", job.kind, self.job_timeout)

    def _timeout_message(self) -> str:
        assert self.job_timeout is not None
        limit = (
            f"{self.job_timeout / 60:g} minutes"
            if self.job_timeout >= 120
            else f"{self.job_timeout:g} seconds"
        )
        return f"Sorry, this request took longer than {limit} and was stopped."

    async def _await_thread(self, thread_future: asyncio.Future[list[Any]], work: _Work) -> list[Any]:
        if self.job_timeout is None or not all(job.timed for job in work.jobs):
            return await thread_future
        try:
            return await asyncio.wait_for(asyncio.shield(thread_future), self.job_timeout)
        except TimeoutError:
            for job in work.jobs:
                job.cancel(self._timeout_message())
            log.error(
                "%s job timed out after %.0fs; waiting for the GPU thread to stop",
                work.jobs[0].kind,
                self.job_timeout,
            )
            done, _ = await asyncio.wait([thread_future], timeout=self.stuck_grace)
            if not done:
                self._give_up(work.jobs[0].kind, thread_future)
                raise
            # The cancelled shield no longer looks at the thread's outcome: take it, or asyncio logs it as an
            # error that was never retrieved.
            if not thread_future.cancelled() and (stopped := thread_future.exception()) is not None:
                log.info("The timed-out %s job stopped: %r", work.jobs[0].kind, stopped)
            raise

    def _give_up(self, kind: str, thread_future: asyncio.Future[Any]) -> None:
        """The GPU thread did not come back: take no more work, tell everyone waiting, let the owner know."""
        self.stuck, self._accepting = True, False
        log.error(
            "The GPU is stuck: the timed-out %s job still holds the GPU thread %.0fs later; taking no more "
            "work, telling %d waiting request(s); the bot must be restarted",
            kind,
            self.stuck_grace,
            len(self._waiting),
        )
        for entry in list(self._waiting):
            entry.job.cancel(GPU_STUCK)
        self._waiting.clear()
        # Nobody awaits the thread any more: take its outcome, should it ever come, so asyncio does
        # not log it.
        thread_future.add_done_callback(lambda future: future.cancelled() or future.exception())
        if self.on_stuck is not None:
            self.on_stuck()

    @staticmethod
    def _fail(jobs: list[Job[Any]], error: BaseException) -> None:
        """Hand the error to each job's awaiter, who decides what the member is told."""
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    async def close(
        self,
        reason: str = "The bot is shutting down; please ask again once it is back.",
        grace: float | None = None,
    ) -> None:
        """Stop accepting, tell every waiting caller, give the running job `grace` seconds to finish (None: as
        long as it takes), then stop the thread."""
        self._accepting = False
        for entry in list(self._waiting):
            entry.job.cancel(reason)
        self._waiting.clear()  # also drops a job whose future was settled from outside (cancel() skips those)
        if self._dispatcher is not None:
            done, _ = await asyncio.wait([self._dispatcher], timeout=grace)
            if not done:
                for job in self.running:
                    job.cancel(reason)
                await self._dispatcher
            self._dispatcher = None
        self._thread.shutdown(wait=not self.stuck)  # a stuck thread never ends: do not wait for it
