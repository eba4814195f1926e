"""SCHEDULER=step (continuous batching) against SCHEDULER=batch, side by side in one run, same arrivals.

    python -m bench.scheduler                              # mid-size random model on the CPU
    python -m bench.scheduler --size tiny --requests 10   # a quick look
    python -m bench.scheduler --size 1b --device cuda --dtype bfloat16 [--compile]   # real architectures,
    random weights; --compile first checks that the compiled step draws and answers exactly as the eager one

First calibrates capacity in batch mode (a batch of --max-batch images together, one question alone, the
fastest of three times each) and sets a Poisson arrival rate that offers about 70% of it: each arrival is a
gallery of 1-4 images (60%) or a short text question of 32-48 tokens. Both modes then serve that same
schedule through `LocalBackend`, and a burst of 3 x --max-batch images' worth of galleries plus a few
questions, submitted at once (saturation). Then, eager and with a small random x2 upscaler, a U press: one
image upscaled once a 4-image gallery has drawn a quarter of its tokens, and a 2-image gallery asked right
after it. Prints per mode: p50 / p95 time to result of galleries and questions, time to first word of the
questions that arrived while a gallery was running, throughput, the U press's times; then the step/batch
ratios the goals are about, and a markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from settings_for_tests import settings_for_tests  # noqa: E402
from tiny_models import build_random_janus, build_tiny_esrgan  # noqa: E402

from bench.generation import SHAPES  # noqa: E402
from bot.backends import LocalBackend  # noqa: E402
from bot.engine import JanusEngine  # noqa: E402
from bot.executor import GpuExecutor  # noqa: E402
from bot.jobs import (
    Job,  # noqa: E402
    Progress,  # noqa: E402
)
from bot.requests import AskRequest, Drawing, ImagineRequest, UpscaleRequest  # noqa: E402
from bot.scheduler import StepScheduler  # noqa: E402
from bot.studio import Studio  # noqa: E402
from bot.upscaler import Upscaler  # noqa: E402

MODES = ("batch", "step")
PROMPT = "a red fox in the snow, watercolor"
QUESTIONS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Name three kinds of trees.",
)
GALLERY_SHARE = 0.6  # of arrivals; the rest are questions
MEAN_IMAGES = 2.5  # galleries of 1-4 images, uniform
ANSWER_TOKENS = (32, 48)  # max_new_tokens of a question, uniform
LOAD = 0.7  # offered work / capacity
CALIBRATIONS = 3  # capacity is timed this many times, and the fastest counts (a slow spell would set the load
# far below LOAD: these machines are noisy)
SATURATION_QUESTIONS = 4
U_PRESSES = 3  # U presses per mode; their median is reported
GOAL_P95_RATIO = 0.7  # p95 gallery latency, step / batch, at most
GOAL_TTFW = 2.0  # p95 seconds to the first word of a question asked during a gallery, step mode, below
GOAL_THROUGHPUT_RATIO = 0.95  # saturation images/s, step / batch, at least


@dataclass(frozen=True)
class Arrival:
    """One request of the schedule: `at` seconds after the start; a gallery of `count` images, or (count 0)
    a question of at most `tokens` tokens."""

    at: float
    count: int
    tokens: int


@dataclass(frozen=True)
class Outcome:
    """What happened to one request; times in seconds from its submission."""

    kind: str  # "imagine" or "ask"
    images: int
    latency: float
    first_word: float | None  # questions: when the answer so far first had text (else its result)
    during_gallery: bool  # questions: a gallery was running when it was submitted
    finished_at: float  # perf_counter


@dataclass(frozen=True)
class ModeResult:
    """One mode's Poisson run and saturation burst."""

    outcomes: list[Outcome]
    poisson_seconds: float  # first arrival's schedule start to the last result
    saturation_seconds: float
    saturation_images: int
    saturation_requests: int


@dataclass(frozen=True)
class Figures:
    """One mode's numbers as reported."""

    gallery_p50: float
    gallery_p95: float
    question_p50: float
    question_p95: float
    ttfw_p50: float  # questions asked while a gallery ran
    ttfw_p95: float
    ttfw_count: int
    ttfw_all_p50: float  # every question
    ttfw_all_p95: float
    poisson_images: float  # per second
    poisson_requests: float
    saturation_images: float
    saturation_requests: float


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated `q`-th percentile (0-100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt(value: float, unit: str = " s") -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}{unit}"


