"""`python -m bot worker`: a GPU worker for EXECUTOR=redis.

It loads the studio and takes from the job stream only as many jobs as it has free slots (WORKER_SLOTS
images). It runs them exactly as local mode does: through a `LocalBackend` on its own GpuExecutor, so requests
taken together are batched by the same code as in the bot (questions too). It publishes each job's start,
progress, previews and outcome to the job's event stream, and every lease/3 seconds its own figures
(bot/redis/wire.py has the layout).

Leases. A job's entry stays in the consumer group's pending list, owned by its worker, until the job ends; the
entry's idle time is the lease. Every lease/3 seconds the worker re-claims its own entries (XCLAIM ... JUSTID:
the idle time drops to 0 and the delivery count is left alone) through a script that skips any entry another
worker owns by now, so a worker that was cut off never takes a job back: it learns it lost the job and drops
it. It does so only while its GPU thread makes progress: one that has reported nothing for a lease period is
stuck, so the worker stops renewing (its jobs go to other workers) and exits with EXIT_STUCK. Entries idle
longer than the lease belong to a dead worker: any worker takes them over with XAUTOCLAIM, which counts a
delivery, and one delivered more than MAX_DELIVERIES times goes to the dead-letter stream. A worker that stops
gracefully (SIGTERM) hands its jobs back instead: it makes their entries idle at once and takes back the
delivery it was counted, so a stop is never blamed on a job. (A lease key per job would be a second record of
ownership, and a worker could only look at it after XAUTOCLAIM had already moved the entry and counted a
delivery.) A worker finishes a job, acknowledging and deleting its entry, through a script that first checks
it still owns the entry. An entry no worker can read is set aside in the dead-letter stream at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from PIL import Image

from bot.backends import LocalBackend
from bot.errors import JobCancelled, QueueFull, StartupError, UserFacingError
from bot.executor import GpuExecutor
from bot.jobs import Job, Progress
from bot.redis import wire
from bot.requests import ImagineRequest, UpscaleRequest
from bot.settings import Settings

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # previews travel at most this big: the status message shows them as 256 px tiles
CANCEL_POLL_SECONDS = 1.0  # a running job looks for its cancel flag at least this often (and at every report)
SHUTDOWN_GRACE_SECONDS = 60.0  # on SIGTERM, running jobs get this long to finish; the rest are handed back
EXIT_STUCK = 3  # the exit status of a worker whose GPU thread stopped making progress
SORRY = "Sorry, something went wrong on the GPU worker. Please try again in a moment."
SET_ASIDE = (
    f"Sorry, this request stopped the GPU worker that took it {wire.MAX_DELIVERIES} times, so it "
    "was set aside. Please try a different prompt or settings."
)
UNREADABLE = "Sorry, the GPU worker could not read this request, so it was set aside. Please ask again."
INPUT_EXPIRED = "Sorry, this request's images expired before a GPU worker got to it. Please ask again."
JOB_KINDS = ("ask", "imagine", "upscale")  # the jobs a worker's figures count (not its model's loading)

# KEYS: the job stream. ARGV: group, consumer, entry ids. Resets the idle time of the entries the consumer
# still owns and returns their ids.
HEARTBEAT = """
local owned = {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if entry and entry[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    owned[#owned + 1] = ARGV[i]
  end
end
return owned
"""

# KEYS: the job stream. ARGV: group, consumer, idle ms, entry ids. Of the entries the consumer still owns,
# makes each idle for `idle ms` (so any worker takes it over at once) with one delivery less (the takeover
# counts it again); returns how many.
HAND_BACK = """
local handed = 0
for i = 4, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if entry and entry[2] == ARGV[2] then
    local count = math.max(tonumber(entry[4]) - 1, 0)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i],
               'IDLE', ARGV[3], 'RETRYCOUNT', count, 'JUSTID')
    handed = handed + 1
  end
end
return handed
"""

# KEYS: the job stream, the job's event stream, the result keys, then keys to delete. ARGV: group, consumer,
# entry id, ttl, events maxlen, how many results, how many keys to delete, the result values, then the event's
# field/value pairs (none: no event). If the consumer still owns the entry: store the results, delete the
# keys, append the event, acknowledge and delete the entry; returns 1, else 0.
FINISH = """
local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)[1]
if not entry or entry[2] ~= ARGV[2] then return 0 end
local results, deletes = tonumber(ARGV[6]), tonumber(ARGV[7])
for i = 1, results do
  redis.call('SET', KEYS[2 + i], ARGV[7 + i], 'EX', ARGV[4])
