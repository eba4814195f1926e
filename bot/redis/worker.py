"""`python -m bot worker`: a GPU worker for EXECUTOR=redis.

It loads the studio, takes from the job stream only as many jobs as it has free slots (WORKER_SLOTS images),
runs them through its own GpuExecutor (so requests taken together batch as they do in the bot), and publishes
each job's progress, previews and outcome to the job's event stream (bot/redis/wire.py has the layout).

Leases. A job's entry stays in the consumer group's pending list, owned by its worker, until the job ends; the
entry's idle time is the lease. Every lease/3 seconds the worker re-claims its own entries (XCLAIM ... JUSTID:
the idle time drops to 0 and the delivery count is left alone) through a script that skips any entry another
worker owns by now, so a worker that was cut off never takes a job back: it learns it lost the job and drops it.
Entries idle longer than the lease belong to a dead worker: any worker takes them over with XAUTOCLAIM, which
counts a delivery, and one delivered more than MAX_DELIVERIES times goes to the dead-letter stream. (A lease key
per job would be a second record of ownership, and a worker could only look at it after XAUTOCLAIM had already
moved the entry and counted a delivery.) A worker finishes a job, acknowledging and deleting its entry, through
a script that first checks it still owns the entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from PIL import Image

from bot.errors import JobCancelled, StartupError, UserFacingError
from bot.executor import GpuExecutor, Job
from bot.jobs import Progress, Reporter
from bot.redis import wire
from bot.requests import ImagineRequest, UpscaleRequest
from bot.settings import Settings

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # previews travel at most this big: the status message shows them as 256 px tiles
CANCEL_POLL_SECONDS = 1.0  # a running job looks for its cancel flag at least this often (and at every report)
SHUTDOWN_GRACE_SECONDS = 60.0  # on SIGTERM, jobs held get this long to finish; the rest are taken over
SORRY = "Sorry, something went wrong on the GPU worker. Please try again in a moment."
SET_ASIDE = (f"Sorry, this request stopped the GPU worker that took it {wire.MAX_DELIVERIES} times, so it "
             "was set aside. Please try a different prompt or settings.")
WITHDRAWN = "This request was cancelled."
INPUT_EXPIRED = "Sorry, this request's images expired before a GPU worker got to it. Please ask again."

# KEYS: the job stream. ARGV: group, consumer, entry ids. Resets the idle time of the entries the consumer still
# owns and returns their ids.
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

# KEYS: the job stream, the job's event stream, then one key per result value. ARGV: group, consumer, entry id,
# ttl, events maxlen, the result values, then the event's field/value pairs. If the consumer still owns the
# entry: store the results, append the event, acknowledge and delete the entry; returns 1, else 0.
FINISH = """
local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)[1]
if not entry or entry[2] ~= ARGV[2] then return 0 end
local results = #KEYS - 2
for i = 1, results do
  redis.call('SET', KEYS[i + 2], ARGV[5 + i], 'EX', ARGV[4])
end
local event = {}
for i = 6 + results, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(event))
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""


@dataclass
class Held:
    """An entry this worker took from the stream, and the local job running it."""

    entry_id: str
    job_id: str
    kind: str
    weight: int
    attempt: int  # 1 when first delivered; more after takeovers
    request: wire.Request
    job: Job[Any] | None = None
    withdrawn: bool = False  # its requester cancelled it
    lost: bool = False  # another worker took it over: this one was presumed dead