def ratio(step: float, batch: float) -> float:
    return step / batch if batch and not math.isnan(step) and not math.isnan(batch) else math.nan


def schedule(requests: int, rate: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate` per second: galleries of 1-4 images or questions, from a seeded RNG."""
    rng, at, arrivals = random.Random(seed), 0.0, []
    for _ in range(requests):
        at += rng.expovariate(rate)
        gallery = rng.random() < GALLERY_SHARE
        arrivals.append(Arrival(at, rng.randint(1, 4) if gallery else 0, rng.randint(*ANSWER_TOKENS)))
    return arrivals


def burst(max_batch: int, seed: int) -> list[Arrival]:
    """3 x `max_batch` images' worth of galleries of 1-4 images, then a few questions, all at time 0."""
    rng, left, arrivals = random.Random(seed + 1), 3 * max_batch, []
    while left:
        count = min(rng.randint(1, 4), left)
        arrivals.append(Arrival(0.0, count, 0))
        left -= count
    return arrivals + [Arrival(0.0, 0, rng.randint(*ANSWER_TOKENS)) for _ in range(SATURATION_QUESTIONS)]


async def first_word(job: Job[str]) -> float | None:
    """When the job's answer so far first has text (None: it finished without any)."""
    while True:
        progress = job.progress
        if progress is not None and isinstance(progress.preview, str) and progress.preview:
            return time.perf_counter()
        if job.done():
            return None
        await job.changed.wait()
        job.changed.clear()


def submit(backend: LocalBackend, arrival: Arrival, index: int) -> asyncio.Task[Outcome]:
    """Submit one request now (before anything else runs on the loop); a task that follows it to its
    result."""
    submitted = time.perf_counter()
    if arrival.count:
        request = ImagineRequest(f"{PROMPT} #{index}", count=arrival.count, seed=index)
        return asyncio.create_task(follow_gallery(backend.imagine(request, owner=index), submitted))
    question = AskRequest(
        QUESTIONS[index % len(QUESTIONS)], max_new_tokens=arrival.tokens, seed=index, temperature=0.7
    )
    job = backend.ask(question, owner=index)
    during = any(running.kind == "imagine" for running in backend.executor.running)
    return asyncio.create_task(follow_question(job, submitted, during))


async def follow_gallery(job: Job[list[Drawing]], submitted: float) -> Outcome:
    images = len(await job)
    finished = time.perf_counter()
    return Outcome("imagine", images, finished - submitted, None, False, finished)


async def follow_question(job: Job[str], submitted: float, during: bool) -> Outcome:
    watcher = asyncio.create_task(first_word(job))
    await job
    finished = time.perf_counter()
    word = await watcher
    first = (word if word is not None else finished) - submitted
    return Outcome("ask", 0, finished - submitted, first, during, finished)


async def replay(backend: LocalBackend, arrivals: list[Arrival]) -> tuple[list[Outcome], float]:
    """Submit each arrival at its time (those due together without yielding, so they may batch); (outcomes,
    seconds from the start to the last result)."""
    started, tasks = time.perf_counter(), []
    for index, arrival in enumerate(arrivals):
        delay = started + arrival.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(submit(backend, arrival, index))
    outcomes = list(await asyncio.gather(*tasks))
    return outcomes, max(o.finished_at for o in outcomes) - started


async def warm_up(backend: LocalBackend) -> None:
    """One small gallery and one question, so neither run pays for first-use costs."""
    await replay(backend, [Arrival(0.0, 1, 0)])
    await replay(backend, [Arrival(0.0, 0, ANSWER_TOKENS[0])])


def joined_outcomes(engine: JanusEngine, compile: bool) -> list[object]:
    """What a gallery, and a gallery and a question joining it at its fifth token, come out as (image tokens,
    answers), in the order they finish."""
    scheduler = StepScheduler(engine, image_slots=8, answer_slots=2, compile=compile)
    results: list[object] = []
    late: list[object] = [
        ImagineRequest(PROMPT, count=3, seed=2, guidance=3.0),
        AskRequest(QUESTIONS[0], seed=3, temperature=0.7, max_new_tokens=ANSWER_TOKENS[0]),
    ]

    def report(progress: Progress) -> None:
        if progress.done == 5:
            for request in late:
                scheduler.admit(request, None, results.append)
            late.clear()

    scheduler.admit(ImagineRequest(PROMPT, count=2, seed=1), report, results.append)
    scheduler.run()
    return [[d.tokens for d in result] if isinstance(result, list) else result for result in results]


def compiled_matches_eager(engine: JanusEngine) -> bool:
    """Does the compiled fixed-shape step draw and answer exactly what the eager running-rows step does?"""
    return joined_outcomes(engine, compile=False) == joined_outcomes(engine, compile=True)


def make_studio(engine: JanusEngine, mode: str, max_batch: int, compile: bool) -> Studio:
    """A fresh studio (so each mode gets its own step scheduler), compiled and warmed up as the bot does
    with COMPILE=true."""
    if mode == "batch":
        if not compile:
            return Studio(engine, None)
        studio = Studio(JanusEngine(engine.model, engine.processor, compile=True), None)
        studio.warm_up(max_batch)
        return studio
    studio = Studio(engine, None, compile_steps=compile)
    if compile:
        studio.warm_up_steps(max_batch, max(1, max_batch // 4))
    return studio


def make_backend(executor: GpuExecutor, studio: Studio, mode: str, max_batch: int) -> LocalBackend:
    settings = settings_for_tests(
        janus_device=str(studio.engine.device),
        scheduler=mode,
        max_batch_images=max_batch,
        max_answer_tokens=ANSWER_TOKENS[1],
    )
    return LocalBackend(executor, lambda: studio, settings)


def executor_for(max_batch: int) -> GpuExecutor:
    return GpuExecutor(queue_size=1000, max_batch=max_batch, notify_interval=0.0)


async def calibrate(studio: Studio, max_batch: int) -> float:
    """Batch mode: time `max_batch` images together and one question alone (the fastest of CALIBRATIONS
    times each); print and return the arrival rate that offers LOAD of that capacity."""
    counts = [min(4, max_batch - done) for done in range(0, max_batch, 4)]
    mean_tokens = sum(ANSWER_TOKENS) // 2
    batch_times, question_times = [], []
    async with executor_for(max_batch) as executor:
        backend = make_backend(executor, studio, "batch", max_batch)
        await warm_up(backend)
        for _ in range(CALIBRATIONS):
            batch_times.append((await replay(backend, [Arrival(0.0, count, 0) for count in counts]))[1])
            question_times.append((await replay(backend, [Arrival(0.0, 0, mean_tokens)]))[1])
    batch_seconds, question_seconds = min(batch_times), min(question_times)
    images_per_second = max_batch / batch_seconds
    work = GALLERY_SHARE * MEAN_IMAGES / images_per_second + (1 - GALLERY_SHARE) * question_seconds
    rate = LOAD / work
    print(
        f"capacity (batch mode, fastest of {CALIBRATIONS}): {max_batch} images together in "
        f"{batch_seconds:.2f} s = {images_per_second:.2f} images/s; "
        f"one {mean_tokens}-token question alone {question_seconds:.2f} s\n"
        f"work per arrival = {GALLERY_SHARE} x {MEAN_IMAGES} images / {images_per_second:.2f} images/s + "
        f"{1 - GALLERY_SHARE:.1f} x {question_seconds:.2f} s = {work:.2f} s; "
        f"rate = {LOAD} / {work:.2f} s = {rate:.3f} arrivals/s"
    )
    return rate


async def run_mode(
    studio: Studio, mode: str, max_batch: int, arrivals: list[Arrival], seed: int
) -> ModeResult:
    """Warm up, replay the Poisson schedule, then the saturation burst, all in `mode`."""
    async with executor_for(max_batch) as executor:
        backend = make_backend(executor, studio, mode, max_batch)
        await warm_up(backend)
        outcomes, poisson_seconds = await replay(backend, arrivals)
        print(f"{mode}: Poisson run {poisson_seconds:.1f} s", flush=True)
        peak, saturation_seconds = await replay(backend, burst(max_batch, seed))
        print(f"{mode}: saturation burst {saturation_seconds:.1f} s", flush=True)
    return ModeResult(outcomes, poisson_seconds, saturation_seconds, sum(o.images for o in peak), len(peak))


async def seconds_to(job: Job[object], since: float) -> float:
    await job
    return time.perf_counter() - since


async def press_u_during_a_gallery(
    engine: JanusEngine, upscaler: Upscaler, mode: str, max_batch: int
) -> tuple[float, float]:
    """U_PRESSES times: once a 4-image gallery has drawn a quarter of its tokens, upscale one image and ask
    for a 2-image gallery right after; the median seconds from the press to each one's result (eager)."""
    studio = Studio(engine, upscaler)
    async with executor_for(max_batch) as executor:
        backend = make_backend(executor, studio, mode, max_batch)
        await warm_up(backend)
        [drawn] = await backend.imagine(ImagineRequest(PROMPT, count=1, seed=0), owner=0)
        await backend.upscale(UpscaleRequest(drawn.tokens), owner=0)  # its first use is not timed
        upscales, galleries = [], []
        for press in range(U_PRESSES):
            drawing = backend.imagine(ImagineRequest(PROMPT, count=4, seed=press + 1), owner=1)
            while not drawing.done() and (
                drawing.progress is None or drawing.progress.done < engine.num_image_tokens // 4
            ):
                await drawing.changed.wait()
                drawing.changed.clear()
            pressed = time.perf_counter()
            upscale = backend.upscale(UpscaleRequest(drawn.tokens), owner=2)
            after = backend.imagine(ImagineRequest(PROMPT, count=2, seed=press + 10), owner=3)
            upscales.append(await seconds_to(upscale, pressed))
            galleries.append(await seconds_to(after, pressed))
            await drawing
    print(f"{mode}: {U_PRESSES} U presses during a gallery", flush=True)
    return statistics.median(upscales), statistics.median(galleries)


def figures(result: ModeResult) -> Figures:
    galleries = [o.latency for o in result.outcomes if o.kind == "imagine"]
    questions = [o.latency for o in result.outcomes if o.kind == "ask"]
    words = [(o.first_word, o.during_gallery) for o in result.outcomes if o.first_word is not None]
    during = [word for word, busy in words if busy]
    every = [word for word, _ in words]
    return Figures(
        percentile(galleries, 50),
        percentile(galleries, 95),
        percentile(questions, 50),
        percentile(questions, 95),
        percentile(during, 50),
        percentile(during, 95),
        len(during),
        percentile(every, 50),
        percentile(every, 95),
        sum(o.images for o in result.outcomes) / result.poisson_seconds,
        len(result.outcomes) / result.poisson_seconds,
        result.saturation_images / result.saturation_seconds,
        result.saturation_requests / result.saturation_seconds,
    )


def verdict(value: float, passed: bool) -> str:
    return "n/a" if math.isnan(value) else "PASS" if passed else "MISS"


def report(
    args: argparse.Namespace,
    rate: float,
    arrivals: list[Arrival],
    results: dict[str, Figures],
    presses: dict[str, tuple[float, float]],
) -> str:
    """The comparison and the goals, as markdown."""
    batch, step = results["batch"], results["step"]
    galleries = sum(1 for a in arrivals if a.count)
    rows = [
        ("gallery time to result p50", batch.gallery_p50, step.gallery_p50, " s"),
        ("gallery time to result p95", batch.gallery_p95, step.gallery_p95, " s"),
        ("question time to result p50", batch.question_p50, step.question_p50, " s"),
        ("question time to result p95", batch.question_p95, step.question_p95, " s"),
        ("time to first word during a gallery p50", batch.ttfw_p50, step.ttfw_p50, " s"),
        ("time to first word during a gallery p95", batch.ttfw_p95, step.ttfw_p95, " s"),
        ("time to first word, every question p50", batch.ttfw_all_p50, step.ttfw_all_p50, " s"),
        ("time to first word, every question p95", batch.ttfw_all_p95, step.ttfw_all_p95, " s"),
        ("Poisson run images/s", batch.poisson_images, step.poisson_images, ""),
        ("Poisson run requests/s", batch.poisson_requests, step.poisson_requests, ""),
        ("saturation images/s", batch.saturation_images, step.saturation_images, ""),
        ("saturation requests/s", batch.saturation_requests, step.saturation_requests, ""),
        ("U press during a gallery: upscale, median", presses["batch"][0], presses["step"][0], " s"),
        ("U press during a gallery: the gallery asked next, median", *(presses[m][1] for m in MODES), " s"),
    ]
    p95_ratio = ratio(step.gallery_p95, batch.gallery_p95)
    throughput_ratio = ratio(step.saturation_images, batch.saturation_images)
    command = " ".join(["python -m bench.scheduler", *sys.argv[1:]])
    lines = [
        f"## {time.strftime('%Y-%m-%d')} — `{command}`",
        "",
        f"{args.size} model on {args.device} ({args.dtype}{', compiled' if args.compile else ''}), "
        f"--max-batch {args.max_batch}, seed {args.seed}: {len(arrivals)} "
        f"Poisson arrivals at {rate:.3f}/s ({galleries} galleries of 1-4 images, {len(arrivals) - galleries} "
        f"questions of 32-48 tokens); saturation: {3 * args.max_batch} images in galleries + "
        f"{SATURATION_QUESTIONS} questions at once. Questions asked while a gallery ran: "
        f"batch {batch.ttfw_count}, step {step.ttfw_count}. U press: {U_PRESSES} times, eager, a small "
        "random x2 upscaler, once a 4-image gallery has drawn a quarter; seconds from the press.",
        "",
        "| measure | batch | step | step / batch |",
        "|---|---|---|---|",
        *(
            f"| {label} | {fmt(b, unit)} | {fmt(s, unit)} | {fmt(ratio(s, b), '')} |"
            for label, b, s, unit in rows
        ),
        "",
        "| goal | target | result | |",
        "|---|---|---|---|",
        f"| p95 gallery latency, step / batch | <= {GOAL_P95_RATIO} | {fmt(p95_ratio, '')} | "
        f"{verdict(p95_ratio, p95_ratio <= GOAL_P95_RATIO)} |",
        f"| p95 time to first word during a gallery, step | < {GOAL_TTFW:g} s | {fmt(step.ttfw_p95)} | "
        f"{verdict(step.ttfw_p95, step.ttfw_p95 < GOAL_TTFW)} |",
        f"| saturation images/s, step / batch | >= {GOAL_THROUGHPUT_RATIO} | {fmt(throughput_ratio, '')} | "
        f"{verdict(throughput_ratio, throughput_ratio >= GOAL_THROUGHPUT_RATIO)} |",
    ]
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model, processor = build_random_janus(SHAPES[args.size], device=args.device, dtype=dtype)
    engine = JanusEngine(model, processor, preview_seconds=None)
    print(f"{args.size} model built on {args.device} in {time.perf_counter() - started:.1f} s", flush=True)
    if args.compile:
        print(f"compiled step token-equal to eager: {'yes' if compiled_matches_eager(engine) else 'NO'}")
    studios = {mode: make_studio(engine, mode, args.max_batch, args.compile) for mode in MODES}
    rate = args.rate if args.rate is not None else await calibrate(studios["batch"], args.max_batch)
    if args.rate is not None:
        print(f"rate = {rate:.3f} arrivals/s (--rate)")
    arrivals = schedule(args.requests, rate, args.seed)
    galleries = [a for a in arrivals if a.count]
    print(
        f"{len(arrivals)} arrivals over {arrivals[-1].at:.0f} s per mode: {len(galleries)} galleries "
        f"({sum(a.count for a in galleries)} images), {len(arrivals) - len(galleries)} questions",
        flush=True,
    )
    results = {
        mode: figures(await run_mode(studios[mode], mode, args.max_batch, arrivals, args.seed))
        for mode in MODES
    }
    with tempfile.TemporaryDirectory() as scratch:
        weights = build_tiny_esrgan(Path(scratch) / "x2.pth")
        upscaler = Upscaler.load(weights, device=args.device, half=args.device.startswith("cuda"))
    presses = {mode: await press_u_during_a_gallery(engine, upscaler, mode, args.max_batch) for mode in MODES}
    print("\n" + report(args, rate, arrivals, results, presses))
    print(f"\n(whole bench: {time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="mid", choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="COMPILE=true: both modes compiled")
    parser.add_argument("--requests", type=int, default=40, help="Poisson arrivals per mode")
    parser.add_argument("--rate", type=float, help="arrivals per second (default: calibrated to 70%% load)")
    parser.add_argument("--max-batch", type=int, default=8, help="MAX_BATCH_IMAGES")
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
