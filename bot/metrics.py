"""An optional Prometheus endpoint (METRICS_PORT) with the same figures as /status, read at scrape time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.status import snapshot

if TYPE_CHECKING:
    from bot.client import JanusBot

log = logging.getLogger(__name__)


class BotCollector(Collector):
    def __init__(self, bot: JanusBot, loop: asyncio.AbstractEventLoop) -> None:
        self.bot, self.loop = bot, loop

    def collect(self) -> Iterator[Metric]:
        # With EXECUTOR=redis the queue is in Redis, read on the bot's loop: scrapes come on the server's thread.
        # (Registering collects once on the loop itself, only to learn the names: it must not wait for the loop.)
        queue_depth = getattr(self.bot.backend, "queue_depth", None)
        depth = None
        if queue_depth is not None and not _on_loop():
            depth = asyncio.run_coroutine_threadsafe(queue_depth(), self.loop).result(timeout=5)
        status = snapshot(self.bot, depth)
        yield GaugeMetricFamily("janus_queue_waiting", "Jobs waiting for the GPU", value=status.waiting)
        yield GaugeMetricFamily("janus_queue_running", "Jobs running on the GPU", value=status.running)
        yield CounterMetricFamily("janus_jobs_done", "Jobs finished since start", value=status.jobs_done)
        yield GaugeMetricFamily("janus_uptime_seconds", "Seconds since the bot started", value=status.uptime_seconds)
        yield GaugeMetricFamily("janus_model_loaded", "1 once the model is loaded", value=int(status.loaded))
        if status.gpu_memory_bytes is not None:
            yield GaugeMetricFamily("janus_gpu_memory_bytes", "GPU memory allocated", value=status.gpu_memory_bytes)
        seconds = GaugeMetricFamily("janus_job_seconds", "Recent job run time by kind", labels=["kind", "stat"])
        for kind, (_count, mean, p95) in status.timings.items():
            seconds.add_metric([kind, "mean"], mean)
            seconds.add_metric([kind, "p95"], p95)
        yield seconds


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def serve_metrics(bot: JanusBot, port: int) -> None:
    """Start the endpoint on its own thread; scrapes read the bot's figures directly. Call it on the bot's loop."""
    REGISTRY.register(BotCollector(bot, asyncio.get_running_loop()))
    start_http_server(port)
    log.info("Prometheus metrics on :%d/metrics", port)
