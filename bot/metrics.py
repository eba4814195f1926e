"""An optional Prometheus endpoint (METRICS_PORT) with the same figures as /status, read at scrape time: the
queue, and each worker's figures under a `worker` label (with EXECUTOR=local the one worker is the bot)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.status import Status, current

if TYPE_CHECKING:
    from bot.client import JanusBot

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 5.0


class BotCollector(Collector):
    """Reads the figures on the bot's loop (where the backend lives) for each scrape, which comes on the
    metrics server's thread."""

    def __init__(self, bot: JanusBot, loop: asyncio.AbstractEventLoop) -> None:
        self.bot, self.loop = bot, loop

    def describe(self) -> Iterator[Metric]:
        """The metric names, without reading figures (registering happens on the loop, which must not
        wait)."""
        return families(None)

    def collect(self) -> Iterator[Metric]:
        status = asyncio.run_coroutine_threadsafe(current(self.bot), self.loop).result(timeout=SCRAPE_TIMEOUT)
        return families(status)


def families(status: Status | None) -> Iterator[Metric]:
    """The metric families, with the figures of `status` (None: only their names and help)."""
    waiting = GaugeMetricFamily("janus_queue_waiting", "Jobs waiting for a GPU", labels=[])
    running = GaugeMetricFamily("janus_queue_running", "Jobs running on a GPU", labels=[])
    jobs_done = CounterMetricFamily("janus_jobs_done", "Jobs finished by the live workers", labels=[])
    uptime = GaugeMetricFamily("janus_uptime_seconds", "Seconds since the bot started", labels=[])
    online = GaugeMetricFamily(
        "janus_workers_online", "Live processes running jobs (GPU workers, or the bot)", labels=[]
    )
    loaded = GaugeMetricFamily("janus_model_loaded", "1 once a live worker has its model loaded", labels=[])
    stuck = GaugeMetricFamily(
        "janus_gpu_stuck", "1 once a timed-out job never gave the GPU back (EXECUTOR=local)", labels=[]
    )
    memory = GaugeMetricFamily("janus_gpu_memory_bytes", "GPU memory allocated (EXECUTOR=local)", labels=[])
    seconds = GaugeMetricFamily(
        "janus_job_seconds", "Recent job run time by kind (EXECUTOR=local)", labels=["kind", "stat"]
    )
    worker_loaded = GaugeMetricFamily(
        "janus_worker_model_loaded", "1 once the worker's model is loaded", labels=["worker"]
    )
    worker_memory = GaugeMetricFamily(
        "janus_worker_gpu_memory_bytes", "GPU memory the worker allocated", labels=["worker"]
    )
    busy = GaugeMetricFamily(
        "janus_worker_busy_slots", "Images the worker's jobs take of its slots", labels=["worker"]
    )
    slots = GaugeMetricFamily("janus_worker_slots", "Images the worker runs at once", labels=["worker"])
    worker_stuck = GaugeMetricFamily(
        "janus_worker_gpu_stuck", "1 once the worker's GPU thread is stuck", labels=["worker"]
    )
    done = CounterMetricFamily("janus_worker_jobs_done", "Jobs the worker finished", labels=["worker"])
    worker_seconds = GaugeMetricFamily(
        "janus_worker_job_seconds",
        "Recent job run time by worker and kind",
        labels=["worker", "kind", "stat"],
    )
    if status is not None:
        backend = status.backend
        waiting.add_metric([], backend.waiting)
        running.add_metric([], backend.running)
        jobs_done.add_metric([], status.jobs_done)
        uptime.add_metric([], status.uptime_seconds)
        online.add_metric([], len(backend.workers))
        loaded.add_metric([], int(any(worker.loaded for worker in backend.workers)))
        if not backend.remote:
            stuck.add_metric([], int(any(worker.gpu_stuck for worker in backend.workers)))
        for worker in backend.workers:
            worker_loaded.add_metric([worker.name], int(worker.loaded))
            worker_stuck.add_metric([worker.name], int(worker.gpu_stuck))
            if worker.gpu_memory_bytes is not None:
                worker_memory.add_metric([worker.name], worker.gpu_memory_bytes)
                if not backend.remote:
                    memory.add_metric([], worker.gpu_memory_bytes)
            busy.add_metric([worker.name], worker.busy)
            slots.add_metric([worker.name], worker.slots)
            done.add_metric([worker.name], worker.jobs_done)
            for kind, (_count, mean, p95) in worker.timings.items():
                for stat, value in (("mean", mean), ("p95", p95)):
                    worker_seconds.add_metric([worker.name, kind, stat], value)
                    if not backend.remote:
                        seconds.add_metric([kind, stat], value)
    yield from (
        waiting,
        running,
        jobs_done,
        uptime,
        online,
        loaded,
        stuck,
        memory,
        seconds,
        worker_loaded,
        worker_stuck,
        worker_memory,
        busy,
        slots,
        done,
        worker_seconds,
    )


def serve_metrics(bot: JanusBot, port: int) -> None:
    """Start the endpoint on its own thread; scrapes read the bot's figures on its loop. Call it on the
    loop."""
    REGISTRY.register(BotCollector(bot, asyncio.get_running_loop()))
    start_http_server(port)
    log.info("Prometheus metrics on :%d/metrics", port)
