"""What the bot and whatever runs its jobs are doing, in figures: for /status and the Prometheus endpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from bot.client import JanusBot

STUCK = (
    "⚠️ **The GPU is stuck**: a timed-out job never gave it back. No work is taken; the bot is exiting "
    "to be restarted."
)
Timings = dict[str, tuple[int, float, float]]  # kind -> (recent jobs, mean seconds, 95th percentile seconds)


class WorkerStatus(BaseModel):
    """One process that runs jobs: the bot itself (EXECUTOR=local), or a GPU worker as it publishes itself in
    Redis (EXECUTOR=redis; a record that does not fit this model is ignored)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(max_length=300)  # host:pid
    host: str = Field(max_length=255)
    model: str = Field(max_length=500)
    device: str = Field(max_length=50)
    dtype: str = Field(max_length=50)
    loaded: bool = True
    gpu_stuck: bool = False  # a timed-out job never gave the GPU back: it takes no work until restarted
    gpu_memory_bytes: int | None = Field(default=None, ge=0)  # allocated on its GPU; None on CPU
    slots: int = Field(ge=0)  # images it runs at once (SCHEDULER=step: and questions, in slots of their own)
    busy: int = Field(ge=0)  # of those, taken by the jobs it holds
    jobs_done: int = Field(ge=0)
    timings: Timings = Field(default_factory=dict)


@dataclass(frozen=True)
class BackendStatus:
    """The queue and the processes that run it."""

    waiting: int
    running: int
    workers: tuple[WorkerStatus, ...]  # the live ones
    remote: bool  # GPU workers elsewhere, through Redis (else the bot's own GPU thread)


@dataclass(frozen=True)
class Status:
    model: str
    uptime_seconds: float
    backend: BackendStatus

    @property
    def jobs_done(self) -> int:
        return sum(worker.jobs_done for worker in self.backend.workers)


async def current(bot: JanusBot) -> Status:
    """The figures now, from the bot and its backend."""
    return Status(
        model=bot.settings.janus_model,
        uptime_seconds=time.perf_counter() - bot.started_at,
        backend=await bot.backend.status(),
    )


def render(status: Status) -> str:
    """The /status text."""
    backend = status.backend
    hours, rest = divmod(int(status.uptime_seconds), 3600)
    uptime = f"**Uptime** {hours} h {rest // 60} min"
    queue = (
        f"**Queue** {backend.waiting} waiting, {backend.running} running · **jobs done** {status.jobs_done}"
    )
    if not backend.remote:
        [me] = backend.workers
        stuck = [STUCK] if me.gpu_stuck else []
        return "\n".join(
            [
                *stuck,
                f"**Model** `{status.model}` on {me.device} ({me.dtype})"
                + ("" if me.loaded else " — loading…"),
                queue,
                f"{uptime} · **GPU memory** {memory(me.gpu_memory_bytes)}",
                *timing_lines(me.timings),
            ]
        )
    online = len(backend.workers)
    lines = [f"**Model** `{status.model}` · **GPU workers** {online} online (through Redis)", queue, uptime]
    if not online:
        lines.append(
            "⚠️ **No GPU worker has been seen for a lease period**: requests wait in the queue "
            "until one comes online (`python -m bot worker`)."
        )
    for worker in backend.workers:
        lines.append(
            f"**`{worker.name}`** `{worker.model}` on {worker.device} ({worker.dtype}) · "
            f"{worker.busy}/{worker.slots} slots busy · {worker.jobs_done} jobs done · "
            f"GPU memory {memory(worker.gpu_memory_bytes)}" + (" · ⚠️ GPU stuck" if worker.gpu_stuck else "")
        )
        lines.extend(f"  {line}" for line in timing_lines(worker.timings))
    return "\n".join(lines)[:2000]


def memory(allocated: int | None) -> str:
    return f"{allocated / 2**30:.1f} GiB" if allocated is not None else "n/a (CPU)"


def timing_lines(timings: Timings) -> list[str]:
    return [
        f"`{kind}`: {count} recent, average {mean:.2f} s, p95 {p95:.2f} s"
        for kind, (count, mean, p95) in sorted(timings.items())
    ]
