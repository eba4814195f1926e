"""Processes for tests/test_redis_scaleout.py, started as `python -m scaleout_procs worker|bot ...` (tests/
on PYTHONPATH, settings from the environment):

- `worker`: the real `bot.redis.worker.run_worker` with a fast fake studio instead of Janus. It draws tiny
solid PNGs in FAKE_STEPS steps through the same backend, executor and batcher, reporting progress at each
step, a preview halfway. A prompt containing `slow:S` takes S seconds; `kill me` makes the worker SIGKILL
itself after its first report; `fail me` makes the batch raise once drawn (the worker reports the job failed);
`hang once` makes the GPU thread hang after its first report, the first time that prompt is run. Questions are
answered with their images' sizes, half of the answer reported first; `slow:S`, `fail me` and `hang once` work
in them too. An upscale is a solid square four times as large, coloured by its first two tokens; one of an
image drawn with seed FAIL_SEED raises. Every request
it starts is appended to FAKE_RUNS as `pid prompt`. FAKE_GRACE sets its shutdown grace. - `real-worker`: the
same with the real studio (JANUS_MODEL etc. from the environment); every batch of questions it answers is
appended to FAKE_RUNS as `pid asked N`. - `bot PROMPT GUILD CHANNEL OWNER`: the bot's side alone: submits one
/imagine job with an origin through a RedisBackend, prints `queued JOB_ID`, then `progress JOB_ID` once the
worker reports, and waits to be killed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from bot.jobs import Progress, Reporter
from bot.logs import configure_logging
from bot.requests import AskRequest, Drawing, ImagineRequest, UpscaleRequest
from bot.settings import Settings, load_settings

STEPS = int(os.environ.get("FAKE_STEPS", "10"))
SIDE = 8


FAIL_SEED = 666


def color(prompt: str, seed: int, index: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}|{seed}|{index}".encode()).digest()
    return digest[0], digest[1], digest[2]


class FakeStudio:
    """Stands in for bot.studio.Studio on the worker's GPU thread."""

    @classmethod
    def load(cls, settings: Settings) -> FakeStudio:
        return cls()

    def describe(self) -> dict[str, object]:
        return {"device": "fake:0", "dtype": "bfloat16", "gpu_memory_bytes": 3 * 2**30}

    def imagine_batch(
        self, requests: Sequence[ImagineRequest], reports: Sequence[Reporter]
    ) -> list[list[Drawing]]:
        hang = any([self._note(request.prompt) for request in requests])  # each noted
        asked = [float(m[1]) for r in requests if (m := re.search(r"slow:([\d.]+)", r.prompt))]
        seconds = max(asked, default=0.2)
        for step in range(1, STEPS + 1):
            time.sleep(seconds / STEPS)
            for request, report in zip(requests, reports, strict=True):
                grey = [Image.new("RGB", (SIDE, SIDE), (64, 64, 64))] * request.count
                report(Progress(step, STEPS, grey if step == STEPS // 2 else None))
            if hang:
                time.sleep(3600)
            if any("kill me" in request.prompt for request in requests):
                time.sleep(0.2)  # let the progress reach Redis first
                os.kill(os.getpid(), signal.SIGKILL)
        if any("fail me" in request.prompt for request in requests):
            raise RuntimeError("the fake studio was asked to fail")
        return [
            [
                Drawing(Image.new("RGB", (SIDE, SIDE), color(r.prompt, r.seed, i)), (r.seed, i))
                for i in range(r.count)
            ]
            for r in requests
        ]

    def upscale(self, request: UpscaleRequest, report: Reporter | None = None) -> Image.Image:
        """A solid square four times a drawing's side, coloured by its tokens."""
        self._note(f"upscale {','.join(map(str, request.tokens))}")
        if request.tokens[0] == FAIL_SEED:  # a fake drawing's tokens are (seed, index)
            raise RuntimeError("the fake studio was asked to fail an upscale")
        return Image.new("RGB", (4 * SIDE, 4 * SIDE), color("upscale", *request.tokens[:2]))

    def ask_batch(self, requests: Sequence[AskRequest], reports: Sequence[Reporter]) -> list[str]:
        hang = any([self._note(request.question) for request in requests])
        answers = [
            f"{len(r.images)} image(s): " + " ".join(f"{i.width}x{i.height}" for i in r.images)
            for r in requests
        ]
        asked = [float(m[1]) for r in requests if (m := re.search(r"slow:([\d.]+)", r.question))]
        seconds = max(asked, default=0.2)
        for _step in range(STEPS):  # half of each answer, then the rest once the time is up
            for answer, report in zip(answers, reports, strict=True):
                report(Progress(1, 2, answer[: len(answer) // 2]))
            if hang:
                time.sleep(3600)
            time.sleep(seconds / STEPS)
        if any("fail me" in request.question for request in requests):
            raise RuntimeError("the fake studio was asked to fail")
        return answers

    @staticmethod
    def _note(prompt: str) -> bool:
        """Record that a request starts; True when it should hang (`hang once`, run for the first time)."""
        runs = os.environ.get("FAKE_RUNS")
        if not runs:
            return False
        earlier = open(runs).read().splitlines() if os.path.exists(runs) else []
        with open(runs, "a") as log:
            log.write(f"{os.getpid()} {prompt}\n")
        return "hang once" in prompt and not any(line.split(" ", 1)[1] == prompt for line in earlier)


class RecordingStudio:
    """The real studio, noting the size of each batch of questions it answers."""

    def __init__(self, studio: Any) -> None:
        self.studio = studio

    @classmethod
    def load(cls, settings: Settings) -> RecordingStudio:
        import torch

        from bot.studio import Studio

        torch.set_num_threads(1)
        return cls(Studio.load(settings, preview_seconds=0))

    def ask_batch(self, requests: Sequence[AskRequest], reports: Sequence[Reporter]) -> list[Any]:
        with open(os.environ["FAKE_RUNS"], "a") as log:
            log.write(f"{os.getpid()} asked {len(requests)}\n")
        return self.studio.ask_batch(requests, reports)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.studio, name)


async def submit_and_wait(prompt: str, guild: int, channel: int, owner: int) -> None:
    from bot.jobs import Origin
    from bot.redis.backend import RedisBackend

    async with RedisBackend.connect(load_settings()) as backend:
        job = backend.imagine(
            ImagineRequest(prompt, count=2, seed=7), owner=owner, origin=Origin(guild, channel)
        )
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
    if argv[0] in ("worker", "real-worker"):
        from bot.redis.worker import run_worker

        load = FakeStudio.load if argv[0] == "worker" else RecordingStudio.load
        grace = float(os.environ.get("FAKE_GRACE", "60"))
        return asyncio.run(run_worker(settings, load_studio=load, grace=grace))
    prompt, guild, channel, owner = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    asyncio.run(submit_and_wait(prompt, guild, channel, owner))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
