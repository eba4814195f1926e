"""The bot's side of EXECUTOR=redis: jobs go into a Redis stream for GPU workers (`python -m bot worker`), and
each job's event stream comes back as the `Job` surface the cogs know from local mode (changed, progress,
position, notice, note, done, cancel, await).

A request made with an `Origin` (a gallery, a question or an upscale) is also written to `janus:bot:awaiting`
until its outcome is handed over. A bot that was restarted mid-job re-attaches to those jobs (`reattach`, once
per kind) and hands each outcome to that kind's delivery hook. Whoever removes a job from that hash (HDEL
returns 1) delivers it, so each job reaches its member at most once; its durable event stream keeps the
outcome meanwhile. The record also keeps the request's charge, so that a re-attached job that fails is
refunded; the interaction's token, with which the restarted bot keeps editing the original response, is kept
apart under a key that expires (janus:job:{id}:reply). A job this process settles itself (it gave up on it,
lost it, or its member withdrew it) loses its record too, so a restarted bot never delivers, pings or refunds
it again; and a job's keys are deleted once its outcome was taken.

The GPU workers publish their figures with an expiry; while none has been seen for a lease period, the jobs
waiting say so (`notice`), and /status too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from PIL import Image
from redis.exceptions import OutOfMemoryError

from bot.backends import NOT_ACCEPTING, Deliver
from bot.errors import BadPrompt, JobCancelled, JobFailed, QueueFull, StartupError, UserFacingError
from bot.executor import Job
from bot.jobs import Charge, JobKind, Origin, Progress
from bot.redis import wire
from bot.requests import AskRequest, Drawing, ImagineRequest, UpscaleRequest
from bot.settings import Settings
from bot.status import BackendStatus, WorkerStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

UNREACHABLE = "Sorry, I can't reach the GPU workers right now. Please try again in a minute."
FULL = "Sorry, the GPU workers' queue is out of room right now. Please try again in a few minutes."
LOST = "Sorry, this request got lost on its way to the GPU. Please try again."
EXPIRED = "Sorry, this request's result expired before I could deliver it. Please try again."
SILENT = "Sorry, the GPU worker running this request stopped answering. Please try again."
TOO_LARGE = "Sorry, these images are too large to send to a GPU worker. Please try fewer or smaller ones."
REFUSED = "Sorry, the GPU workers can't take this request ({})."
ELSEWHERE = "This request's result was delivered by another instance of the bot."
NO_WORKER = "No GPU worker is online right now: your request waits for one to come online."
UNREACHABLE_AFTER_SECONDS = 60.0
RESTARTED_NOTE = "A GPU worker stopped while working on this, so another one started it over."
TOKEN_SECONDS = 15 * 60  # an interaction token's life: no use keeping it longer


class RedisJob(Job[T]):
    """A job run by a GPU worker somewhere, seen through its event stream."""

    def __init__(
        self,
        backend: RedisBackend,
        *,
        job_id: str,
        kind: str,
        owner: int,
        weight: int,
        origin: Origin | None = None,
        charge: Charge | None = None,
    ) -> None:
        super().__init__(kind=kind, owner=owner, weight=weight, loop=asyncio.get_running_loop())
        self.id, self.origin, self.charge, self._backend = job_id, origin, charge, backend
        self.entry_id: str | None = None  # the job stream's entry, once written
        self.inputs = 0  # question images stored for it
        self.attempt = 0  # which delivery of the entry last started it
        self.claimed = False  # this process removed the job from the awaiting hash, so it delivers it
        self.heard = time.perf_counter()  # when its last event arrived
        self._position = 1

    @property
    def position(self) -> int:
        """1 for the next job a worker takes, 2 behind it, ...; 0 once it runs or has finished."""
        return 0 if self.started_at is not None or self.future.done() else self._position

    def cancel(self, reason: str = "This request was cancelled.") -> bool:
        """Withdraw the job: workers skip it if it has not started and stop it at its next report if it
        has."""
        if self.future.done():
            return False
        self.future.set_exception(JobCancelled(reason))
        self.finished_at = time.perf_counter()
        self.changed.set()
        self._backend.withdraw(self)
        return True

    def keys(self) -> list[str]:
        """Every key of this job."""
        return wire.job_keys(self.id, inputs=self.inputs, images=self.weight if self.kind == "imagine" else 1)


class RedisBackend:
    """Jobs for GPU workers through Redis streams; the bot only queues requests and watches their events."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis, self.settings = redis, settings
        self.ttl = settings.result_ttl_seconds
        self.jobs: dict[str, RedisJob[Any]] = {}  # followed jobs by id
        self.closing = False
        self.accepting = True  # False once the bot is shutting down: new requests are refused
        self.online: bool | None = None  # whether a GPU worker was seen within a lease; None: not looked yet
        self._watcher: asyncio.Task[None] | None = None
        self._last_queued: asyncio.Future[None] | None = None  # done once the last job submitted is queued
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: Settings) -> AsyncIterator[RedisBackend]:
        """Connect to REDIS_URL (a StartupError naming the setting if it can't), yield, and close at exit."""
        url = settings.redis_url.get_secret_value() if settings.redis_url else ""
        if not url:
            raise StartupError("EXECUTOR=redis needs REDIS_URL, e.g. REDIS_URL=redis://localhost:6379/0")
        redis = wire.connect(url)
        try:
            await redis.ping()
            await wire.ensure_group(redis)
        except (aioredis.RedisError, OSError) as error:
            await redis.aclose()
            raise StartupError(f"REDIS_URL: cannot use Redis at {wire.redacted(url)}: {error}") from None
        log.info("Jobs go to GPU workers through Redis at %s", wire.redacted(url))
        backend = cls(redis, settings)
        try:
            yield backend
        finally:
            await backend.close()

    def stop_accepting(self) -> None:
        self.accepting = False

    async def close(self) -> None:
        """Stop following jobs without withdrawing them: workers finish them, and the next run re-attaches."""
        self.closing = True
        for job in list(self.jobs.values()):  # their waiters in this process stop; a restarted bot takes over
            if not job.future.done():
                job.handed_over = job.origin is not None
                job.future.cancel()
                job.changed.set()
        if self._watcher is not None:
            self._watcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        watching = [self._watcher] if self._watcher else []
        await asyncio.gather(*self._tasks, *watching, return_exceptions=True)
        await self.redis.aclose()

    # ---- the Backend protocol ------------------------------------------------------------------------------

    def ask(
        self, request: AskRequest, *, owner: int, origin: Origin | None = None, charge: Charge | None = None
    ) -> RedisJob[str]:
        return self._submit(request, owner=owner, weight=1, origin=origin, charge=charge)

    def imagine(
        self,
        request: ImagineRequest,
        *,
        owner: int,
        origin: Origin | None = None,
        charge: Charge | None = None,
    ) -> RedisJob[list[Drawing]]:
        return self._submit(request, owner=owner, weight=request.count, origin=origin, charge=charge)

    def upscale(
        self,
        request: UpscaleRequest,
        *,
        owner: int,
        origin: Origin | None = None,
        charge: Charge | None = None,
    ) -> RedisJob[Image.Image]:
        return self._submit(request, owner=owner, weight=1, origin=origin, charge=charge)

    def jobs_of(self, owner: int) -> int:
        return sum(1 for job in self.jobs.values() if job.owner == owner and not job.done())

    async def status(self) -> BackendStatus:
        waiting, running = await self.queue_depth()
        return BackendStatus(waiting=waiting, running=running, workers=await self.workers(), remote=True)

    async def workers(self) -> tuple[WorkerStatus, ...]:
        """The live GPU workers, as each last published itself (its record expires a lease after that)."""
        keys = [key async for key in self.redis.scan_iter(match=wire.worker_key("*"), count=1000)]
        records = await wire.get_many(self.redis, keys)
        workers = []
        for record in records:
            if record is None:  # expired since the scan
                continue
            try:
                workers.append(WorkerStatus.model_validate_json(record))
            except ValueError:
                log.warning("Ignoring an unreadable worker record in Redis")
        return tuple(sorted(workers, key=lambda worker: worker.name))

    async def queue_depth(self) -> tuple[int, int]:
        """(waiting, running) over every bot's jobs, read from Redis: entries no worker has taken yet, and
        entries workers hold (they take no more than they have free slots for, so they run them)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(wire.JOBS)
            pipe.xpending(wire.JOBS, wire.GROUP)
            length, pending = await pipe.execute()
        held = int(pending["pending"])
        return max(length - held, 0), held

    # ---- submitting and withdrawing ------------------------------------------------------------------------

    def _submit(
        self, request: wire.Request, *, owner: int, weight: int, origin: Origin | None, charge: Charge | None
    ) -> RedisJob[Any]:
        if self.closing or not self.accepting:
            raise QueueFull(NOT_ACCEPTING)
        waiting = sum(1 for job in self.jobs.values() if job.position)
        if waiting >= self.settings.queue_size:
            raise QueueFull(f"{waiting} requests are already waiting; please try again in a minute.")
        job_id = uuid.uuid4().hex
        try:
            entry, images = wire.encode_request(job_id, request)  # the schema the workers check it against
        except wire.BadEntry as error:
            raise BadPrompt(REFUSED.format(error)) from None
        job: RedisJob[Any] = RedisJob(
            self, job_id=job_id, kind=entry.kind, owner=owner, weight=weight, origin=origin, charge=charge
        )  # the charge goes into its record
        if self.online is False:
            job.notice = NO_WORKER
        self.jobs[job.id] = job
        self._watch_workers()
        turn, self._last_queued = self._last_queued, asyncio.get_running_loop().create_future()
        self._spawn(self._queue_and_follow(job, entry, images, turn, self._last_queued), f"job-{job.id}")
        return job

    async def _queue_and_follow(
        self,
        job: RedisJob[Any],
        entry: wire.Entry,
        images: list[Any],
        after: asyncio.Future[None] | None,
        queued: asyncio.Future[None],
    ) -> None:
        """Queue the job once the job submitted before it is queued (the queue keeps submission order), then
        follow it."""
        try:
            failure = await self._queue_in_turn(job, entry, images, after)
        finally:
            if not queued.done():
                queued.set_result(None)
        if failure is not None or job.future.done():
            self.jobs.pop(job.id, None)
            if failure is not None:
                self._settle(job, failure)
            elif job.entry_id is not None:  # cancelled while written: the withdrawal could not reach it
                await self._withdraw(job)
            return
        with contextlib.suppress(aioredis.RedisError, OSError):  # its place in line at once, not in a second
            await self._check_queue(job, wire.events_key(job.id), "0-0")
        await self._follow(job)

    async def _queue_in_turn(
        self, job: RedisJob[Any], entry: wire.Entry, images: list[Any], after: asyncio.Future[None] | None
    ) -> JobFailed | None:
        """Encode the job's images (alongside the jobs before it), wait for the one before it to be queued,
        and queue it; the failure to tell its requester, if it could not be."""
        try:
            try:
                blobs = await asyncio.to_thread(wire.encode_inputs, images)
            finally:
                if after is not None:
                    await asyncio.wait([after])
            await self._queue(job, entry, blobs)
        except wire.BadEntry:
            return JobFailed(TOO_LARGE)
        except OutOfMemoryError:  # its maxmemory with the noeviction policy (docker-compose.yml)
            log.error("Redis refused job %s: it is out of memory (maxmemory)", job.id)
            return JobFailed(FULL)
        except (aioredis.RedisError, OSError) as error:
            log.error("Could not queue %s job %s: %s", job.kind, job.id, error)
            return JobFailed(UNREACHABLE)
        return None

    async def _queue(self, job: RedisJob[Any], entry: wire.Entry, blobs: list[bytes]) -> None:
        """Write the request's images (reduced), the awaiting record (with an origin) and the entry, in one
        transaction."""
        job.inputs = len(blobs)
        if job.future.done():
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for index, blob in enumerate(blobs):
                pipe.set(wire.input_key(job.id, index), blob, ex=self.ttl)
            if job.origin is not None:
                origin = job.origin
                record = wire.Awaiting(
                    kind=entry.kind,
                    owner=job.owner or 0,
                    guild=origin.guild_id,
                    channel=origin.channel_id,
                    message=origin.message_id,
                    request=entry.request,
                    inputs=len(blobs),
                    charge=None if job.charge is None else wire.ChargeData.of(job.charge),
                )
                pipe.hset(wire.AWAITING, job.id, record.model_dump_json())
                if origin.token:
                    reply = wire.Reply(
                        application=origin.application_id, token=origin.token, created=origin.created_at
                    )
                    pipe.set(wire.reply_key(job.id), reply.model_dump_json(), ex=min(self.ttl, TOKEN_SECONDS))
            pipe.xadd(wire.JOBS, entry.fields())  # type: ignore[arg-type]
            *_, entry_id = await pipe.execute()
        job.entry_id = entry_id.decode()
        log.debug("Queued %s job %s as entry %s", entry.kind, job.id, job.entry_id)

    def withdraw(self, job: RedisJob[Any]) -> None:
        """Tell the workers a job is no longer wanted (not when the bot is only going away: it comes back)."""
        if self.closing or job.entry_id is None:  # not written yet: _queue_and_follow withdraws it afterwards
            return
        self._spawn(self._withdraw(job), f"withdraw-{job.id}")

    async def _withdraw(self, job: RedisJob[Any]) -> None:
        """Raise the job's cancel flag, for the worker that takes or runs it, and forget the job here: its
        record, token and images (the worker deletes the rest)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(wire.cancel_key(job.id), 1, ex=self.ttl)
            pipe.hdel(wire.AWAITING, job.id)
            pipe.delete(wire.reply_key(job.id), *(wire.input_key(job.id, i) for i in range(job.inputs)))
            await pipe.execute()

    # ---- following a job's events --------------------------------------------------------------------------

    async def _follow(self, job: RedisJob[Any]) -> None:
        """Apply the job's events until it ends, riding out Redis hiccups for up to a minute."""
        key, cursor, failing_since = wire.events_key(job.id), "0-0", None
        job.heard = time.perf_counter()
        try:
            while not job.future.done():
                try:
                    cursor = await self._poll(job, key, cursor)
                except (aioredis.RedisError, OSError) as error:
                    failing_since = failing_since or time.perf_counter()
                    if time.perf_counter() - failing_since > UNREACHABLE_AFTER_SECONDS:
                        log.error("Lost Redis while following job %s: %s", job.id, error)
                        await self._give_up(job, UNREACHABLE)
                    else:
                        log.warning("Following job %s: %s; retrying", job.id, error)
                        await asyncio.sleep(1)
                else:
                    failing_since = None
        finally:
            if self.jobs.get(job.id) is job:
                del self.jobs[job.id]

    async def _poll(self, job: RedisJob[Any], key: str, cursor: str) -> str:
        """Apply the events after `cursor` (waiting up to BLOCK_MS for some); return the new cursor. Without
        news, keep a waiting job's position current, and give up on a running job no worker has spoken of for
        longer than a job may take plus two leases."""
        events = await wire.read_stream(self.redis, key, cursor, block=wire.BLOCK_MS)
        for event_id, fields in events:
            cursor, job.heard = event_id.decode(), time.perf_counter()
            if await self._apply(job, fields):
                return cursor
        if events:
            return cursor
        patience = self.settings.job_timeout_seconds + 2 * self.settings.worker_lease_seconds
        if job.started_at is None:
            await self._check_queue(job, key, cursor)
        elif time.perf_counter() - job.heard > patience:
            log.error("No word on running job %s for too long; giving up", job.id)
            await self._give_up(job, SILENT)
        return cursor

    async def _check_queue(self, job: RedisJob[Any], key: str, last_id: str) -> None:
        """Update a waiting job's position; a job whose entry vanished without an outcome was lost."""
        entry_id = job.entry_id
        if entry_id is None:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_groups(wire.JOBS)
            pipe.xrange(wire.JOBS, entry_id, entry_id)
            groups, entry = await pipe.execute()
        if not entry:  # its worker deletes the entry in the same step as it writes the outcome: read it
            for _event_id, fields in await wire.read_stream(self.redis, key, last_id):
                if await self._apply(job, fields):
                    return
            log.error("Job %s left the queue without an outcome", job.id)
            await self._give_up(job, LOST, gone=True)
            return
        delivered = max((_entry_order(g["last-delivered-id"]) for g in groups), default=(0, 0))
        if _entry_order(entry_id) <= delivered:
            position = 1  # a worker holds it and starts it with its next batch
        else:
            start = "-" if delivered == (0, 0) else "({}-{}".format(*delivered)
            ahead = await wire.stream_range(self.redis, wire.JOBS, start, f"({entry_id}", count=1000)
            position = len(ahead) + 1
        if position != job._position:
            job._position = position
            job.changed.set()

    async def _apply(self, job: RedisJob[Any], fields: dict[bytes, bytes]) -> bool:
        """Apply one event; True once the job has ended."""
        kind = wire.field(fields, "type")
        if kind == wire.STARTED:
            job.started_at = job.started_at or time.perf_counter()
            job.attempt = int(wire.field(fields, "attempt", "1"))
            job.notice = None
        elif kind == wire.RESTARTED:
            job.note, job.progress = RESTARTED_NOTE, None
        elif kind == wire.PROGRESS:  # with the answer so far, for a question
            done, total = int(wire.field(fields, "done")), int(wire.field(fields, "total"))
            job.progress = Progress(done, total, wire.field(fields, "text") or None)
        elif kind == wire.PREVIEW:  # with the images drawn so far, stored under their own keys
            done, total = int(wire.field(fields, "done")), int(wire.field(fields, "total"))
            keys = [wire.preview_key(job.id, index) for index in range(int(wire.field(fields, "count")))]
            blobs = await wire.get_many(self.redis, keys)
            if all(blobs):  # else overwritten by a later preview meanwhile, or expired: the next one will do
                images = await asyncio.to_thread(lambda: [wire.unpng(blob) for blob in blobs if blob])
                job.progress = Progress(done, total, images)
        elif kind in wire.TERMINAL:
            await self._end(job, kind, fields)
            return True
        job.changed.set()
        return False

    async def _end(self, job: RedisJob[Any], kind: str, fields: dict[bytes, bytes]) -> None:
        """Take the job's outcome, if this process is the one to deliver it, and delete the job's keys."""
        if not await self._claim(job):
            return
        outcome: Any
        if kind == wire.DONE:
            count = int(wire.field(fields, "count"))
            keys = [wire.result_key(job.id, index) for index in range(count)]
            found = await wire.get_many(self.redis, keys)
            blobs = [blob for blob in found if blob]
            if not blobs or len(blobs) < count:
                outcome = JobFailed(EXPIRED)
            elif job.kind == "ask":
                outcome = blobs[0].decode()
            elif job.kind == "upscale":
                outcome = await asyncio.to_thread(wire.unpng, blobs[0])
            else:
                outcome = await asyncio.to_thread(lambda: [wire.unpng_drawing(blob) for blob in blobs])
        elif kind == wire.FAILED:
            outcome = JobFailed(wire.field(fields, "text") or LOST)
        else:
            outcome = JobCancelled(wire.field(fields, "text") or "This request was cancelled.")
        await self.redis.delete(*job.keys())
        self._settle(job, outcome)

    async def _claim(self, job: RedisJob[Any]) -> bool:
        """Remove the job from the awaiting hash, to be the one that delivers it (a job without an origin is
        this process's alone). False, with the job settled as `elsewhere`, when another process of the bot
        (one that re-attached) removed it first."""
        if job.origin is None or job.claimed:
            return True
        job.claimed = bool(await self.redis.hdel(wire.AWAITING, job.id))
        if not job.claimed:
            log.info("Job %s is being delivered elsewhere", job.id)
            job.elsewhere = True
            self._settle(job, JobCancelled(ELSEWHERE))
        return job.claimed

    async def _give_up(self, job: RedisJob[Any], text: str, *, gone: bool = False) -> None:
        """Fail a job this process stops waiting for, after forgetting it in Redis: its record (so no
        restarted bot delivers or refunds it again) and keys, with the cancel flag raised for a worker that
        may still have it (unless its entry is `gone`). Should Redis be out of reach, that is retried until it
        is back."""
        try:
            if not await self._claim(job):
                return
            await self._forget(job, gone)
        except (aioredis.RedisError, OSError) as error:
            log.warning("Could not forget job %s in Redis (%s); trying again until it answers", job.id, error)
            self._spawn(self._forget_later(job, gone), f"forget-{job.id}")
        self._settle(job, JobFailed(text))

    async def _forget(self, job: RedisJob[Any], gone: bool) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(wire.AWAITING, job.id)
            pipe.delete(*job.keys())
            if not gone:
                pipe.set(wire.cancel_key(job.id), 1, ex=self.ttl)
            await pipe.execute()

    async def _forget_later(self, job: RedisJob[Any], gone: bool) -> None:
        while True:
            await asyncio.sleep(1)
            try:
                await self._forget(job, gone)
            except (aioredis.RedisError, OSError):
                continue
            log.info("Forgot job %s in Redis", job.id)
            return

    @staticmethod
    def _settle(job: RedisJob[Any], outcome: Any) -> None:
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
        job.finished_at = time.perf_counter()
        job.changed.set()

    # ---- the workers ---------------------------------------------------------------------------------------

    def _watch_workers(self) -> None:
        if self._watcher is None and not self.closing:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="watch-workers")

    async def _watch(self) -> None:
        """While jobs wait, look for a live GPU worker about three times a lease; while there is none, they
        say so."""
        period = min(self.settings.worker_lease_seconds / 3, wire.BLOCK_MS / 1000)
        while any(job.started_at is None and not job.done() for job in self.jobs.values()):
            try:
                online = await self._any_worker()
            except (aioredis.RedisError, OSError) as error:
                log.debug("Could not look for GPU workers: %s", error)
            else:
                if online != self.online:
                    if not online:
                        log.warning(
                            "No GPU worker has been seen for %gs; requests wait for one",
                            self.settings.worker_lease_seconds,
                        )
                    elif self.online is False:
                        log.info("A GPU worker is online again")
                    self.online = online
                    for job in self.jobs.values():
                        if job.started_at is None and not job.done():
                            job.notice = None if online else NO_WORKER
                            job.changed.set()
            await asyncio.sleep(period)
        self._watcher = None

    async def _any_worker(self) -> bool:
        async for _key in self.redis.scan_iter(match=wire.worker_key("*"), count=1000):
            return True
        return False

    # ---- after a restart -----------------------------------------------------------------------------------

    async def reattach(self, kind: JobKind, deliver: Deliver) -> int:
        """Follow again the jobs of `kind` an earlier run of the bot was awaiting. `deliver(job, request,
        origin)` is called at once for each, to show the job's progress and then deliver it; the origin has
        the interaction's token while it lives (and a question's message id), and `job.charge` is the
        request's charge. A job another process claimed first ends with JobCancelled and `job.elsewhere` set:
        it is not this one's to deliver. An unreadable record is dropped. Returns how many were picked up."""
        awaiting = cast(dict[bytes, bytes], await self.redis.hgetall(wire.AWAITING))
        entries = await wire.stream_range(self.redis, wire.JOBS)  # short: an entry is deleted as its job ends
        queued = {fields.get(b"job", b""): entry_id.decode() for entry_id, fields in entries}
        picked = 0
        for raw_id, raw_record in awaiting.items():
            job_id = raw_id.decode(errors="replace")
            if job_id in self.jobs:
                continue
            try:
                record = wire.Awaiting.model_validate_json(raw_record)
                if record.kind != kind:
                    continue
                request = wire.decode_request(wire.request_data(record.kind, record.request), [])
            except ValueError as error:  # pydantic's and BadEntry
                log.error("Dropping the unreadable record of job %s: %s", job_id, str(error).splitlines()[0])
                await self.redis.hdel(wire.AWAITING, raw_id)
                continue
            raw_reply = await wire.get_one(self.redis, wire.reply_key(job_id))  # gone once the token is
            reply = wire.Reply.model_validate_json(raw_reply) if raw_reply else None
            job: RedisJob[Any] = RedisJob(
                self,
                job_id=job_id,
                kind=kind,
                owner=record.owner,
                weight=request.count if isinstance(request, ImagineRequest) else 1,
                origin=Origin(
                    record.guild,
                    record.channel,
                    reply.application if reply else 0,
                    reply.token if reply else "",
                    record.message,
                    reply.created if reply else 0.0,
                ),
                charge=record.charge.charge() if record.charge else None,
            )
            job.entry_id = queued.get(raw_id, "0-1")  # not queued any more: ran or is running (or was lost)
            job.inputs = record.inputs
            self.jobs[job_id] = job
            self._spawn(self._follow(job), f"reattached-{job_id}")
            self._spawn(deliver(job, request, job.origin), f"deliver-{job_id}")  # type: ignore[arg-type]
            picked += 1
        self._watch_workers()
        if picked:
            log.info("Re-attached to %d %s job(s) an earlier run was waiting for", picked, kind)
        return picked

    # ---- tasks ---------------------------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, UserFacingError):
            return
        if error is not None:
            log.error("Task %s failed", task.get_name(), exc_info=error)


def _entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as a comparable (milliseconds, sequence)."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


@asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[RedisBackend | None]:
    """The Redis backend when EXECUTOR=redis, else None (the bot keeps its in-process LocalBackend)."""
    if settings.executor != "redis":
        yield None
        return
    async with RedisBackend.connect(settings) as backend:
        yield backend