end
for i = 1, deletes do
  redis.call('DEL', KEYS[2 + results + i])
end
if #ARGV > 7 + results then
  local event = {}
  for i = 8 + results, #ARGV do event[#event + 1] = ARGV[i] end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(event))
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""


@dataclass
class Held:
    """An entry this worker took from the stream, and the local job running it."""

    entry_id: str
    job_id: str
    weight: int
    attempt: int  # deliveries counted against the entry: 1 when first delivered, more after takeovers
    request: wire.Request
    inputs: int  # question images stored for it
    job: Job[Any] | None = None
    started: bool = False  # its start was published
    withdrawn: bool = False  # its requester cancelled it
    lost: bool = False  # another worker took it over: this one was presumed dead
    handed_back: bool = False  # this worker is stopping and gave it back

    @property
    def images(self) -> int:
        return self.request.count if isinstance(self.request, ImagineRequest) else 1


class Worker:
    """Pulls jobs from Redis into a LocalBackend and reports on them, holding a lease on each."""

    def __init__(self, redis: aioredis.Redis, backend: LocalBackend, settings: Settings, name: str) -> None:
        self.redis, self.backend, self.name = redis, backend, name
        self.slots = settings.worker_slots or settings.max_batch_images
        self.lease = settings.worker_lease_seconds
        self.ttl = settings.result_ttl_seconds
        self.held: dict[str, Held] = {}  # by entry id
        self.jobs_done = 0
        self.stopping = False
        self.stuck = False  # its GPU thread stopped making progress
        self._stop = asyncio.Event()  # serve's: set by SIGTERM, or here once the GPU thread is stuck
        self._slot_freed = asyncio.Event()
        self._claim_cursor = "0-0"
        self._relays: set[asyncio.Task[None]] = set()
        self._seen_running: dict[int, tuple[Progress | None, float]] = {}  # id(job) -> (progress, since)
        backend.executor.on_stuck = self._gpu_given_up
        self._heartbeat_script = redis.register_script(HEARTBEAT)
        self._hand_back_script = redis.register_script(HAND_BACK)
        self._finish_script = redis.register_script(FINISH)

    @property
    def free(self) -> int:
        """Slots (images) not taken by the jobs this worker holds."""
        return self.slots - sum(held.weight for held in self.held.values())

    async def serve(self, stop: asyncio.Event, grace: float = SHUTDOWN_GRACE_SECONDS) -> int:
        """Take and run jobs until `stop` is set (or the GPU thread is stuck); then give the running jobs
        `grace` seconds to finish and hand the rest back. Returns the exit status: 0, or EXIT_STUCK."""
        self._stop = stop
        await wire.ensure_group(self.redis)
        await self._publish_figures()
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        try:
            while not self._stop.is_set():
                self._slot_freed.clear()
                if self.free <= 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slot_freed.wait(), wire.BLOCK_MS / 1000)
                    continue
                taken: list[Held] = []
                try:
                    await self._take(taken)
                except (aioredis.RedisError, OSError) as error:
                    log.warning("Redis: %s; trying again in a second", error)
                    await asyncio.sleep(1)
                finally:
                    self._start(taken)
        finally:
            self.stopping = True
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self._wind_down(grace)
                await self.redis.delete(wire.worker_key(self.name))
                await self._leave()
        return EXIT_STUCK if self.stuck else 0

    async def _wind_down(self, grace: float) -> None:
        """Hand back at once the jobs that have not started; give the running ones `grace` seconds, then hand
        them back too. A stuck worker hands back only the jobs that have not started: the job it is stuck on
        is taken over once its lease runs out, counting against it."""
        await self._hand_back([held for held in self.held.values() if not self._running(held)])
        if self.stuck:
            for task in self._relays:
                task.cancel()
            return
        if self._relays:
            log.info("Stopping: letting %d job(s) finish (up to %.0fs)", len(self._relays), grace)
            await asyncio.wait(self._relays, timeout=grace)
        await self._hand_back([held for held in self.held.values() if not held.handed_back])
        if self._relays:
            await asyncio.wait(self._relays)

    def _running(self, held: Held) -> bool:
        return held.job is not None and held.job.position == 0 and not held.job.done()

    async def _hand_back(self, handing: list[Held]) -> None:
        """Give jobs back to the stream without counting a delivery against them, and stop them here."""
        if not handing:
            return
        for held in handing:
            held.handed_back = True
        count = await self._hand_back_script(
            keys=[wire.JOBS],
            args=[wire.GROUP, self.name, int(self.lease * 2000), *(held.entry_id for held in handing)],
        )
        log.info("Handed %d job(s) back for other workers", count)
        for held in handing:
            if held.job is not None:
                held.job.cancel("This GPU worker is shutting down.")

    # ---- taking jobs ---------------------------------------------------------------------------------------

    async def _take(self, taken: list[Held]) -> None:
        """Add jobs for the free slots to `taken`: first those whose worker died (lease expired), then new
        ones. Reads one entry at a time, so a worker never holds more than its slots (though the last job
        taken may not fit in full: it then waits in the local queue for the current batch)."""
        while self.free > 0 and not self._stop.is_set():
            entry = await self._take_over_one() or await self._read_one(block=not taken)
            if entry is None:
                return
            held = await self._admit(*entry)
            if held is not None:
                taken.append(held)

    async def _take_over_one(self) -> tuple[str, dict[bytes, bytes], int, bool] | None:
        """One entry idle longer than the lease (its worker stopped), with how often it has been delivered."""
        reply = await self.redis.xautoclaim(
            wire.JOBS, wire.GROUP, self.name, int(self.lease * 1000), start_id=self._claim_cursor, count=1
        )
        next_cursor, claimed = cast(tuple[bytes, wire.StreamEntries], tuple(reply[:2]))
        self._claim_cursor = next_cursor.decode() if isinstance(next_cursor, bytes) else str(next_cursor)
        for raw_id, fields in claimed:
            entry_id = raw_id.decode()
            if not fields:  # deleted meanwhile (Redis 6.2 reports it so); nothing to run
                await self.redis.xack(wire.JOBS, wire.GROUP, entry_id)
                continue
            pending = await self.redis.xpending_range(wire.JOBS, wire.GROUP, entry_id, entry_id, 1)
            deliveries = int(pending[0]["times_delivered"]) if pending else wire.MAX_DELIVERIES + 1
            log.warning("Taking over entry %s (delivery %d) from a worker that stopped", entry_id, deliveries)
            return entry_id, fields, deliveries, True
        return None

    async def _read_one(self, *, block: bool) -> tuple[str, dict[bytes, bytes], int, bool] | None:
        """One new entry; waits up to BLOCK_MS for it when `block` (less than the socket timeout)."""
        reply = await self.redis.xreadgroup(
            wire.GROUP, self.name, {wire.JOBS: ">"}, count=1, block=wire.BLOCK_MS if block else None
        )
        for _stream, entries in cast("list[tuple[bytes, wire.StreamEntries]]", reply or []):
            for raw_id, fields in entries:
                return raw_id.decode(), fields, 1, False
        return None

    async def _admit(
        self, entry_id: str, fields: dict[bytes, bytes], attempt: int, taken_over: bool
    ) -> Held | None:
        """Hold an entry to run it; or set it aside (it keeps killing workers, or cannot be read), skip it
        when withdrawn, or fail it when its images expired."""
        if entry_id in self.held:  # its own, idle too long while Redis was out of reach: still running here
            return None
        if attempt > wire.MAX_DELIVERIES:
            await self._set_aside(
                entry_id,
                fields,
                f"delivered {attempt} times without finishing",
                SET_ASIDE,
                deliveries=attempt,
            )
            return None
        try:
            entry = wire.decode_entry(fields)
            data = entry.data()
        except wire.BadEntry as error:
            await self._set_aside(entry_id, fields, str(error), UNREADABLE)
            return None
        inputs = data.image_count if isinstance(data, wire.AskData) else 0
        if await self.redis.exists(wire.cancel_key(entry.job)):
            log.info("Job %s was withdrawn before it started", entry.job)
            await self._withdrawn(entry_id, entry.job, inputs=inputs, images=entry.weight)
            return None
        found = await wire.get_many(self.redis, [wire.input_key(entry.job, i) for i in range(inputs)])
        blobs = [blob for blob in found if blob]
        if len(blobs) < inputs:
            await self._finish(
                entry_id, entry.job, wire.FAILED, inputs=inputs, images=entry.weight, text=INPUT_EXPIRED
            )
            return None
        try:
            images = await asyncio.to_thread(lambda: [wire.decode_input(blob) for blob in blobs])
        except wire.BadEntry as error:
            await self._set_aside(entry_id, fields, str(error), UNREADABLE)
            return None
        held = Held(entry_id, entry.job, entry.weight, attempt, wire.decode_request(data, images), inputs)
        self.held[entry_id] = held
        if taken_over and await self._had_started(entry.job):
            await self._publish(entry.job, wire.RESTARTED, attempt=attempt, worker=self.name)
        return held

    async def _had_started(self, job_id: str) -> bool:
        """Whether a worker before this one published the job's start."""
        events = await wire.stream_range(self.redis, wire.events_key(job_id), count=wire.EVENTS_MAXLEN)
        return any(fields.get(b"type") == wire.STARTED.encode() for _id, fields in events)

    async def _set_aside(
        self, entry_id: str, fields: dict[bytes, bytes], reason: str, told: str, deliveries: int = 1
    ) -> None:
        """Move an entry to the dead-letter stream with the reason, and tell its requester (if it has a
        readable job id)."""
        job_id = wire.entry_job_id(fields)
        log.error(
            "Setting entry %s (job %s) aside in %s: %s", entry_id, job_id or "unknown", wire.DEAD, reason
        )
        record = {
            **fields,
            b"entry": entry_id,
            b"reason": reason,
            b"deliveries": deliveries,
            b"worker": self.name,
        }
        await self.redis.xadd(wire.DEAD, record, maxlen=wire.DEAD_MAXLEN)  # type: ignore[arg-type]
        if job_id is None:
            await self._finish(entry_id, "unknown", "")
        else:
            await self._finish(
                entry_id, job_id, wire.FAILED, inputs=wire.MAX_IMAGES, images=wire.MAX_COUNT, text=told
            )

    # ---- running jobs --------------------------------------------------------------------------------------

    def _gpu_given_up(self) -> None:
        """The executor gave up on its GPU thread (a timed-out job never gave it back): stop, as a stall
        does."""
        log.critical(
            "The GPU thread is stuck on a timed-out job; letting go of its jobs and exiting with status %d",
            EXIT_STUCK,
        )
        self.stuck = True
        self._stop.set()

    def _start(self, taken: list[Held]) -> None:
        """Queue the jobs taken in one go without yielding in between, so the executor batches them as it does
        in the bot. Should the executor refuse them (its GPU thread is stuck), they stay held, not started,
        and are handed back as the worker stops."""
        for held in taken:
            try:
                if isinstance(held.request, ImagineRequest):
                    held.job = self.backend.imagine(held.request, owner=0)
                elif isinstance(held.request, UpscaleRequest):
                    held.job = self.backend.upscale(held.request, owner=0)
                else:
                    held.job = self.backend.ask(held.request, owner=0)
            except QueueFull:
                self._stop.set()
                return
            task = asyncio.create_task(self._relay(held), name=f"relay-{held.job_id}")
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)

    async def _relay(self, held: Held) -> None:
        """Report on one job until it ends, then free its slot. Should Redis fail meanwhile, the job is
        dropped here: its lease runs out and a worker (maybe this one) takes it over."""
        assert held.job is not None
        try:
            await self._run(held, held.job)
        except (aioredis.RedisError, OSError) as error:
            log.warning("Lost Redis while running job %s (%s); it will be taken over", held.job_id, error)
            held.job.cancel("Lost touch with Redis.")
        finally:
            self.held.pop(held.entry_id, None)
            self._slot_freed.set()
        with contextlib.suppress(aioredis.RedisError, OSError):  # its slot is free, and maybe a job done
            await self._publish_figures()

    async def _run(self, held: Held, job: Job[Any]) -> None:
        try:
            await self._report_until_done(held, job)
            outcome = await job
        except JobCancelled as error:
            if held.lost or held.handed_back or (self.stopping and not held.withdrawn):
                return  # another worker has it, or will at once
            if held.withdrawn:
                await self._withdrawn(held.entry_id, held.job_id, inputs=held.inputs, images=held.images)
            else:  # over JOB_TIMEOUT_SECONDS
                await self._finish_held(held, wire.FAILED, text=str(error))
        except UserFacingError as error:
            await self._finish_held(held, wire.FAILED, text=str(error))
        except Exception:  # one broad catch at the task boundary: the requester hears of it
            log.exception("Job %s failed", held.job_id)
            await self._finish_held(held, wire.FAILED, text=SORRY)
        else:
            if not held.lost:
                results = await asyncio.to_thread(_encode_outcome, outcome)
                if await self._finish_held(held, wire.DONE, results=results, count=len(results)):
                    self.jobs_done += 1

    async def _report_until_done(self, held: Held, job: Job[Any]) -> None:
        """Publish the job's start, then each new progress (throttled by the executor's notify interval;
        previews always); look for the cancel flag at each one, and at least every CANCEL_POLL_SECONDS."""
        last: Progress | None = None
        while not job.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.changed.wait(), CANCEL_POLL_SECONDS)
            job.changed.clear()
            if job.done() or held.lost or held.handed_back:
                continue
            if not held.started and job.position == 0:  # the GPU thread took it
                held.started = True
                await self._publish(held.job_id, wire.STARTED, attempt=held.attempt, worker=self.name)
            progress = job.progress
            if progress is not None and progress is not last:
                last = progress
                withdrawn = await self._publish_progress(held.job_id, progress)
            else:
                withdrawn = bool(await self.redis.exists(wire.cancel_key(held.job_id)))
            if withdrawn:
                log.info("Job %s was withdrawn while running", held.job_id)
                held.withdrawn = True
                job.cancel("This request was cancelled.")

    async def _publish_progress(self, job_id: str, progress: Progress) -> bool:
        """Append a progress or preview event; True when the job's cancel flag is set."""
        fields: dict[str, Any] = {"done": progress.done, "total": progress.total}
        previews: list[bytes] = []
        if isinstance(progress.preview, str):
            fields["text"] = progress.preview
        elif isinstance(progress.preview, Sequence) and progress.preview:
            previews = await asyncio.to_thread(_encode_previews, progress.preview)
        key = wire.events_key(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for index, blob in enumerate(previews):
                pipe.set(wire.preview_key(job_id, index), blob, ex=self.ttl)
            kind = wire.PREVIEW if previews else wire.PROGRESS
            pipe.xadd(key, {"type": kind, "count": len(previews), **fields}, maxlen=wire.EVENTS_MAXLEN)
            pipe.expire(key, self.ttl)
            pipe.exists(wire.cancel_key(job_id))
            *_, withdrawn = await pipe.execute()
        return bool(withdrawn)

    async def _publish(self, job_id: str, kind: str, **fields: Any) -> None:
        key = wire.events_key(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"type": kind, **fields}, maxlen=wire.EVENTS_MAXLEN, approximate=True)
            pipe.expire(key, self.ttl)
            await pipe.execute()

    async def _finish_held(
        self, held: Held, kind: str, *, results: Sequence[bytes] = (), **fields: Any
    ) -> bool:
        return await self._finish(
            held.entry_id,
            held.job_id,
            kind,
            results=results,
            inputs=held.inputs,
            images=held.images,
            **fields,
        )

    async def _finish(
        self,
        entry_id: str,
        job_id: str,
        kind: str,
        *,
        results: Sequence[bytes] = (),
        inputs: int = 0,
        images: int = 0,
        **fields: Any,
    ) -> bool:
        """Store the results, append the job's last event (of type `kind`; none when empty) and let go of its
        entry, deleting the job's inputs and previews, if this worker still owns the entry; a job another
        worker took over meanwhile is left to that worker. True when it did."""
        result_keys = [wire.result_key(job_id, index) for index in range(len(results))]
        spent = [
            *(wire.input_key(job_id, index) for index in range(inputs)),
            *(wire.preview_key(job_id, index) for index in range(images)),
        ]
        pairs = {"type": kind, **fields}.items() if kind else ()
        event = [item for name, value in pairs for item in (name, value)]
        return await self._let_go(
            entry_id, job_id, result_keys, results, spent, event, f"Job {job_id}: {kind}"
        )

    async def _withdrawn(self, entry_id: str, job_id: str, *, inputs: int, images: int) -> None:
        """Let go of a withdrawn job, deleting all of its keys: nobody waits for its outcome any more."""
        await self._let_go(
            entry_id,
            job_id,
            [],
            [],
            wire.job_keys(job_id, inputs=inputs, images=images),
            [],
            f"Job {job_id}: withdrawn",
        )

    async def _let_go(
        self,
        entry_id: str,
        job_id: str,
        result_keys: list[str],
        results: Sequence[bytes],
        spent: list[str],
        event: list[Any],
        what: str,
    ) -> bool:
        owned = await self._finish_script(
            keys=[wire.JOBS, wire.events_key(job_id), *result_keys, *spent],
            args=[
                wire.GROUP,
                self.name,
                entry_id,
                self.ttl,
                wire.EVENTS_MAXLEN,
                len(results),
                len(spent),
                *results,
                *event,
            ],
        )
        if owned:
            log.info("%s", what)
        else:
            log.warning("Job %s was taken over by another worker; dropping this run's outcome", job_id)
        return bool(owned)

    # ---- leases and figures --------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Every lease/3 seconds, while the GPU thread makes progress: renew the lease on each entry held
        (drop the ones another worker took over) and publish this worker's figures. Once it stalls, stop."""
        while True:
            await asyncio.sleep(self.lease / 3)
            if (stalled := self._stalled_for()) > self.lease:
                log.critical(
                    "The GPU thread has reported no progress for %.0fs; letting go of its jobs "
                    "(other workers take them over) and exiting with status %d",
                    stalled,
                    EXIT_STUCK,
                )
                self.stuck = True
                self._stop.set()
                return
            try:
                await self._renew()
                await self._publish_figures()
            except (aioredis.RedisError, OSError) as error:
                log.warning("Could not renew leases: %s", error)

    def _stalled_for(self) -> float:
        """Seconds since the GPU thread last reported on the work it runs (0 when it runs nothing)."""
        now, seen = time.perf_counter(), {}
        stalled = 0.0
        for job in self.backend.executor.running:
            progress, since = self._seen_running.get(id(job), (None, job.started_at or now))
            if job.progress is not progress:
                progress, since = job.progress, now
            seen[id(job)] = (progress, since)
            stalled = max(stalled, now - since)
        self._seen_running = seen
        return stalled

    async def _renew(self) -> None:
        entry_ids = list(self.held)
        if not entry_ids:
            return
        owned = {
            raw.decode()
            for raw in await self._heartbeat_script(
                keys=[wire.JOBS], args=[wire.GROUP, self.name, *entry_ids]
            )
        }
        for entry_id in entry_ids:
            held = self.held.get(entry_id)
            if held is not None and entry_id not in owned and not held.lost and not held.handed_back:
                log.warning("Job %s was taken over by another worker; stopping it here", held.job_id)
                held.lost = True
                if held.job is not None:
                    held.job.cancel("Taken over by another worker.")

    async def _publish_figures(self) -> None:
        """This worker's figures, for /status and the metrics; they expire a lease after, unless renewed."""
        own = self.backend.worker_status()
        figures = own.model_copy(
            update={
                "name": self.name,
                "host": self.name.rpartition(":")[0],
                "slots": self.slots,
                "busy": self.slots - self.free,
                "jobs_done": self.jobs_done,
                "timings": {kind: value for kind, value in own.timings.items() if kind in JOB_KINDS},
            }
        )
        await self.redis.set(wire.worker_key(self.name), figures.model_dump_json(), px=int(self.lease * 1000))

    async def _leave(self) -> None:
        """Remove this worker's name from the group, unless it still owns entries (removing would lose
        them)."""
        summary = await self.redis.xpending_range(wire.JOBS, wire.GROUP, "-", "+", 1, consumername=self.name)
        if not summary:
            await self.redis.xgroup_delconsumer(wire.JOBS, wire.GROUP, self.name)


