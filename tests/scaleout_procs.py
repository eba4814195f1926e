"""Processes for tests/test_redis_scaleout.py, started as `python -m scaleout_procs worker|bot ...` (tests/
on PYTHONPATH, settings from the environment):

- `worker`: the real `bot.redis.worker.run_worker` with a fast fake studio instead of Janus. It draws tiny solid PNGs
  in FAKE_STEPS steps through the same executor and batcher, reporting progress at each step, a preview halfway.
  A prompt containing `slow:S` takes S seconds; `kill me` makes the worker SIGKILL itself after its first report;
  `fail me` makes the batch raise once drawn (the worker reports the job failed). Questions are answered with
  their images' sizes, half of the answer reported first; `slow:S` and `fail me` work in them too. An upscale is a
  solid square four times as large, coloured by its first two tokens.
  Every request it starts is appended to FAKE_RUNS as `pid prompt`.
- `bot PROMPT GUILD CHANNEL OWNER`: the bot's side alone: submits one /imagine job with an origin through a
  RedisBackend, prints `queued JOB_ID`, then `progress JOB_ID` once the worker reports, and waits to be killed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import sys
import time
from collections.abc import Sequence

from PIL import Image

from bot.jobs import Progress, Reporter
from bot.logs import configure_logging
from bot.requests import AskRequest, Drawing, ImagineRequest, UpscaleRequest
from bot.settings import Settings, load_settings

STEPS = int(os.environ.get("FAKE_STEPS", "10"))
SIDE = 8


def color(prompt: str, seed: int, index: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}|{seed}|{index}".encode()).digest()
    return digest[0], digest[1], digest[2]


class FakeStudio:
    """Stands in for bot.studio.Studio on the worker's GPU thread."""

    @classmethod
    def load(cls, settings: Settings) -> FakeStudio:
        return cls()

    def imagine_batch(self, requests: Sequence[ImagineRequest],
                      reports: Sequence[Reporter]) -> list[list[Drawing]]:
        for request in requests:
            self._note(request.prompt)
        asked = [float(m[1]) for r in requests if (m := re.search(r"slow:([\d.]+)", r.prompt))]
        seconds = max(asked, default=0.2)
        for step in range(1, STEPS + 1):
            time.sleep(seconds / STEPS)
            for request, report in zip(requests, reports, strict=True):
                grey = [Image.new("RGB", (SIDE, SIDE), (64, 64, 64))] * request.count
                report(Progress(step, STEPS, grey if step == STEPS // 2 else None))
            if any("kill me" in request.prompt for request in requests):
                time.sleep(0.2)  # let the progress reach Redis first
                os.kill(os.getpid(), signal.SIGKILL)
        if any("fail me" in request.prompt for request in requests):
            raise RuntimeError("the fake studio was asked to fail")
        return [[Drawing(Image.new("RGB", (SIDE, SIDE), color(r.prompt, r.seed, i)), (r.seed, i))
                 for i in range(r.count)] for r in requests]

    def upscale(self, request: UpscaleRequest, report: Reporter | None = None) -> Image.Image:
        """A solid square four times a drawing's side, coloured by its tokens."""
        self._note(f"upscale {','.join(map(str, request.tokens))}")
        return Image.new("RGB", (4 * SIDE, 4 * SIDE), color("upscale", *request.tokens[:2]))

    def ask(self, request: AskRequest, report: Reporter | None = None) -> str:
        self._note(request.question)
        sizes = " ".join(f"{image.width}x{image.height}" for image in request.images)
        answer = f"{len(request.images)} image(s): {sizes}"
        if report:
            report(Progress(1, 2, answer[: len(answer) // 2]))
            slow = re.search(r"slow:([\d.]+)", request.question)
            time.sleep(float(slow[1]) if slow else 0.2)  # the rest of the answer
        if "fail me" in request.question:
            raise RuntimeError("the fake studio was asked to fail")
        return answer

    @staticmethod
    def _note(prompt: str) -> None:
        runs = os.environ.get("FAKE_RUNS")
        if runs:
            with open(runs, "a") as log:
                log.write(f"{os.getpid()} {prompt}\n")


async def submit_and_wait(prompt: str, guild: int, channel: int, owner: int) -> None:
    from bot.jobs import Origin
    from bot.redis.backend import RedisBackend

    async with RedisBackend.connect(load_settings()) as backend:
        job = backend.imagine(ImagineRequest(prompt, count=2, seed=7), owner=owner,
                              origin=Origin(guild, channel))
        print("queued", job.id, flush=True)
        async with asyncio.timeout(30):
            while job.progress is None:
                await job.changed.wait()
                job.changed.clear()
        print("progress", job.id, flush=True)
        await asyncio.sleep(60)  # killed here


def main(argv: list[str]) -> int:
    settings = load_settings()
    configure_logging(settings)
    if argv[0] == "worker":
        from bot.redis.worker import run_worker

        return asyncio.run(run_worker(settings, load_studio=FakeStudio.load))
    prompt, guild, channel, owner = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    asyncio.run(submit_and_wait(prompt, guild, channel, owner))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
