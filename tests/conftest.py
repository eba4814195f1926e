"""Shared fixtures: tiny real models built once per session, and Settings that point at them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from settings_for_tests import settings_for_tests  # noqa: E402
from tiny_models import build_tiny_esrgan, build_tiny_janus  # noqa: E402

from bot.settings import Settings  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on 2 cores, torch's second thread fights the event loop and slows every test."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def restore_logging():
    """`main()` configures the root logger onto a captured stream; put it back so later tests log nowhere
    stale."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_janus(root / "janus")
    build_tiny_esrgan(root / "RealESRGAN_x2.pth", scale=2)
    build_tiny_esrgan(root / "RealESRGAN_x4.pth", scale=4)
    return root


@pytest.fixture
def settings(tiny_dir: Path, tmp_path: Path) -> Settings:
    return settings_for_tests(
        discord_token="test-token",
        janus_model=str(tiny_dir / "janus"),
        janus_device="cpu",
        upscaler_weights=str(tiny_dir / "RealESRGAN_x2.pth"),
        data_dir=tmp_path / "data",
        max_answer_tokens=48,
        # The stand-in studios of the user stories replace Studio's batch methods; the step scheduler's own
        # stories (test_step_scheduler.py) ask for SCHEDULER=step.
        scheduler="batch",
    )


@pytest.fixture(scope="session")
def studio(tiny_dir: Path):
    """The tiny model and upscaler, loaded once through the path users take."""
    from bot.studio import Studio

    return Studio.load(
        settings_for_tests(
            janus_model=str(tiny_dir / "janus"),
            janus_device="cpu",
            upscaler_weights=str(tiny_dir / "RealESRGAN_x2.pth"),
        ),
        preview_seconds=0,
    )


@pytest.fixture
def png_bytes():
    """Encode a small test picture (any mode) as PNG or another format."""
    import io

    from PIL import Image

    def make(
        size: tuple[int, int] = (80, 50),
        mode: str = "RGB",
        color: float | tuple[float, ...] | str | None = (200, 30, 30),
        fmt: str = "PNG",
    ) -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, size, color).save(buffer, format=fmt)
        return buffer.getvalue()

    return make


@pytest.fixture
async def make_bot(settings: Settings, studio, monkeypatch: pytest.MonkeyPatch):
    """Build JanusBots on one data dir, as a restart would: each has its own executor and store connection."""
    import discord
    import discord.http

    from bot.client import JanusBot
    from bot.executor import GpuExecutor
    from bot.store import UsageStore

    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # restored after the test
    made: list[JanusBot] = []

    async def make(**overrides: object) -> JanusBot:
        current = settings.model_copy(update={"status_update_seconds": 0.0, **overrides})
        store = await UsageStore.connect(current.database_path)
        executor = GpuExecutor(
            current.queue_size,
            max_batch=current.max_batch_images,
            job_timeout=current.job_timeout_seconds,
            stuck_grace=current.gpu_stuck_seconds,
            notify_interval=0.0,
        )
        bot = JanusBot(settings=current, store=store, executor=executor, studio=studio, shard_count=1)
        made.append(bot)
        return bot

    yield make
    for bot in made:
        await bot.executor.close(grace=5)
        await bot.store.close()


@pytest.fixture
async def simcord_bot(make_bot):
    return await make_bot()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give SimCord room for real model work on a busy 2-core machine (it waits only as long as needed)."""
    for item in items:
        if item.get_closest_marker("simcord") is None:
            item.add_marker(pytest.mark.simcord(settle_timeout=60))
