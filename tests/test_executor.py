"""The GPU executor: one thread, a bounded FIFO queue, cancellation, progress, batching, timeouts, shutdown.

Plain asyncio tests with fast functions. A job that must hold the thread busy waits on a threading.Event
(bounded, so a failing test can never hang the thread), and every wait on the loop side is bounded too.
Code on the worker thread uses no `assert`: when one failed there while the test itself was failing,
pytest crashed with an INTERNALERROR (SystemError: AST constructor recursion depth mismatch, CPython 3.11.7)
instead of showing the test's own failure.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from bot.errors import JobCancelled, QueueFull
from bot.executor import GpuExecutor
from bot.jobs import Progress, Reporter

T = TypeVar("T")
LIMIT = 5.0  # seconds; no single wait in these tests may take longer


async def result(job: Awaitable[T], timeout: float = LIMIT) -> T:
    """Await a job (through its public __await__) with a bound."""

    async def wait() -> T:
        return await job

    return await asyncio.wait_for(wait(), timeout)


async def wait_until(predicate: Callable[[], bool], timeout: float = LIMIT) -> None:
    """Poll the loop until `predicate()` holds, failing after `timeout` seconds."""

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), timeout)


class Blocker:
    """A job that holds the GPU thread until released; records that it started."""

    def __init__(self, value: Any = "blocker") -> None:
        self.started, self.release, self.value = threading.Event(), threading.Event(), value

    def __call__(self, report: Reporter) -> Any:
        self.started.set()
        self.release.wait(LIMIT)  # bounded, so a failed test cannot hold the thread for ever
        return self.value

    async def running(self) -> None:
        await wait_until(self.started.is_set)


def recorder(log: list[Any], value: Any) -> Callable[[Reporter], Any]:
    """A job that notes (value, thread) when it runs and returns value."""

    def run(report: Reporter) -> Any:
        log.append((value, threading.current_thread()))
        return value

    return run


async def test_jobs_run_one_at_a_time_on_one_worker_thread_in_fifo_order() -> None:
    """Every job runs on the same dedicated thread (never the event loop's), in the order it was submitted."""
    log: list[Any] = []
    active, overlap = [0], [False]

    def job(value: int) -> Callable[[Reporter], int]:
        def run(report: Reporter) -> int:
            active[0] += 1
            overlap[0] |= active[0] > 1
            time.sleep(0.001)
            log.append((value, threading.current_thread()))  # the object: idents of ended threads are reused
            active[0] -= 1
            return value

        return run

    async with GpuExecutor(queue_size=20) as executor:
        blocker = Blocker()
        first = executor.submit(blocker)
        await blocker.running()
        jobs = [executor.submit(job(i)) for i in range(8)]
        blocker.release.set()
        assert await result(first) == "blocker"
        assert await asyncio.wait_for(asyncio.gather(*(result(j) for j in jobs)), LIMIT) == list(range(8))
        # A later submission, after the queue ran dry, still lands on the same thread.
        assert await result(executor.submit(job(8))) == 8

    assert [value for value, _ in log] == list(range(9))
    threads = {thread for _, thread in log}
    assert len(threads) == 1
    assert threads != {threading.main_thread()} and threads != {threading.current_thread()}
    assert not overlap[0]


async def test_call_runs_a_plain_function_on_the_worker_thread() -> None:
    """`call(fn, *args)` is the shortcut the CLI uses to load the model on the GPU thread."""
    async with GpuExecutor() as executor:
        total, thread = await result(executor.call(lambda a, b: (a + b, threading.current_thread()), 2, 3))
    assert total == 5 and thread is not threading.current_thread()


async def test_full_queue_is_a_polite_refusal_and_the_refused_job_never_runs() -> None:
    """With queue_size jobs waiting, the next submission gets QueueFull with a polite text and is dropped."""
    log: list[Any] = []
    async with GpuExecutor(queue_size=2) as executor:
        blocker = Blocker()
        running = executor.submit(blocker)
        await blocker.running()  # the running job does not count as waiting
        waiting = [executor.submit(recorder(log, "a")), executor.submit(recorder(log, "b"))]
        with pytest.raises(QueueFull) as refusal:
            executor.submit(recorder(log, "refused"))
        polite = str(refusal.value)
        assert "2 requests are already waiting" in polite and "please try again" in polite.lower()
        assert executor.depth == 3
        blocker.release.set()
        assert [await result(job) for job in (running, *waiting)] == ["blocker", "a", "b"]
        # Room again once the queue drained.
        assert await result(executor.submit(recorder(log, "c"))) == "c"
    assert [value for value, _ in log] == ["a", "b", "c"]


async def test_a_failing_job_fails_only_its_own_awaiter() -> None:
    """An exception in one job reaches that job's awaiter; jobs before and after it still succeed."""

    def boom(report: Reporter) -> None:
        raise ValueError("model exploded")

    async with GpuExecutor() as executor:
        blocker = Blocker()
        jobs = [executor.submit(blocker), executor.submit(boom), executor.submit(lambda report: "after")]
        blocker.release.set()
        assert await result(jobs[0]) == "blocker"
        with pytest.raises(ValueError, match="model exploded"):
            await result(jobs[1])
        assert await result(jobs[2]) == "after"
        assert await result(executor.submit(lambda report: "later")) == "later"


async def test_a_queued_job_can_be_cancelled_and_never_runs() -> None:
    """cancel() on a waiting job answers its awaiter with JobCancelled, drops it, and the queue moves up."""
    log: list[Any] = []
    async with GpuExecutor() as executor:
        blocker = Blocker()
        executor.submit(blocker)
        await blocker.running()
        doomed = executor.submit(recorder(log, "doomed"))
        survivor = executor.submit(recorder(log, "survivor"))
        assert (doomed.position, survivor.position) == (1, 2)

        assert doomed.cancel() is True
        assert doomed.done() and doomed.position == 0
        assert survivor.position == 1
        assert doomed.cancel() is False  # already settled
        with pytest.raises(JobCancelled, match="cancelled"):
            await result(doomed)

        blocker.release.set()
        assert await result(survivor) == "survivor"
    assert [value for value, _ in log] == ["survivor"]


async def test_cancelling_the_awaiting_task_withdraws_the_queued_job() -> None:
    """When the coroutine awaiting a queued job is cancelled (member left, command timed out), the job is
    dropped."""
    log: list[Any] = []
    async with GpuExecutor() as executor:
        blocker = Blocker()
        executor.submit(blocker)
        await blocker.running()
        job = executor.submit(recorder(log, "abandoned"))
        after = executor.submit(recorder(log, "after"))

        async def member_waits() -> Any:
            return await job

        task = asyncio.create_task(member_waits())
        await asyncio.sleep(0)  # let the task start awaiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, LIMIT)
        assert job.done() and job.position == 0
        assert after.position == 1
        with pytest.raises(JobCancelled):
            await result(job)

        blocker.release.set()
        assert await result(after) == "after"
    assert [value for value, _ in log] == ["after"]


async def test_queue_positions_and_progress_are_observable() -> None:
    """Waiting jobs know their place (1, 2, 3); the running job is at 0 and shows what it last reported."""
    step, release = threading.Event(), threading.Event()

    def working(report: Reporter) -> str:
        report(Progress(1, 3))
        step.wait(LIMIT)
        report(Progress(2, 3, preview="half"))
        release.wait(LIMIT)
        return "done"

    async with GpuExecutor() as executor:
        running = executor.submit(working, owner=7)
        queued = [
            executor.submit(lambda report: "next", owner=7),
            executor.submit(lambda report: 2),
            executor.submit(lambda report: 3, owner=8),
        ]
        await wait_until(lambda: running.progress is not None)
        assert running.running and running.position == 0
        assert running.progress == Progress(1, 3)
        assert [job.position for job in queued] == [1, 2, 3]
        assert not any(job.running for job in queued) and all(job.progress is None for job in queued)
        assert (executor.depth, executor.jobs_of(7), executor.jobs_of(8)) == (4, 2, 1)

        step.set()
        await wait_until(lambda: running.progress == Progress(2, 3, preview="half"))
        release.set()
        assert await result(running) == "done"
        assert running.position == 0 and not running.running
        assert [await result(job) for job in queued] == ["next", 2, 3]
        assert executor.depth == 0


async def test_close_tells_every_waiting_caller_and_lets_the_running_job_finish() -> None:
    """Shutdown answers each waiting caller with JobCancelled (the shutdown text), finishes the running job,
    and refuses new work."""
    log: list[Any] = []
    executor = GpuExecutor()
    executor.start()
    blocker = Blocker("finished")
    running = executor.submit(blocker)
    await blocker.running()
    waiting = [executor.submit(recorder(log, i)) for i in range(3)]

    closing = asyncio.create_task(executor.close())
    await wait_until(lambda: all(job.done() for job in waiting))
    for job in waiting:
        with pytest.raises(JobCancelled, match="shutting down"):
            await result(job)
    with pytest.raises(QueueFull, match="not taking new requests"):
        executor.submit(recorder(log, "late"))
    assert not closing.done()  # still waiting for the running job

    blocker.release.set()
    await asyncio.wait_for(closing, LIMIT)
    assert await result(running) == "finished"
    assert log == []


class Painter:
    """A batch runner as a bound method: each submission passes a new (equal, not identical) bound method."""

    def __init__(self, name: str, calls: list[Any]) -> None:
        self.name, self.calls = name, calls

    def paint(self, payloads: list[Any], reporters: list[Reporter]) -> list[Any]:
        self.calls.append((self.name, list(payloads)))
        for index, report in enumerate(reporters):
            report(Progress(index, len(reporters)))
        return [f"{self.name}:{payload}" for payload in payloads]


async def test_submit_batched_merges_waiting_jobs_of_the_same_runner_and_splits_results() -> None:
    """Waiting jobs of one runner (bound methods of one object included) are run together up to max_batch
    total weight; other jobs keep their order; each job gets its own result and progress."""
    calls: list[Any] = []
    painter, other_painter = Painter("A", calls), Painter("B", calls)

    def plain(report: Reporter) -> str:
        calls.append("plain")
        return "plain"

    def function_runner(payloads: list[Any], reporters: list[Reporter]) -> list[Any]:
        calls.append(("F", list(payloads)))
        return [f"F:{payload}" for payload in payloads]

    async with GpuExecutor(max_batch=5) as executor:
        blocker = Blocker()
        executor.submit(blocker)
        await blocker.running()
        jobs = {
            "a1": executor.submit_batched(painter.paint, 1, weight=2),
            "plain": executor.submit(plain),
            "a2": executor.submit_batched(painter.paint, 2, weight=2),
            "b9": executor.submit_batched(other_painter.paint, 9, weight=1),  # another object: its own batch
            "a3": executor.submit_batched(painter.paint, 3, weight=2),  # 2 + 2 + 2 > 5: next batch
            "a4": executor.submit_batched(painter.paint, 4, weight=1),  # 2 + 2 + 1 = 5 fits
            "f5": executor.submit_batched(function_runner, 5),
            "f6": executor.submit_batched(function_runner, 6),
        }
        blocker.release.set()
        results = {name: await result(job) for name, job in jobs.items()}

    assert calls == [("A", [1, 2, 4]), "plain", ("B", [9]), ("A", [3]), ("F", [5, 6])]
    assert results == {
        "a1": "A:1",
        "plain": "plain",
        "a2": "A:2",
        "b9": "B:9",
        "a3": "A:3",
        "a4": "A:4",
        "f5": "F:5",
        "f6": "F:6",
    }
    # Each member of the batch saw the progress its own reporter was given.
    assert [jobs[name].progress for name in ("a1", "a2", "a4")] == [Progress(i, 3) for i in range(3)]


async def test_a_batch_runner_can_fail_a_single_job() -> None:
    """An exception returned in the runner's result list fails that job only; its batch mates get results."""

    def runner(payloads: list[Any], reporters: list[Reporter]) -> list[Any]:
        return [ValueError(f"no room for {p}") if p == "big" else p.upper() for p in payloads]

    async with GpuExecutor() as executor:
        blocker = Blocker()
        executor.submit(blocker)
        await blocker.running()
        jobs = [executor.submit_batched(runner, p) for p in ("one", "big", "two")]
        blocker.release.set()
        assert await result(jobs[0]) == "ONE"
        with pytest.raises(ValueError, match="no room for big"):
            await result(jobs[1])
        assert await result(jobs[2]) == "TWO"


async def test_a_job_over_the_timeout_is_answered_and_the_next_job_runs() -> None:
    """A job running past job_timeout gets a JobCancelled saying it took too long; the thread is freed at the
    job's next progress report and the next job runs."""
    stopped = threading.Event()

    def endless(report: Reporter) -> None:
        deadline = time.monotonic() + LIMIT
        try:
            while time.monotonic() < deadline:
                report(Progress(0, 1))
                time.sleep(0.005)
        except JobCancelled:
            stopped.set()
            raise
        raise AssertionError("the job was never stopped")

    async with GpuExecutor(job_timeout=0.2) as executor:
        slow = executor.submit(endless)
        after = executor.submit(lambda report: "next")
        with pytest.raises(JobCancelled, match="took longer than"):
            await result(slow)
        assert await result(after) == "next"
        assert stopped.is_set()


async def test_jobs_of_a_closed_executor_are_refused() -> None:
    """Submitting before start() or after close() is a polite QueueFull, not a hang."""
    executor = GpuExecutor()
    with pytest.raises(QueueFull, match="not taking new requests"):
        executor.submit(lambda report: None)
    executor.start()
    assert await result(executor.submit(lambda report: 1)) == 1
    await asyncio.wait_for(executor.close(), LIMIT)
    with pytest.raises(QueueFull):
        executor.submit(lambda report: None)