class Worker:
    """Pulls jobs from Redis into a local GpuExecutor and reports on them, holding a lease on each."""

    def __init__(self, redis: aioredis.Redis, executor: GpuExecutor, studio: Any, settings: Settings,
                 name: str) -> None:
        self.redis, self.executor, self.studio, self.name = redis, executor, studio, name
        self.slots = settings.worker_slots or settings.max_batch_images
        self.lease = settings.worker_lease_seconds
        self.ttl = settings.result_ttl_seconds
        self.held: dict[str, Held] = {}  # by entry id
        self.stopping = False
        self._slot_freed = asyncio.Event()
        self._claim_cursor = "0-0"
        self._relays: set[asyncio.Task[None]] = set()
        self._heartbeat_script = redis.register_script(HEARTBEAT)
        self._finish_script = redis.register_script(FINISH)

    @property
    def free(self) -> int:
        """Slots (images) not taken by the jobs this worker holds."""
        return self.slots - sum(held.weight for held in self.held.values())

    async def serve(self, stop: asyncio.Event, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Take and run jobs until `stop` is set; then give the jobs held `grace` seconds to finish."""
        await wire.ensure_group(self.redis)
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        try:
            while not stop.is_set():
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
            if self._relays:
                log.info("Stopping: letting %d job(s) finish (up to %.0fs)", len(self._relays), grace)
                await asyncio.wait(self._relays, timeout=grace)
            for held in list(self.held.values()):  # not finished in time: another worker takes them over
                if held.job is not None:
                    held.job.cancel("This GPU worker is shutting down.")
            if self._relays:
                await asyncio.wait(self._relays)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._leave()

    # ---- taking jobs ---------------------------------------------------------------------------------------

    async def _take(self, taken: list[Held]) -> None:
        """Add jobs for the free slots to `taken`: first those whose worker died (lease expired), then new ones.
        Reads one entry at a time, so a worker never holds more than its slots (though the last job taken may
        not fit in full: it then waits in the local queue for the current batch)."""
        while self.free > 0:
            entry = await self._take_over_one() or await self._read_one(block=not taken)
            if entry is None:
                return
            held = await self._admit(*entry)
            if held is not None:
                taken.append(held)

    async def _take_over_one(self) -> tuple[str, dict[bytes, bytes], int] | None:
        """One entry idle longer than the lease (its worker stopped), with how often it has been delivered."""
        next_cursor, claimed, *_deleted = await self.redis.xautoclaim(
            wire.JOBS, wire.GROUP, self.name, int(self.lease * 1000), start_id=self._claim_cursor, count=1)
        self._claim_cursor = next_cursor.decode() if isinstance(next_cursor, bytes) else str(next_cursor)
        for raw_id, fields in claimed:
            entry_id = raw_id.decode()
            if not fields:  # deleted meanwhile (Redis 6.2 reports it so); nothing to run
                await self.redis.xack(wire.JOBS, wire.GROUP, entry_id)
                continue
            pending = await self.redis.xpending_range(wire.JOBS, wire.GROUP, entry_id, entry_id, 1)
            deliveries = pending[0]["times_delivered"] if pending else wire.MAX_DELIVERIES + 1
            log.warning("Taking over entry %s (delivery %d) from a worker that stopped", entry_id, deliveries)
            return entry_id, fields, deliveries
        return None

    async def _read_one(self, *, block: bool) -> tuple[str, dict[bytes, bytes], int] | None:
        """One new entry; waits up to BLOCK_MS for it when `block` (less than the socket timeout)."""
        reply = await self.redis.xreadgroup(wire.GROUP, self.name, {wire.JOBS: ">"}, count=1,
                                            block=wire.BLOCK_MS if block else None)
        for _stream, entries in reply or []:
            for raw_id, fields in entries:
                return raw_id.decode(), fields, 1
        return None

    async def _admit(self, entry_id: str, fields: dict[bytes, bytes], attempt: int) -> Held | None:
        """Hold an entry to run it; or set it aside, skip it when withdrawn, or fail it when unreadable."""
        job_id, kind = wire.field(fields, "job"), wire.field(fields, "kind")
        if entry_id in self.held:  # its own, idle too long while Redis was out of reach: still running here
            return None
        if not job_id:
            log.error("Entry %s is not a job; dropping it", entry_id)
            await self.redis.xack(wire.JOBS, wire.GROUP, entry_id)
            return None
        if attempt > wire.MAX_DELIVERIES:
            await self._set_aside(entry_id, job_id, fields, attempt)
            return None
        if await self.redis.exists(wire.cancel_key(job_id)):
            log.info("Job %s was withdrawn before it started", job_id)
            await self._finish(entry_id, job_id, wire.CANCELLED, text=WITHDRAWN)
            return None
        payload = wire.field(fields, "request")
        try:
            request = await self._load_request(job_id, kind, payload)
        except LookupError:
            await self._finish(entry_id, job_id, wire.FAILED, text=INPUT_EXPIRED)
            return None
        except ValueError:
            log.exception("Job %s has a request this worker cannot read", job_id)
            await self._finish(entry_id, job_id, wire.FAILED, text=SORRY)
            return None
        weight = request.count if isinstance(request, ImagineRequest) else 1
        held = Held(entry_id, job_id, kind, weight, attempt, request)
        self.held[entry_id] = held
        if attempt > 1:
            await self._publish(job_id, wire.RESTARTED, attempt=attempt, worker=self.name)
        return held

    async def _load_request(self, job_id: str, kind: str, payload: str) -> wire.Request:
        count = wire.input_count(payload) if kind == "ask" else 0
        blobs = await self.redis.mget([wire.input_key(job_id, index) for index in range(count)]) if count else []
        if not all(blobs):
            raise LookupError(job_id)
        images = await asyncio.to_thread(lambda: [wire.unpng(blob) for blob in blobs])
        try:
            return wire.decode_request(kind, payload, images)
        except (KeyError, TypeError) as error:
            raise ValueError(str(error)) from error

    async def _set_aside(self, entry_id: str, job_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        """Move an entry that keeps killing workers to the dead-letter stream and tell its requester."""
        log.error("Job %s was delivered %d times without finishing; setting it aside in %s", job_id,
                  deliveries, wire.DEAD)
        record = {**fields, b"entry": entry_id, b"deliveries": deliveries, b"worker": self.name}
        await self.redis.xadd(wire.DEAD, record, maxlen=wire.DEAD_MAXLEN)
        await self._finish(entry_id, job_id, wire.FAILED, text=SET_ASIDE)

    # ---- running jobs --------------------------------------------------------------------------------------

    def _start(self, taken: list[Held]) -> None:
        """Queue the jobs taken in one go without yielding in between, so the executor batches them."""
        for held in taken:
            if isinstance(held.request, ImagineRequest):
                held.job = self.executor.submit_batched(self.imagine_batch, held.request, weight=held.weight,
                                                        kind="imagine")
            elif isinstance(held.request, UpscaleRequest):
                held.job = self.executor.submit(functools.partial(self.studio.upscale, held.request),
                                                kind="upscale")
            else:
                held.job = self.executor.submit(functools.partial(self.studio.ask, held.request), kind="ask")
            task = asyncio.create_task(self._relay(held), name=f"relay-{held.job_id}")
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)

    def imagine_batch(self, requests: list[ImagineRequest], reports: list[Reporter]) -> list[Any]:
        """The batch runner (a bound method, so jobs waiting together batch)."""
        return self.studio.imagine_batch(requests, reports)

    async def _relay(self, held: Held) -> None:
        """Report on one job until it ends, then free its slot. Should Redis fail meanwhile, the job is dropped
        here: its lease runs out and a worker (maybe this one) takes it over."""
        assert held.job is not None
        try:
            await self._run(held, held.job)
        except (aioredis.RedisError, OSError) as error:
            log.warning("Lost Redis while running job %s (%s); it will be taken over", held.job_id, error)
            held.job.cancel("Lost touch with Redis.")
        finally:
            self.held.pop(held.entry_id, None)
            self._slot_freed.set()

    async def _run(self, held: Held, job: Job[Any]) -> None:
        await self._publish(held.job_id, wire.STARTED, attempt=held.attempt, worker=self.name)
        try:
            await self._report_until_done(held, job)
            outcome = await job
        except JobCancelled as error:
            if held.lost or (self.stopping and not held.withdrawn):
                return  # another worker has it, or will once the lease runs out
            kind = wire.CANCELLED if held.withdrawn else wire.FAILED  # withdrawn, or over JOB_TIMEOUT_SECONDS
            await self._finish(held.entry_id, held.job_id, kind, text=str(error))
        except UserFacingError as error:
            await self._finish(held.entry_id, held.job_id, wire.FAILED, text=str(error))
        except Exception:  # one broad catch at the task boundary: the requester hears of it
            log.exception("Job %s failed", held.job_id)
            await self._finish(held.entry_id, held.job_id, wire.FAILED, text=SORRY)
        else:
            if not held.lost:
                results = await asyncio.to_thread(_encode_outcome, outcome)
                await self._finish(held.entry_id, held.job_id, wire.DONE, results=results, count=len(results))

    async def _report_until_done(self, held: Held, job: Job[Any]) -> None:
        """Publish each new progress (throttled by the executor's notify interval; previews always); look for
        the cancel flag at each one, and at least every CANCEL_POLL_SECONDS."""
        last: Progress | None = None
        while not job.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.changed.wait(), CANCEL_POLL_SECONDS)
            job.changed.clear()
            if job.done() or held.lost:
                continue
            progress = job.progress
            if progress is not None and progress is not last:
                last = progress
                withdrawn = await self._publish_progress(held.job_id, progress)
            else:
                withdrawn = bool(await self.redis.exists(wire.cancel_key(held.job_id)))
            if withdrawn:
                log.info("Job %s was withdrawn while running", held.job_id)
                held.withdrawn = True
                job.cancel(WITHDRAWN)

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

    async def _finish(self, entry_id: str, job_id: str, kind: str, *, results: Sequence[bytes] = (),
                      **fields: Any) -> None:
        """Store the results, append the job's last event and let go of its entry, if this worker still owns
        it; a job another worker took over meanwhile is left to that worker."""
        result_keys = [wire.result_key(job_id, index) for index in range(len(results))]
        event = [item for name, value in {"type": kind, **fields}.items() for item in (name, value)]
        owned = await self._finish_script(
            keys=[wire.JOBS, wire.events_key(job_id), *result_keys],
            args=[wire.GROUP, self.name, entry_id, self.ttl, wire.EVENTS_MAXLEN, *results, *event])
        if owned:
            log.info("Job %s: %s", job_id, kind)
        else:
            log.warning("Job %s was taken over by another worker; dropping this run's outcome", job_id)

    # ---- leases --------------------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Every lease/3 seconds, renew the lease on each entry held; drop the ones another worker took over."""
        while True:
            await asyncio.sleep(self.lease / 3)
            entry_ids = list(self.held)
            if not entry_ids:
                continue
            try:
                owned = {raw.decode() for raw in await self._heartbeat_script(
                    keys=[wire.JOBS], args=[wire.GROUP, self.name, *entry_ids])}
            except (aioredis.RedisError, OSError) as error:
                log.warning("Could not renew leases: %s", error)
                continue
            for entry_id in entry_ids:
                held = self.held.get(entry_id)
                if held is not None and entry_id not in owned and not held.lost:
                    log.warning("Job %s was taken over by another worker; stopping it here", held.job_id)
                    held.lost = True
                    if held.job is not None:
                        held.job.cancel("Taken over by another worker.")

    async def _leave(self) -> None:
        """Remove this worker's name from the group, unless it still owns entries (removing would lose them)."""
        with contextlib.suppress(aioredis.RedisError, OSError):
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


async def run_worker(settings: Settings, *, load_studio: Callable[[Settings], Any] | None = None) -> int:
    """Connect to Redis, load the studio on this worker's GPU thread, and serve jobs until SIGTERM/SIGINT."""
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
        async with GpuExecutor(slots, max_batch=settings.max_batch_images,
                               job_timeout=settings.job_timeout_seconds,
                               notify_interval=settings.status_update_seconds) as executor:
            started = time.perf_counter()
            studio = await executor.call(load_studio or _load_studio, settings)
            name = f"{socket.gethostname()}:{os.getpid()}"
            log.info("Worker %s ready in %.1fs: %d slot(s), lease %.1fs, Redis at %s", name,
                     time.perf_counter() - started, slots, settings.worker_lease_seconds, wire.redacted(url))
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            await Worker(redis, executor, studio, settings, name).serve(stop)
    finally:
        await redis.aclose()
    log.info("Worker stopped")
    return 0
