"""What the bot is doing, in figures: for /status and the Prometheus endpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.client import JanusBot


@dataclass(frozen=True)
class Status:
    model: str
    device: str
    dtype: str
    loaded: bool
    waiting: int
    running: int
    jobs_done: int
    uptime_seconds: float
    gpu_memory_bytes: int | None  # allocated on the model's GPU; None on CPU
    timings: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # kind -> (jobs, mean s, p95 s)


def snapshot(bot: JanusBot, depth: tuple[int, int] | None = None) -> Status:
    """The figures; `depth` (waiting, running) overrides the local executor's queue (see `current`)."""
    studio, executor = bot.studio, bot.executor
    waiting, running = depth if depth is not None else (executor.depth - len(executor.running),
                                                        len(executor.running))
    device = studio.describe() if studio is not None else {}
    return Status(
        model=bot.settings.janus_model,
        device=str(device.get("device", bot.settings.janus_device)),
        dtype=str(device.get("dtype", bot.settings.janus_dtype)),
        loaded=studio is not None,
        waiting=waiting,
        running=running,
        jobs_done=executor.jobs_done,
        uptime_seconds=time.perf_counter() - bot.started_at,
        gpu_memory_bytes=device.get("gpu_memory_bytes"),  # type: ignore[arg-type]
        timings=executor.timings(),
    )


async def current(bot: JanusBot) -> Status:
    """The snapshot, with the queue of whatever runs the jobs: with EXECUTOR=redis, the GPU workers' queue in
    Redis (the bot's own executor stays idle then)."""
    queue_depth = getattr(bot.backend, "queue_depth", None)
    return snapshot(bot, None if queue_depth is None else await queue_depth())


def render(status: Status) -> str:
    """The /status text."""
    hours, rest = divmod(int(status.uptime_seconds), 3600)
    memory = f"{status.gpu_memory_bytes / 2**30:.1f} GiB" if status.gpu_memory_bytes is not None else "n/a (CPU)"
    lines = [
        f"**Model** `{status.model}` on {status.device} ({status.dtype})" + ("" if status.loaded else " — loading…"),
        f"**Queue** {status.waiting} waiting, {status.running} running · **jobs done** {status.jobs_done}",
        f"**Uptime** {hours} h {rest // 60} min · **GPU memory** {memory}",
    ]
    for kind, (count, mean, p95) in sorted(status.timings.items()):
        lines.append(f"`{kind}`: {count} recent, average {mean:.2f} s, p95 {p95:.2f} s")
    return "\n".join(lines)