def _encode_outcome(outcome: Any) -> list[bytes]:
    if isinstance(outcome, str):
        return [outcome.encode()]
    if isinstance(outcome, Image.Image):  # an upscale
        return [wire.png(outcome)]
    return [wire.png_drawing(drawing) for drawing in outcome]


def _encode_previews(previews: Sequence[Image.Image]) -> list[bytes]:
    encoded = []
    for image in previews:
        small = image.copy()
        small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        encoded.append(wire.png(small))
    return encoded


def _load_studio(settings: Settings) -> Any:
    from bot.studio import Studio

    return Studio.load(settings, preview_seconds=settings.preview_seconds)


async def run_worker(
    settings: Settings,
    *,
    load_studio: Callable[[Settings], Any] | None = None,
    grace: float = SHUTDOWN_GRACE_SECONDS,
) -> int:
    """Connect to Redis, load the studio on this worker's GPU thread, and serve jobs until SIGTERM/SIGINT.
    A worker whose GPU thread got stuck exits at once with EXIT_STUCK: that thread cannot be stopped."""
    url = settings.redis_url.get_secret_value() if settings.redis_url else ""
    if not url:
        raise StartupError("A worker needs REDIS_URL, e.g. REDIS_URL=redis://localhost:6379/0")
    redis = wire.connect(url)
    try:
        try:
            await redis.ping()
        except (aioredis.RedisError, OSError) as error:
            raise StartupError(f"REDIS_URL: cannot use Redis at {wire.redacted(url)}: {error}") from None
        slots = settings.worker_slots or settings.max_batch_images
        executor = GpuExecutor(
            slots,
            max_batch=settings.max_batch_images,
            job_timeout=settings.job_timeout_seconds,
            stuck_grace=settings.gpu_stuck_seconds,
            notify_interval=settings.status_update_seconds,
        )
        executor.start()
        started, status = time.perf_counter(), 1
        try:
            studio = await executor.call(load_studio or _load_studio, settings)
            name = f"{socket.gethostname()}:{os.getpid()}"
            log.info(
                "Worker %s ready in %.1fs: %d slot(s), lease %.1fs, Redis at %s",
                name,
                time.perf_counter() - started,
                slots,
                settings.worker_lease_seconds,
                wire.redacted(url),
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            backend = LocalBackend(executor, lambda: studio, settings)
            status = await Worker(redis, backend, settings, name).serve(stop, grace)
        finally:
            if status != EXIT_STUCK:  # else its thread would never be joined
                await executor.close()
    finally:
        await redis.aclose()
    if status == EXIT_STUCK:
        logging.shutdown()
        os._exit(status)  # the stuck GPU thread would keep the interpreter from exiting
    log.info("Worker stopped")
    return status
