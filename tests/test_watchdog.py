"""A GPU thread that never comes back, and the model's start-up, as user stories through SimCord and the tiny
models (issue 11, points 6 and 7).

As in test_hardening.py: loop timers (the job timeout, the stuck grace period) run on SimCord's virtual clock,
which the stand-ins on the GPU thread move, as time passing would; a member's action that must not wait for
the
bot to settle is cut short (`taken_in`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import discord
import discord.http
import pytest
import simcord
from scene import Scene, open_scene, text_of

from bot.client import GPU_STUCK_EXIT, JanusBot
from bot.errors import JobCancelled, QueueFull
from bot.executor import GPU_STUCK, GpuExecutor
from bot.jobs import Progress
from bot.metrics import families
from bot.requests import ImagineRequest
from bot.status import current, render
from bot.store import UsageStore
from bot.studio import Studio

TOKENS = 8
LIMIT = 10.0  # seconds any wait of the test may take
QUICK = 0.5  # seconds SimCord waits for an action that `taken_in` cuts short
CUDA_ERROR = "CUDA error: an illegal memory access was encountered"
TIMEOUT, GRACE = 30, 60  # JOB_TIMEOUT_SECONDS and GPU_STUCK_SECONDS of these stories


@pytest.fixture
def scene(simcord_env: simcord.Env) -> Scene:
    return open_scene(simcord_env)


async def taken_in(env: simcord.Env, action: Awaitable[Any]) -> None:
    """Run a member's action, but stop waiting for the bot after QUICK seconds (it keeps working)."""
    patience, env.settle_timeout = env.settle_timeout, QUICK
    try:
        with pytest.raises(TimeoutError, match="did not settle"):
            await action
    finally:
        env.settle_timeout = patience


async def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.perf_counter() + LIMIT
    while not predicate():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.01)


def response_to(scene: Scene, member: Any) -> str:
    """The text of the public response to `member`'s latest command in the scene's channel."""
    return text_of(
        [
            m
            for m in scene.bot_messages()
            if m.interaction_metadata is not None and m.interaction_metadata.user.id == member.id
        ][-1]
    )


def drew(result: simcord.InteractionResult, prompt: str) -> bool:
    response = result.response
    return (
        not result.ephemeral
        and response is not None
        and f"**{prompt}** — " in text_of(response)
        and any(a.filename.startswith("janus_") for a in response.attachments)
    )


class Frozen:
    """The real studio, except that drawing "frozen" never gives the GPU thread back: cancellation is ignored
    (as a CUDA call that hangs would). It moves SimCord's clock past the job timeout once `ready()`, then past
    the grace period once the job was cancelled, and lets go only when `release` is set (the test's end)."""

    def __init__(self, real: Any, ready: Callable[[], bool], move_clock: Callable[[float], object]) -> None:
        self.real, self.ready, self.move_clock = real, ready, move_clock
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def imagine_batch(self, requests: list[Any], reports: list[Any]) -> list[Any]:
        if not any("frozen" in request.prompt for request in requests):
            return self.real.imagine_batch(requests, reports)
        timed_out = cancelled = False
        deadline = time.perf_counter() + 6 * LIMIT
        while not self.release.wait(0.005) and time.perf_counter() < deadline:
            try:
                for report in reports:
                    report(Progress(1, 100))
            except JobCancelled:
                if not cancelled:
                    cancelled = True
                    self.move_clock(GRACE + 1)
            if not timed_out and self.ready():
                timed_out = True
                self.move_clock(TIMEOUT + 1)
        return [[] for _ in requests]


