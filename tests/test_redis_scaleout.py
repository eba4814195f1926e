"""Scale-out through Redis (EXECUTOR=redis): a real redis-server, real worker processes (`python -m
scaleout_procs worker`: bot.redis.worker with a fast fake studio), the bot's RedisBackend in this process.
Leases are 1.5 s, so a takeover happens within about two seconds; every wait has a deadline."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path

import discord
import discord.http
import pytest
import redis.asyncio as aioredis
from PIL import Image, ImageChops, ImageStat
from scaleout_procs import FAIL_SEED, color
from scene import decode, open_scene, text_displays, text_of
from settings_for_tests import settings_for_tests

from bot.client import JanusBot
from bot.errors import BadPrompt, JobCancelled, JobFailed, QueueFull
from bot.executor import GpuExecutor
from bot.jobs import Origin
from bot.redis import wire
from bot.redis.backend import NO_WORKER, RESTARTED_NOTE, RedisBackend
from bot.redis.worker import EXIT_STUCK
from bot.requests import AskRequest, ImagineRequest, Turn, UpscaleRequest
from bot.settings import Settings
from bot.status import WorkerStatus
from bot.store import UsageStore

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="needs redis-server (apt-get install redis-server; .ci/run has it)",
)

TESTS = Path(__file__).parent
LEASE = 1.5


async def until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `check` until it is truthy, or fail after `timeout` seconds."""
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throw-away redis-server on a free local port, without persistence."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path_factory.mktemp("redis")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.perf_counter() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.perf_counter() < deadline and server.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on an empty database."""
    client = wire.connect(redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return settings_for_tests(
        discord_token="test-token",
        executor="redis",
        redis_url=redis_url,
        worker_lease_seconds=LEASE,
        status_update_seconds=0.05,
        result_ttl_seconds=120,
        data_dir=tmp_path / "data",
        upscaler_weights="none",
    )


class Processes:
    """Worker (and bot-side) processes of one test; all killed at its end."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.tmp_path, self.runs_file = tmp_path, tmp_path / "runs.txt"
        path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
        self.env = {
            **os.environ,
            "PYTHONPATH": path,
            "REDIS_URL": settings.redis_url.get_secret_value(),  # type: ignore[union-attr]
            "WORKER_LEASE_SECONDS": str(LEASE),
            "STATUS_UPDATE_SECONDS": "0.05",
            "RESULT_TTL_SECONDS": "120",
            "FAKE_RUNS": str(self.runs_file),
            "LOG_LEVEL": "INFO",
            "SCHEDULER": "batch",  # the workers' stand-in studios replace Studio's batch methods
        }
        self.started: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def spawn(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"proc-{len(self.started)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "scaleout_procs", *args],
            cwd=self.tmp_path,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
        )
        self.started.append(process)
        self.logs[process.pid] = log
        return process

    async def worker(self, mode: str = "worker", **env: str) -> subprocess.Popen[bytes]:
        """A worker process (`real-worker`: with the real studio), once it is ready to take jobs."""
        process = self.spawn(mode, **env)
        await until(
            lambda: b"ready" in self.logs[process.pid].read_bytes() or process.poll() is not None,
            30 if mode == "worker" else 120,
            "a worker to start",
        )
        assert process.poll() is None, self.logs[process.pid].read_text()
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        return self.logs[process.pid].read_text()

    def outcomes(self, job_id: str) -> list[str]:
        """Every outcome a worker wrote for a job (its log says so)."""
        return [
            line.rpartition(": ")[2]
            for path in self.logs.values()
            for line in path.read_text().splitlines()
            if f"Job {job_id}: " in line
        ]

    def runs(self) -> list[tuple[int, str]]:
        """(worker pid, prompt) of every request a fake studio started, in order."""
        lines = self.runs_file.read_text().splitlines() if self.runs_file.exists() else []
        return [(int(pid), prompt) for pid, prompt in (line.split(" ", 1) for line in lines)]

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            if process.stdout:
                process.stdout.close()


@pytest.fixture
def procs(settings: Settings, tmp_path: Path, redis: aioredis.Redis) -> Iterator[Processes]:
    processes = Processes(settings, tmp_path)
    yield processes
    processes.stop()


@pytest.fixture
async def backend(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[RedisBackend]:
    async with RedisBackend.connect(settings) as connected:
        yield connected


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


async def nothing_left(redis: aioredis.Redis) -> None:
    """No job entry is pending or waiting, and no job left a key or record behind (results and events too)."""
    assert (await redis.xpending(wire.JOBS, wire.GROUP))["pending"] == 0
    assert await redis.xlen(wire.JOBS) == 0
    assert await redis.keys("janus:job:*") == []
    assert await redis.hlen(wire.AWAITING) == 0


def colors(prompt: str, seed: int, count: int) -> list[tuple[int, int, int]]:
    return [color(prompt, seed, index) for index in range(count)]


# ---- leases and takeovers ---------------------------------------------------------------------------------


async def test_a_killed_workers_job_is_taken_over_and_delivered_once(procs, backend, redis):
    first = await procs.worker()
    prompt = "a fox in snow slow:1.5"
    job = backend.imagine(ImagineRequest(prompt, count=2, seed=1), owner=7)
    await until(lambda: job.progress is not None, 15, "the first worker's progress")
    kill(first)
    second = await procs.worker()

    drawings = await asyncio.wait_for(job, 20)

    assert [d.image.getpixel((0, 0)) for d in drawings] == colors(prompt, 1, 2)
    assert [d.tokens for d in drawings] == [(1, 0), (1, 1)]  # the image tokens travel with the images
    assert job.note == RESTARTED_NOTE and job.attempt == 2  # the entry was delivered twice
    assert procs.outcomes(job.id) == ["done"]  # exactly one outcome
    assert procs.runs() == [(first.pid, prompt), (second.pid, prompt)]
    await nothing_left(redis)


async def test_a_long_job_on_a_live_worker_is_not_taken_over(procs, backend, redis):
    await procs.worker()
    await procs.worker()  # idle, looking for expired leases all along
    prompt = f"a slow tortoise slow:{3 * LEASE}"
    job = backend.imagine(ImagineRequest(prompt, count=1), owner=7)

    await asyncio.wait_for(job, 30)

    assert [prompt for _pid, prompt in procs.runs()] == [prompt]
    assert job.note is None and job.attempt == 1
    assert procs.outcomes(job.id) == ["done"]
    await nothing_left(redis)


# ---- slots, cancel --------------------------------------------------------------------------------------


async def test_workers_hold_no_more_jobs_than_their_free_slots(procs, backend, redis):
    await asyncio.gather(procs.worker(WORKER_SLOTS="2"), procs.worker(WORKER_SLOTS="2"))
    jobs = [
        backend.imagine(ImagineRequest(f"pebble {i} slow:0.6", count=1, seed=i), owner=i) for i in range(8)
    ]
    most: dict[bytes, int] = {}

    async def sample() -> None:
        while not all(job.done() for job in jobs):
            for consumer in (await redis.xpending(wire.JOBS, wire.GROUP))["consumers"]:
                most[consumer["name"]] = max(most.get(consumer["name"], 0), consumer["pending"])
            await asyncio.sleep(0.01)

    await asyncio.wait_for(asyncio.gather(sample(), *jobs), 30)

    assert len(most) == 2 and all(1 <= held <= 2 for held in most.values()), most
    assert len({pid for pid, _prompt in procs.runs()}) == 2  # neither worker was starved
    await nothing_left(redis)


async def test_a_cancelled_queued_job_is_never_run_nor_delivered_after_a_restart(
    procs, settings, backend, redis
):
    withdrawn = backend.imagine(
        ImagineRequest("never mind", count=1), owner=7, origin=Origin(1, 2, 3, "token")
    )
    behind = backend.imagine(ImagineRequest("after it", count=1), owner=8)
    # In the order they were submitted, though only the first has a record and a token to write:
    await until(lambda: withdrawn.position == 1 and behind.position == 2, 10, "queue positions from Redis")

    assert withdrawn.cancel()
    with pytest.raises(JobCancelled):
        await withdrawn
    deadline = time.perf_counter() + 10
    while not await redis.exists(wire.cancel_key(withdrawn.id)):
        assert time.perf_counter() < deadline, "the cancel flag never reached Redis"
        await asyncio.sleep(0.02)
    assert await redis.hlen(wire.AWAITING) == 0 and not await redis.exists(wire.reply_key(withdrawn.id))
    async with RedisBackend.connect(settings) as restarted:  # nothing of it for a restarted bot to deliver
        assert await restarted.reattach("imagine", deliver_nothing) == 0
    await procs.worker()

    await asyncio.wait_for(behind, 20)

    assert [prompt for _pid, prompt in procs.runs()] == ["after it"]
    assert procs.outcomes(withdrawn.id) == ["withdrawn"]
    await nothing_left(redis)  # the worker deleted the withdrawn job's keys, cancel flag included


async def test_a_question_with_images_is_answered_by_a_worker_from_reduced_images(procs, backend, redis):
    photo, picture = Image.effect_noise((1600, 1000), 60).convert("RGB"), Image.new("RGB", (5, 7), (1, 2, 3))
    job = backend.ask(
        AskRequest("what is this?", images=(photo,), history=(Turn("user", "hi", (picture,)),)), owner=7
    )
    await until(lambda: job.entry_id, 10, "the job in Redis")
    stored = await redis.get(wire.input_key(job.id, 0))
    assert Image.open(io.BytesIO(stored)).size == (768, 480)  # reduced to what the model can use, aspect kept
    assert 0 < await redis.ttl(wire.input_key(job.id, 1)) <= 120  # the history's image too, expiring
    await procs.worker()
    partial: list[str] = []

    async def watch() -> None:
        while not job.done():
            await job.changed.wait()
            job.changed.clear()
            if job.progress and job.progress.preview:
                partial.append(job.progress.preview)

    answer, _ = await asyncio.wait_for(asyncio.gather(job, watch()), 20)

    assert answer == "1 image(s): 768x480"
    assert partial and answer.startswith(partial[0])  # the answer streamed
    await nothing_left(redis)  # its images, result and events were deleted once it was delivered


async def deliver_nothing(job, request, origin) -> None:
    raise AssertionError(f"job {job.id} was re-attached")


async def test_a_job_the_bot_gave_up_on_leaves_nothing_for_a_restarted_bot(settings, backend, redis):
    job = backend.ask(
        AskRequest("lost on the way", images=(Image.new("RGB", (4, 4)),)),
        owner=7,
        origin=Origin(1, 2, message_id=3),
    )
    await until(lambda: job.entry_id, 10, "the job in Redis")
    assert await redis.hlen(wire.AWAITING) == 1
    await redis.xdel(wire.JOBS, job.entry_id)  # its entry vanishes before any worker took it

    with pytest.raises(JobFailed, match="got lost"):
        await asyncio.wait_for(job, 10)

    await nothing_left(redis)  # its record and image are gone with it
    async with RedisBackend.connect(settings) as restarted:
        assert await restarted.reattach("ask", deliver_nothing) == 0


async def test_a_full_redis_refuses_jobs_with_a_clear_message(backend, redis):
    await redis.config_set("maxmemory", 1)  # noeviction (the default policy): every write is refused
    try:
        job = backend.imagine(ImagineRequest("no room", count=1), owner=7)
        with pytest.raises(JobFailed, match="out of room"):
            await asyncio.wait_for(job, 10)
    finally:
        await redis.config_set("maxmemory", 0)
    await nothing_left(redis)


async def test_a_request_out_of_the_schemas_range_is_refused_before_it_is_queued(backend, redis):
    with pytest.raises(BadPrompt, match="count"):
        backend.imagine(ImagineRequest("too many", count=wire.MAX_COUNT + 1), owner=7)
    assert await redis.xlen(wire.JOBS) == 0


# ---- workers run jobs as the bot does ---------------------------------------------------------------------


async def test_questions_taken_together_by_a_worker_run_as_one_batch_each_answered_as_alone(
    procs, backend, redis, studio, tiny_dir
):
    picture = Image.effect_noise((40, 30), 60).convert("RGB")
    questions = [
        AskRequest("What is in this picture?", images=(picture,), seed=3, max_new_tokens=10),
        AskRequest("Tell me a story.", temperature=0.9, seed=4, max_new_tokens=10),
    ]
    jobs = [backend.ask(question, owner=index) for index, question in enumerate(questions)]
    await until(lambda: all(job.entry_id for job in jobs), 10, "both questions in Redis")
    worker = await procs.worker(
        "real-worker", JANUS_MODEL=str(tiny_dir / "janus"), JANUS_DEVICE="cpu", UPSCALER_WEIGHTS="none"
    )  # takes both at once

    answers = await asyncio.wait_for(asyncio.gather(*jobs), 120)

    assert procs.runs() == [(worker.pid, "asked 2")]  # one batch
    assert answers == [studio.ask(question) for question in questions]  # the answers they get alone
    await nothing_left(redis)


async def test_a_worker_with_the_step_scheduler_answers_draws_and_upscales_as_alone(
    procs, backend, redis, studio, tiny_dir
):
    question = AskRequest("Tell me a story.", temperature=0.9, seed=4, max_new_tokens=10)
    gallery = ImagineRequest("a red fox", count=2, seed=5)
    alone = [d.tokens for d in studio.engine.imagine(gallery)]
    asked, drawn = backend.ask(question, owner=1), backend.imagine(gallery, owner=2)
    upscaled = backend.upscale(UpscaleRequest(alone[1]), owner=3)
    await procs.worker(
        "real-worker",
        SCHEDULER="step",
        JANUS_MODEL=str(tiny_dir / "janus"),
        JANUS_DEVICE="cpu",
        UPSCALER_WEIGHTS=str(tiny_dir / "RealESRGAN_x2.pth"),
    )

    answer, drawings, image = await asyncio.wait_for(asyncio.gather(asked, drawn, upscaled), 120)

    assert procs.runs() == []  # no batch of questions ran: the step scheduler took both
    assert answer == studio.ask(question)
    assert [d.tokens for d in drawings] == alone
    expected = studio.upscale(UpscaleRequest(alone[1]))
    assert image.size == expected.size == (2 * studio.output_size,) * 2
    assert sum(ImageStat.Stat(ImageChops.difference(image, expected)).mean) / 3 < 1  # up to thread rounding
    await nothing_left(redis)


# ---- workers stop, or get stuck ---------------------------------------------------------------------------


async def test_a_stopped_worker_hands_its_job_back_without_counting_a_delivery(procs, backend, redis):
    first = await procs.worker(FAKE_GRACE="0.2")
    prompt = "a long walk slow:4"
    job = backend.imagine(ImagineRequest(prompt, count=1, seed=2), owner=7)
    await until(lambda: job.progress is not None, 15, "the first worker's progress")
    first.send_signal(signal.SIGTERM)  # docker stop: its job does not finish within the grace period
    second = await procs.worker()

    drawings = await asyncio.wait_for(job, 20)

    assert first.wait(10) == 0
    assert "Handed 1 job(s) back" in procs.log(first)
    assert [d.image.getpixel((0, 0)) for d in drawings] == colors(prompt, 2, 1)
    assert job.note == RESTARTED_NOTE  # started over by the second worker...
    assert job.attempt == 1  # ...without the stop counting against the job (nor towards the dead letters)
    assert procs.runs() == [(first.pid, prompt), (second.pid, prompt)]
    assert procs.outcomes(job.id) == ["done"]
    await nothing_left(redis)


async def test_a_worker_whose_gpu_thread_hangs_lets_its_job_go_and_exits_non_zero(procs, backend, redis):
    first = await procs.worker()
    prompt = "a frozen lake hang once"
    job = backend.imagine(ImagineRequest(prompt, count=1, seed=4), owner=7)
    await until(lambda: job.progress is not None, 15, "the first worker's progress")
    second = await procs.worker()

    drawings = await asyncio.wait_for(job, 30)

    assert first.wait(10) == EXIT_STUCK
    assert "The GPU thread has reported no progress" in procs.log(first)
    assert [d.image.getpixel((0, 0)) for d in drawings] == colors(prompt, 4, 1)
    assert job.note == RESTARTED_NOTE and job.attempt == 2  # its lease ran out: a takeover, counted
    assert procs.runs() == [(first.pid, prompt), (second.pid, prompt)]
    await nothing_left(redis)


# ---- bad entries ------------------------------------------------------------------------------------------


async def test_bad_entries_are_set_aside_with_a_reason_and_the_worker_goes_on(procs, backend, redis):
    good, _ = wire.encode_request("0" * 32, ImagineRequest("fine", count=1))
    ask, _ = wire.encode_request("0" * 32, AskRequest("what?", images=(Image.new("RGB", (4, 4)),)))
    jpeg, huge = io.BytesIO(), Image.new("RGB", (wire.MAX_INPUT_SIDE + 1, 4))
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    bad = {
        "1" * 32: ({**good.fields(), "job": "1" * 32, "request": b'{"prompt": "\xff\xfe"}'}, None),
        "2" * 32: ({**good.fields(), "job": "2" * 32, "priority": "high"}, None),
        "3" * 32: (
            {**good.fields(), "job": "3" * 32, "request": good.request.replace('"count":1', '"count":1000')},
            None,
        ),
        "4" * 32: ({**ask.fields(), "job": "4" * 32}, jpeg.getvalue()),
        "5" * 32: ({**ask.fields(), "job": "5" * 32}, wire.png(huge)),
    }
    for job_id, (fields, image) in bad.items():
        if image is not None:
            await redis.set(wire.input_key(job_id, 0), image)
        await redis.xadd(wire.JOBS, fields)
    worker = await procs.worker()

    after = backend.imagine(ImagineRequest("after the bad ones", count=1, seed=1), owner=7)
    await asyncio.wait_for(after, 20)

    assert worker.poll() is None  # it went on
    dead = await redis.xrange(wire.DEAD)
    reasons = {fields[b"job"].decode(): fields[b"reason"].decode() for _id, fields in dead}
    assert sorted(reasons) == sorted(bad)
    assert "not UTF-8" in reasons["1" * 32]
    assert "priority" in reasons["2" * 32] and "Extra inputs" in reasons["2" * 32]
    assert "count" in reasons["3" * 32] and "less than or equal" in reasons["3" * 32]
    assert "not a PNG" in reasons["4" * 32]
    assert f"{wire.MAX_INPUT_SIDE + 1}x4" in reasons["5" * 32]
    assert procs.log(worker).count("aside in janus:dead") == 5
    for job_id in bad:  # whoever asked is told
        [*_, (_id, last)] = await redis.xrange(wire.events_key(job_id))
        assert last[b"type"] == b"failed" and b"could not read this request" in last[b"text"]
    assert [prompt for _pid, prompt in procs.runs()] == ["after the bad ones"]
    assert (await redis.xpending(wire.JOBS, wire.GROUP))["pending"] == 0 and await redis.xlen(wire.JOBS) == 0


async def test_an_upscale_is_run_by_a_worker(procs, backend, redis):
    await procs.worker()
    job = backend.upscale(UpscaleRequest((7, 1, 2, 3)), owner=7)

    image = await asyncio.wait_for(job, 20)

    assert image.size == (32, 32) and image.getpixel((0, 0)) == color("upscale", 7, 1)
    assert [prompt for _pid, prompt in procs.runs()] == ["upscale 7,1,2,3"]
    await nothing_left(redis)


# ---- the bot side restarts ------------------------------------------------------------------------------


async def test_a_restarted_bot_reattaches_and_delivers_exactly_once(procs, settings, redis):
    await procs.worker()
    prompt = "a cat on a piano slow:2"
    bot_side = procs.spawn("bot", prompt, "11", "22", "33")
    lines: list[str] = []
    assert bot_side.stdout is not None
    async with asyncio.timeout(20):
        while not (lines and lines[-1].startswith("progress")):
            lines.append((await asyncio.to_thread(bot_side.stdout.readline)).decode().strip())
    kill(bot_side)  # mid-job: nothing of it runs any more
    job_id = lines[-1].split()[1]
    delivered: list[tuple[str, ImagineRequest, Origin, list]] = []

    async def deliver(job, request, origin) -> None:
        delivered.append((job.id, request, origin, await job))

    async with RedisBackend.connect(settings) as restarted:
        assert await restarted.reattach("imagine", deliver) == 1
        await until(lambda: delivered, 20, "the re-attached job's delivery")
    async with RedisBackend.connect(settings) as again:
        assert await again.reattach("imagine", deliver) == 0  # delivered once: nothing left to re-attach

    [(delivered_id, request, origin, drawings)] = delivered
    assert (delivered_id, request.prompt, origin) == (job_id, prompt, Origin(11, 22))
    assert [d.image.getpixel((0, 0)) for d in drawings] == colors(prompt, 7, 2)
    assert await redis.hlen(wire.AWAITING) == 0
    await nothing_left(redis)


# ---- through Discord (SimCord) --------------------------------------------------------------------------


@pytest.fixture
async def make_redis_bot(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable]:
    """JanusBots with EXECUTOR=redis as run_bot builds them: no model in the process, a RedisBackend each."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # restored after the test
    made: list[tuple[JanusBot, RedisBackend]] = []

    async def make(**overrides: object) -> JanusBot:
        current = settings.model_copy(
            update={"status_update_seconds": 0.0, "images_per_prompt": 2, **overrides}
        )
        store = await UsageStore.connect(current.database_path)
        backend = RedisBackend(wire.connect(redis_url), current)
        bot = JanusBot(
            settings=current,
            store=store,
            executor=GpuExecutor(current.queue_size),
            backend=backend,
            shard_count=1,
        )
        made.append((bot, backend))
        return bot

    yield make
    for bot, backend in made:
        await backend.close()
        await bot.executor.close(grace=5)
        await bot.store.close()


@pytest.fixture
async def simcord_bot(make_redis_bot, redis):
    return await make_redis_bot()


async def test_imagine_through_discord_is_drawn_by_a_worker(simcord_env, procs):
    scene = open_scene(simcord_env)
    await procs.worker()
    prompt = "a red fox slow:0.5"

    result = await scene.alice.slash(scene.channel, "imagine", prompt=prompt, seed=3)

    images = [await decode(attachment) for attachment in result.response.attachments]
    assert [image.getpixel((0, 0)) for image in images] == colors(prompt, 3, 2)
    assert any("Drawing 2 image(s)" in content for content in scene.contents("PATCH"))
    assert [prompt for _pid, prompt in procs.runs()] == [prompt]


async def test_a_job_that_keeps_killing_workers_is_set_aside_refunded_and_told(simcord_env, procs, redis):
    scene = open_scene(simcord_env)
    workers = await asyncio.gather(*(procs.worker() for _ in range(4)))

    result = await scene.alice.slash(scene.channel, "imagine", prompt="kill me", count=1)

    told = "⚠️ Sorry, this request stopped the GPU worker that took it 3 times"
    assert text_of(result.response).startswith(told)
    usage = await scene.alice.slash(scene.channel, "usage")
    assert "Generations: 0/20 used" in usage.response.content  # refunded
    [(_id, dead)] = await redis.xrange(wire.DEAD)
    assert dead[b"deliveries"] == b"4"  # first delivery, two takeovers that also died, then set aside
    assert sorted(w.poll() for w in workers if w.poll() is not None) == [-signal.SIGKILL] * 3
    assert len({pid for pid, _prompt in procs.runs()}) == 3
    await nothing_left(redis)


async def test_a_restarted_bot_posts_a_job_it_was_waiting_for_in_its_channel(
    simcord_env, procs, settings, make_redis_bot, redis
):
    scene = open_scene(simcord_env)
    await procs.worker()
    prompt = "a heron at dusk slow:1"
    async with RedisBackend.connect(settings) as before:  # the bot's side before the restart
        job = before.imagine(
            ImagineRequest(prompt, count=2, seed=5),
            owner=scene.alice.id,
            origin=Origin(scene.guild.id, scene.channel.id),
        )
        await until(lambda: job.progress is not None, 15, "progress")
    # It went away mid-job without withdrawing anything (test_a_restarted_bot_reattaches_... kills it
    # outright).

    await simcord_env.restart_bot(await make_redis_bot())  # its cog re-attaches while it starts

    [message] = scene.bot_messages()  # no interaction token to edit its response with: in the channel
    assert text_of(message).startswith(f"{scene.alice.mention} **{prompt}** — {scene.alice.mention}")
    assert [(await decode(a)).getpixel((0, 0)) for a in message.attachments] == colors(prompt, 5, 2)
    assert message.components  # Re-roll, Delete, Describe


def original_edits(env, since: int = 0) -> list[dict]:
    """JSON bodies of the bot's edits of interaction responses (PATCH .../messages/@original), from `since`
    on."""
    return [
        e.json
        for e in env.http_requests[since:]
        if e.method == "PATCH"
        and fnmatch(e.path, "/webhooks/*/messages/@original")
        and isinstance(e.json, dict)
    ]


async def start_imagine_then_go_away(env, scene, prompt: str, seen: str, **options) -> None:
    """/imagine through the current bot until the status shows `seen`; then that bot goes away mid-job, as
    run_bot leaves it at exit (its backend closed: the job is left to the workers and to the next run)."""
    env.settle_timeout = 1.0  # the command returns (timing out) while its job runs on
    with pytest.raises(TimeoutError):
        await scene.alice.slash(scene.channel, "imagine", prompt=prompt, **options)
    await until(
        lambda: any(seen in text_displays(body.get("components") or []) for body in original_edits(env)),
        15,
        f"'{seen}'",
    )
    await env.bot.backend.close()
    env.settle_timeout = 30.0  # the restarted bot settles once it has delivered


async def test_a_restarted_bot_keeps_editing_the_status_and_delivers_into_the_original_response(
    simcord_env, procs, make_redis_bot, redis
):
    scene = open_scene(simcord_env)
    await procs.worker()
    prompt = "a lighthouse in fog slow:5"
    await start_imagine_then_go_away(simcord_env, scene, prompt, "Drawing 2 image(s)", seed=9)
    assert await redis.hlen(wire.AWAITING) == 1
    [key] = await redis.keys(wire.reply_key("*"))
    assert 0 < await redis.ttl(key) <= 15 * 60  # the token is kept no longer than it lives
    since = len(simcord_env.http_requests)

    await simcord_env.restart_bot(await make_redis_bot())  # re-attaches as it starts; settles once delivered

    contents = [text_displays(body.get("components") or []) for body in original_edits(simcord_env, since)]
    assert any(str(c).startswith("🎨 Drawing 2 image(s)") for c in contents[:-1]), contents  # kept going
    assert contents[-1].startswith(f"**{prompt}** — {scene.alice.mention}")  # the gallery, in the response
    [message] = scene.bot_messages()  # the original response; nothing posted in the channel
    assert text_of(message) == contents[-1]
    assert [(await decode(a)).getpixel((0, 0)) for a in message.attachments] == colors(prompt, 9, 2)
    assert message.components  # Re-roll, Delete, Describe
    usage = await scene.alice.slash(scene.channel, "usage")
    assert "Generations: 1/20 used" in usage.response.content  # charged once, by the first run, not refunded
    assert await redis.hlen(wire.AWAITING) == 0
    await nothing_left(redis)


async def test_a_reattached_job_that_fails_is_refunded_and_told_in_the_response(
    simcord_env, procs, make_redis_bot, redis
):
    scene = open_scene(simcord_env)
    await procs.worker()
    await start_imagine_then_go_away(simcord_env, scene, "fail me slow:3", "Drawing 1 image(s)", count=1)
    since = len(simcord_env.http_requests)

    await simcord_env.restart_bot(await make_redis_bot())

    [*_, last] = [text_displays(body.get("components") or []) for body in original_edits(simcord_env, since)]
    assert last.startswith("⚠️ Sorry")  # told in the original response
    usage = await scene.alice.slash(scene.channel, "usage")
    assert "Generations: 0/20 used" in usage.response.content  # refunded by the restarted bot
    assert await redis.hlen(wire.AWAITING) == 0


UPSCALING = {"upscaler_weights": "weights/RealESRGAN_x2.pth"}  # the workers upscale; this bot loads nothing


async def press_upscale_then_go_away(env, scene, procs, make_redis_bot, redis, seed: int) -> discord.Message:
    """Alice draws a gallery; with no worker online, Bob presses U2; then that bot goes away, leaving the
    upscale to the workers and to the next run, and a worker starts. Returns the gallery message."""
    await env.restart_bot(await make_redis_bot(**UPSCALING))
    worker = await procs.worker()
    gallery = (
        await scene.alice.slash(scene.channel, "imagine", prompt="a harbour", count=2, seed=seed)
    ).response
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    env.settle_timeout = 1.0  # the press is handled (timing out) while its job waits for a worker
    with pytest.raises(TimeoutError):
        await scene.bob.click(gallery, label="U2")
    await until(lambda: original_edits(env), 15, "Bob's private status")
    assert await redis.hlen(wire.AWAITING) == 1
    await env.bot.backend.close()
    env.settle_timeout = 30.0  # the restarted bot settles once it has posted
    await procs.worker()
    return gallery


async def test_a_restarted_bot_posts_an_upscale_it_was_waiting_for_as_a_reply_to_the_gallery(
    simcord_env, procs, make_redis_bot, redis
):
    scene = open_scene(simcord_env)
    managers = scene.guild.create_role("managers", permissions=discord.Permissions(manage_guild=True))
    admin = scene.guild.add_member(simcord_env.create_user("admin"), roles=[managers])
    mod_log = scene.guild.create_text_channel("mod-log")
    await admin.slash(scene.channel, "limits log", channel=mod_log)
    gallery = await press_upscale_then_go_away(simcord_env, scene, procs, make_redis_bot, redis, seed=3)
    since = len(simcord_env.http_requests)

    await simcord_env.restart_bot(await make_redis_bot(**UPSCALING))  # re-attaches as it starts

    [reply] = [m for m in scene.bot_messages() if m.reference and m.reference.message_id == gallery.id]
    assert scene.bob.mention in text_of(reply) and "Image 2, upscaled to 32×32" in text_of(reply)
    [image] = reply.attachments
    assert (await decode(image)).getpixel((0, 0)) == color("upscale", 3, 1)  # image 2's tokens: (seed, 1)
    [*_, last] = original_edits(simcord_env, since)
    assert last["content"] == f"Here it is: {reply.jump_url}"  # in Bob's private response
    [*_, logged] = scene.bot_messages(mod_log)  # the server's moderation log has it, as a live upscale
    assert scene.bob.mention in logged.content and f"Result: {reply.jump_url}" in logged.content
    usage = await scene.bob.slash(scene.channel, "usage")
    assert "Generations: 1/20 used" in usage.response.content  # charged once, by the first run
    assert await redis.hlen(wire.AWAITING) == 0
    await nothing_left(redis)


@pytest.mark.parametrize("token", ["alive", "expired"])
async def test_a_reattached_upscale_that_fails_is_refunded_and_told(
    simcord_env, procs, make_redis_bot, redis, token: str
):
    """Told privately while the interaction's token lives; once it has expired (its key gone from Redis), in
    the channel, mentioning Bob."""
    scene = open_scene(simcord_env)
    gallery = await press_upscale_then_go_away(simcord_env, scene, procs, make_redis_bot, redis, FAIL_SEED)
    if token == "expired":
        await redis.delete(*await redis.keys(wire.reply_key("*")))
    since = len(simcord_env.http_requests)

    await simcord_env.restart_bot(await make_redis_bot(**UPSCALING))

    assert not [m for m in scene.bot_messages() if m.reference and m.reference.message_id == gallery.id]
    edits = original_edits(simcord_env, since)
    if token == "alive":
        assert edits[-1]["content"].startswith("⚠️ Sorry")  # in Bob's private response
    else:
        assert not edits  # the dead token is never used
        told = scene.bot_messages()[-1]
        assert told.content.startswith(f"{scene.bob.mention} ⚠️ Sorry")
    usage = await scene.bob.slash(scene.channel, "usage")
    assert "Generations: 0/20 used" in usage.response.content  # refunded by the restarted bot
    assert await redis.hlen(wire.AWAITING) == 0


async def ask_then_go_away(env, scene, text: str, **options) -> discord.Message:
    """Alice mentions the bot with a question; once the answer starts streaming into a reply, that bot goes
    away mid-job as run_bot leaves it at exit. Returns her message."""
    env.settle_timeout = 1.0  # her message is handled (timing out) while its job runs on
    with pytest.raises(TimeoutError):
        await scene.alice.send(scene.channel, f"{scene.mention} {text}", **options)
    await until(lambda: scene.bot_messages(), 15, "the answer to start streaming")
    await env.bot.backend.close()
    env.settle_timeout = 30.0  # the restarted bot settles once it has answered
    [question] = [m for m in scene.channel.history() if m.author.id == scene.alice.id]
    return question


async def test_a_restarted_bot_answers_a_question_it_was_waiting_for_in_a_reply(
    simcord_env, procs, make_redis_bot, redis, png_bytes
):
    scene = open_scene(simcord_env)
    await procs.worker()
    question = await ask_then_go_away(
        simcord_env, scene, "what is this? slow:3", attachments=[("p.png", png_bytes((80, 50)))]
    )
    assert await redis.hlen(wire.AWAITING) == 1

    await simcord_env.restart_bot(await make_redis_bot())  # its understanding cog re-attaches while it starts

    answers = [m for m in scene.bot_messages() if m.content == "1 image(s): 80x50"]  # the image, read back
    assert len(answers) == 1  # exactly once
    assert answers[0].reference is not None and answers[0].reference.message_id == question.id
    usage = await scene.alice.slash(scene.channel, "usage")
    assert "Questions: 1/50 used" in usage.response.content  # charged once, by the first run, not refunded
    assert await redis.hlen(wire.AWAITING) == 0
    await nothing_left(redis)


async def test_a_reattached_question_that_fails_is_refunded_and_told_in_a_reply(
    simcord_env, procs, make_redis_bot, redis
):
    scene = open_scene(simcord_env)
    await procs.worker()
    question = await ask_then_go_away(simcord_env, scene, "fail me slow:2")

    await simcord_env.restart_bot(await make_redis_bot())

    [told] = [m for m in scene.bot_messages() if m.content.startswith("Sorry")]
    assert told.reference is not None and told.reference.message_id == question.id
    usage = await scene.alice.slash(scene.channel, "usage")
    assert "Questions: 0/50 used" in usage.response.content  # refunded by the restarted bot
    assert await redis.hlen(wire.AWAITING) == 0


def make_admin(env, scene):
    managers = scene.guild.create_role("managers", permissions=discord.Permissions(manage_guild=True))
    return scene.guild.add_member(env.create_user("carol"), roles=[managers])


async def scrape(bot: JanusBot) -> str:
    """The Prometheus page, from an endpoint started for this scrape alone."""
    from prometheus_client.core import REGISTRY

    from bot.metrics import serve_metrics

    port = free_port()
    collectors = len(list(REGISTRY._collector_to_names))
    serve_metrics(bot, port)
    try:
        return await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    finally:
        for collector in list(REGISTRY._collector_to_names)[collectors:]:
            REGISTRY.unregister(collector)


async def published(redis: aioredis.Redis, process: subprocess.Popen[bytes], **figures: object) -> bool:
    """Whether the worker's published figures include these."""
    record = await redis.get(wire.worker_key(f"{socket.gethostname()}:{process.pid}"))
    if record is None:
        return False
    return figures.items() <= WorkerStatus.model_validate_json(record).model_dump().items()


async def test_status_and_metrics_show_the_queue_in_redis_and_the_live_workers(
    simcord_env, procs, settings, redis
):
    scene = open_scene(simcord_env)
    admin = make_admin(simcord_env, scene)
    async with RedisBackend.connect(settings) as elsewhere:  # another instance of the bot queues three jobs
        jobs = [elsewhere.imagine(ImagineRequest(f"queued {i} slow:4", count=1), owner=i) for i in range(3)]
        await until(lambda: all(job.entry_id for job in jobs), 10, "the jobs in Redis")

        waiting = await admin.slash(scene.channel, "status")
        worker = await procs.worker(WORKER_SLOTS="1")
        await until(lambda: sum(job.position == 0 for job in jobs) == 1, 15, "a worker to take one")
        deadline = time.perf_counter() + 10
        while not await published(redis, worker, busy=1):
            assert time.perf_counter() < deadline, "the worker never said it is busy"
            await asyncio.sleep(0.05)
        taken = await admin.slash(scene.channel, "status")
        page = await scrape(simcord_env.bot)

    name = f"{socket.gethostname()}:{worker.pid}"
    assert "3 waiting, 0 running" in waiting.response.content
    assert "**GPU workers** 0 online" in waiting.response.content
    assert "No GPU worker has been seen for a lease period" in waiting.response.content
    assert "2 waiting, 1 running" in taken.response.content
    assert "**GPU workers** 1 online" in taken.response.content
    assert (
        f"**`{name}`** `{settings.janus_model}` on fake:0 (bfloat16) · 1/1 slots busy · 0 jobs done · "
        "GPU memory 3.0 GiB"
    ) in taken.response.content
    assert "janus_queue_waiting 2.0" in page and "janus_queue_running 1.0" in page
    assert "janus_workers_online 1.0" in page
    assert f'janus_worker_busy_slots{{worker="{name}"}} 1.0' in page
    assert f'janus_worker_gpu_memory_bytes{{worker="{name}"}} 3.221225472e+09' in page


async def test_members_hear_when_no_worker_is_online_and_status_shows_each_workers_jobs(
    simcord_env, procs, redis
):
    scene = open_scene(simcord_env)
    admin = make_admin(simcord_env, scene)

    async def start_a_worker_once_told() -> subprocess.Popen[bytes]:
        await until(
            lambda: any(
                NO_WORKER in text_displays(body.get("components") or [])
                for body in original_edits(simcord_env)
            ),
            10,
            "the member to be told that no worker is online",
        )
        return await procs.worker(WORKER_SLOTS="4")

    starting = asyncio.create_task(start_a_worker_once_told())
    result = await scene.alice.slash(scene.channel, "imagine", prompt="a quiet harbour", count=1, seed=2)
    worker = await starting

    assert text_of(result.response).startswith("**a quiet harbour**")  # delivered once the worker took it
    deadline = time.perf_counter() + 10
    while not await published(redis, worker, jobs_done=1):
        assert time.perf_counter() < deadline, "the worker never counted its job"
        await asyncio.sleep(0.05)
    status = (await admin.slash(scene.channel, "status")).response.content
    page = await scrape(simcord_env.bot)
    kill(worker)
    await until_gone(redis, worker)
    after = (await admin.slash(scene.channel, "status")).response.content

    name = f"{socket.gethostname()}:{worker.pid}"
    assert "0/4 slots busy · 1 jobs done" in status and "  `imagine`: 1 recent, average" in status
    assert "**jobs done** 1" in status
    assert f'janus_worker_jobs_done_total{{worker="{name}"}} 1.0' in page
    assert f'janus_worker_job_seconds{{kind="imagine",stat="p95",worker="{name}"}}' in page
    assert "**GPU workers** 0 online" in after  # its figures expired
    assert "No GPU worker has been seen" in after


async def until_gone(redis: aioredis.Redis, process: subprocess.Popen[bytes]) -> None:
    deadline = time.perf_counter() + 10
    while await redis.exists(wire.worker_key(f"{socket.gethostname()}:{process.pid}")):
        assert time.perf_counter() < deadline, "the dead worker's figures never expired"
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_a_shutting_down_bot_takes_no_new_requests_but_its_queued_ones_go_on(procs, backend, redis):
    queued = backend.imagine(ImagineRequest("already asked", count=1), owner=7)
    await until(lambda: queued.position == 1, 10, "the job is queued in Redis")

    backend.stop_accepting()  # what JanusBot.shutdown does first
    with pytest.raises(QueueFull, match="not taking new requests"):
        backend.imagine(ImagineRequest("too late", count=1), owner=8)
    await procs.worker()

    assert len(await asyncio.wait_for(queued, 20)) == 1
    assert [prompt for _pid, prompt in procs.runs()] == ["already asked"]
    await nothing_left(redis)
