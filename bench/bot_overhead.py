"""The bot's own overhead: an /imagine through the real discord.py client (SimCord's simulated Discord)
minus the time the GPU thread spent on it, measured in one run.

    python -m bench.bot_overhead [--size mid] [--requests 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import simcord

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_models import build_random_janus, build_tiny_esrgan  # noqa: E402

from bench.generation import SHAPES  # noqa: E402
from bot.client import JanusBot  # noqa: E402
from bot.engine import JanusEngine  # noqa: E402
from bot.executor import GpuExecutor  # noqa: E402
from bot.settings import Settings  # noqa: E402
from bot.store import UsageStore  # noqa: E402
from bot.studio import Studio  # noqa: E402
from bot.upscaler import Upscaler  # noqa: E402


async def measure(size: str, requests: int, count: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model, processor = build_random_janus(SHAPES[size])
        studio = Studio(
            JanusEngine(model, processor, preview_seconds=3.0),
            Upscaler.load(build_tiny_esrgan(root / "x2.pth")),
        )
        # `_env_file` is pydantic-settings' own init option, which pyright does not see in the signature.
        settings = Settings(
            _env_file=None,  # pyright: ignore[reportCallIssue]
            discord_token="bench",
            data_dir=root,
            generations_per_user=1000,
        )
        store = await UsageStore.connect(settings.database_path)
        executor = GpuExecutor(settings.queue_size, notify_interval=settings.status_update_seconds)
        bot = JanusBot(settings=settings, store=store, executor=executor, studio=studio, shard_count=1)
        jobs = []
        submit = executor.submit_batched

        def recording_submit(*args: object, **kwargs: object):
            job = submit(*args, **kwargs)  # type: ignore[arg-type]
            jobs.append(job)
            return job

        executor.submit_batched = recording_submit
        async with simcord.run(bot, settle_timeout=600) as env:
            guild = env.create_guild()
            channel = guild.create_text_channel("art")
            member = guild.add_member(env.create_user("member"))
            await member.slash(channel, "imagine", prompt="warm-up", count=count, seed=0)
            totals = []
            for index in range(requests):
                started = time.perf_counter()
                result = await member.slash(
                    channel, "imagine", prompt=f"a red fox #{index}", count=count, seed=index
                )
                totals.append(time.perf_counter() - started)
                assert result.response is not None
                assert len(result.response.attachments) == count
        await executor.close()
        await store.close()
    engine = [job.finished_at - job.started_at for job in jobs[1:]]
    overhead = [total - busy for total, busy in zip(totals, engine, strict=True)]
    share = statistics.median(o / t for o, t in zip(overhead, totals, strict=True))
    print(
        f"{size}: {requests} x /imagine of {count} image(s): request {statistics.median(totals):.3f} s, "
        f"GPU thread {statistics.median(engine):.3f} s, bot overhead {statistics.median(overhead):.3f} s = "
        f"{100 * share:.1f}% (target <= 10%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="mid", choices=sorted(SHAPES))
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(measure(args.size, args.requests, args.count))


if __name__ == "__main__":
    main()