async def test_a_gpu_thread_that_never_comes_back_tells_the_queue_shows_in_status_and_exits_non_zero(
    scene, studio, make_bot, caplog
):
    env = scene.env
    bot = await make_bot(
        max_answer_tokens=TOKENS, images_per_prompt=1, job_timeout_seconds=TIMEOUT, gpu_stuck_seconds=GRACE
    )
    await env.restart_bot(bot)
    loop = asyncio.get_running_loop()

    def bob_waits() -> bool:
        return any("Waiting in line" in text and "a blue bird" in text for text in scene.contents())

    bot.studio = frozen = Frozen(
        studio, bob_waits, lambda seconds: loop.call_soon_threadsafe(env.backend.advance_clock, seconds)
    )
    try:
        await taken_in(env, scene.alice.slash(scene.channel, "imagine", prompt="a frozen lake", count=1))
        await taken_in(env, scene.bob.slash(scene.channel, "imagine", prompt="a blue bird", count=1))
        await wait_until(bot.is_closed)

        stopped = f"⚠️ Sorry, this request took longer than {TIMEOUT} seconds and was stopped."
        assert response_to(scene, scene.alice) == stopped
        assert response_to(scene, scene.bob) == f"⚠️ {GPU_STUCK}"  # told, not left waiting
        assert bot.exit_code == GPU_STUCK_EXIT  # what run_bot returns: Docker or systemd restarts the bot
        assert any(r.levelno == logging.ERROR and "GPU is stuck" in r.getMessage() for r in caplog.records)
        with pytest.raises(QueueFull, match="GPU is stuck"):  # no more work is taken
            bot.backend.imagine(ImagineRequest("a cat", count=1), owner=scene.alice.id)

        status = await current(bot)
        assert "**The GPU is stuck**" in render(status)
        [gauge] = [family for family in families(status) if family.name == "janus_gpu_stuck"]
        assert [sample.value for sample in gauge.samples] == [1]
        await bot.store.close()
        store = await UsageStore.connect(bot.settings.database_path)
        try:
            used = {
                member: (await store.usage(scene.guild.id, member.id, env.now())).user_generations
                for member in (scene.alice, scene.bob)
            }
        finally:
            await store.close()
        assert used == {scene.alice: 0, scene.bob: 0}  # both refunded
    finally:
        frozen.release.set()


async def test_a_slow_model_load_is_not_a_timed_out_job(settings, studio, monkeypatch, caplog):
    """Loading may take longer than JOB_TIMEOUT_SECONDS (a first download, compiling): no timeout, no
    stuck GPU,
    and members are served once it is loaded."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # the bot sets it; restore it
    current_settings = settings.model_copy(
        update={
            "job_timeout_seconds": TIMEOUT,
            "gpu_stuck_seconds": GRACE,
            "images_per_prompt": 1,
            "status_update_seconds": 0.0,
        }
    )
    store = await UsageStore.connect(current_settings.database_path)
    executor = GpuExecutor(job_timeout=TIMEOUT, stuck_grace=GRACE, notify_interval=0.0)
    # No studio: setup_hook loads it.
    bot = JanusBot(settings=current_settings, store=store, executor=executor, shard_count=1)
    env = simcord.Env(bot, settle_timeout=60)
    loop = asyncio.get_running_loop()

    def slow_load(*_args: Any, **_kwargs: Any) -> Studio:
        loop.call_soon_threadsafe(env.backend.advance_clock, TIMEOUT + GRACE + 1)
        time.sleep(0.5)  # time for the loop to see the clock move (and, were the load timed, to time it out)
        return studio

    monkeypatch.setattr(Studio, "load", slow_load)
    try:
        await env.start()  # setup_hook queues the load as the first GPU job
        await env.settle()
        assert bot.exit_code == 0 and not bot.is_closed() and not executor.stuck
        scene = open_scene(env)
        assert drew(
            await scene.alice.slash(scene.channel, "imagine", prompt="a red fox", count=1), "a red fox"
        )
        assert "loading" not in render(await current(bot))
    finally:
        await env.shutdown()
        await executor.close()
        await store.close()
    env.raise_errors()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_model_that_fails_to_load_in_the_background_exits_1_with_one_line(
    settings, monkeypatch, caplog
):
    """Not only a bad setting: anything raised while loading or warming up (here CUDA) stops the bot, rather
    than leaving it online answering "Sorry" to everything."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    store = await UsageStore.connect(settings.database_path)
    executor = GpuExecutor(job_timeout=TIMEOUT, notify_interval=0.0)
    bot = JanusBot(settings=settings, store=store, executor=executor, shard_count=1)
    env = simcord.Env(bot, settle_timeout=60)

    def failing_load(*_args: Any, **_kwargs: Any) -> Studio:
        raise RuntimeError(f"{CUDA_ERROR}\nCompile with TORCH_USE_CUDA_DSA to enable device-side assertions.")

    monkeypatch.setattr(Studio, "load", failing_load)
    try:
        await env.start()
        await env.settle()
        assert bot.exit_code == 1 and bot.is_closed()
    finally:
        await env.shutdown()
        await executor.close()
        await store.close()
    env.raise_errors()
    serious = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in serious] == [
        f"JANUS_MODEL: could not load {settings.janus_model!r}: {CUDA_ERROR}"
    ]
    assert serious[0].levelno == logging.CRITICAL and serious[0].exc_info is None
