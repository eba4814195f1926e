"""The step scheduler (SCHEDULER=step) on the tiny Janus: requests joining a running loop of steps get exactly
what they would get alone, questions are answered in the same steps as galleries, slots are bounded, and
cancellation, out-of-memory, previews and timeouts work per request. Then the same through the executor and
as members see it in Discord."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scene import Scene, open_scene

from bot import executor
from bot.engine import AskRequest, ImagineRequest, JanusEngine, Turn, sample_text_rows
from bot.errors import OUT_OF_MEMORY, OUT_OF_MEMORY_UPSCALING, JobCancelled, JobFailed
from bot.executor import GpuExecutor
from bot.jobs import Progress
from bot.requests import UpscaleRequest
from bot.scheduler import SlotCache, StepScheduler
from bot.studio import Studio

LIMIT = 60  # seconds any single wait may take on a slow machine


@pytest.fixture
def engine(studio: Studio) -> JanusEngine:
    return studio.engine


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


class Run:
    """A scheduler of the tiny engine and what it delivered, in order; `at(step, action)` does something
    (admit a request...) on the GPU thread once the first admitted gallery has drawn `step` tokens."""

    def __init__(
        self,
        engine: JanusEngine,
        image_slots: int = 8,
        answer_slots: int = 2,
        static_shapes: bool = False,
        compile: bool = False,
        upscale: Callable[[UpscaleRequest, Any], Any] | None = None,
    ) -> None:
        self.scheduler = StepScheduler(
            engine,
            image_slots=image_slots,
            answer_slots=answer_slots,
            static_shapes=static_shapes,
            compile=compile,
            upscale=upscale,
        )
        self.results: dict[str, Any] = {}
        self.finished: list[str] = []
        self.heard: dict[str, list[Progress]] = {}
        self.actions: dict[int, list[Callable[[], object]]] = {}

    def admit(self, name: str, request: Any, *, cancel_at: int | None = None) -> bool:
        heard = self.heard.setdefault(name, [])

        def report(progress: Progress) -> None:
            heard.append(progress)
            if cancel_at is not None and progress.done >= cancel_at:
                raise JobCancelled("This request was cancelled.")
            for action in self.actions.pop(progress.done, []) if name == "first" else []:
                action()

        def finish(outcome: Any) -> None:
            self.results[name] = outcome
            self.finished.append(name)

        return self.scheduler.admit(request, report, finish)

    def at(self, step: int, action: Callable[[], object]) -> None:
        self.actions.setdefault(step, []).append(action)

    def run(self) -> dict[str, Any]:
        self.scheduler.run()
        return self.results


def tokens(drawings: Any) -> list[tuple[int, ...]]:
    assert isinstance(drawings, list), drawings
    return [drawing.tokens for drawing in drawings]


SHAPES = {
    "running-rows": {},  # each step over the running rows only (the default)
    "all-slots": {"static_shapes": True},  # every slot every step, fixed shapes (what COMPILE uses), eager
}


@pytest.mark.parametrize("options", SHAPES.values(), ids=SHAPES.keys())
def test_galleries_joining_mid_run_get_exactly_the_images_they_get_alone(
    engine: JanusEngine, options: dict[str, Any]
) -> None:
    first = ImagineRequest("a red fox in the snow", count=2, seed=3)
    later = {
        "guided": ImagineRequest("a blue vase", count=3, seed=5, guidance=3.0, temperature=0.7),
        "greedy": ImagineRequest("a lighthouse at night", count=1, seed=1, temperature=0),
        "kept": ImagineRequest("a blue vase", count=2, seed=8, keep=(5, 6, 7, 8, 9)),
    }
    run = Run(engine, **options)
    run.admit("first", first)
    run.at(3, lambda: run.admit("guided", later["guided"]))
    run.at(7, lambda: run.admit("greedy", later["greedy"]))
    run.at(7, lambda: run.admit("kept", later["kept"]))

    results = run.run()

    assert tokens(results["first"]) == tokens(engine.imagine(first))
    for name, request in later.items():
        assert tokens(results[name]) == tokens(engine.imagine(request)), name
        assert len(results[name]) == request.count
    assert [t[:5] for t in tokens(results["kept"])] == [(5, 6, 7, 8, 9)] * 2
    # They ran together: far fewer forward passes than one gallery after another.
    n_img = engine.num_image_tokens
    assert run.scheduler.steps < 2 * n_img
    assert run.finished.index("first") < run.finished.index("guided")  # each left once its own rows were done
    for name in ("first", *later):
        assert [p.done for p in run.heard[name]] == list(range(1, n_img + 1))


COMPILED = {**SHAPES, "compiled": {"compile": True}}  # torch.compile of the fixed-shape step, on the CPU


@pytest.mark.parametrize("options", COMPILED.values(), ids=COMPILED.keys())
def test_questions_are_answered_in_the_same_steps_and_equal_their_answer_alone(
    engine: JanusEngine, options: dict[str, Any]
) -> None:
    gallery = ImagineRequest("a lighthouse", count=4, seed=2)
    looking = AskRequest(
        "what is this?",
        images=(photo(1),),
        history=(Turn("user", "hello", (photo(2),)), Turn("assistant", "hi there")),
        temperature=1.0,
        seed=4,
        max_new_tokens=6,
    )
    plain = AskRequest("tell me a joke", temperature=0, max_new_tokens=5, seed=9)
    run = Run(engine, **options)
    run.admit("first", gallery)
    run.at(2, lambda: run.admit("looking", looking))
    run.at(4, lambda: run.admit("plain", plain))

    results = run.run()

    unseen = AskRequest("what is this?", temperature=1.0, seed=4, max_new_tokens=6)
    assert results["looking"] == engine.ask(looking) != engine.ask(unseen)  # the images and turns went in
    assert results["plain"] == engine.ask(plain)
    assert tokens(results["first"]) == tokens(engine.imagine(gallery))
    # Both answers were streamed and delivered while the gallery was still drawing.
    assert run.finished == ["looking", "plain", "first"]
    assert run.heard["looking"][0].done == 1 and isinstance(run.heard["looking"][-1].preview, str)
    assert (
        run.scheduler.steps == engine.num_image_tokens - 1
    )  # the first token of each comes from its prefill


def test_the_question_sampler_is_inverse_cdf_over_each_rows_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.6, 0.2, 0.1]]))
    temperature, top_p = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.7, 1.0, 1.0])
    # Tokens are laid out most likely first. Row 0 keeps {0.5, 0.3} (they reach 0.7): 0.75 of their 0.8 is
    # past the first. Row 1 keeps all four (0.4, 0.3, 0.2, 0.1): 0.95 is in the last, the least likely
    # token 0, 0.05 in the first, token 3. Row 2 is greedy whatever its number.
    chosen = sample_text_rows(logits, temperature, top_p, torch.tensor([0.75, 0.95, 0.99]))
    assert chosen.tolist() == [1, 0, 1]
    assert sample_text_rows(logits, temperature, top_p, torch.tensor([0.5, 0.05, 0.0])).tolist() == [0, 3, 1]


def test_slots_are_bounded_and_freed_when_a_request_is_done_or_cancelled(engine: JanusEngine) -> None:
    run = Run(engine, image_slots=4, answer_slots=1)
    assert run.admit("first", ImagineRequest("a fox", count=3, seed=1))
    assert not run.admit("too many", ImagineRequest("a cat", count=2, seed=1))  # one slot left
    assert run.admit("small", ImagineRequest("a cat", count=1, seed=1))
    assert run.admit("question", AskRequest("hi", max_new_tokens=3))
    assert not run.admit("second question", AskRequest("hi", max_new_tokens=3))
    with pytest.raises(JobFailed, match="draws at most 4 images at once; please ask for 4 or fewer"):
        run.scheduler.admit(ImagineRequest("a crowd", count=5), None, lambda _outcome: None)
    assert run.admit("cancelled", ImagineRequest("a dog", count=1, seed=2), cancel_at=4) is False  # full

    run.run()

    assert isinstance(run.results["first"], list) and isinstance(run.results["question"], str)
    assert run.admit("cancelled", ImagineRequest("a dog", count=4, seed=2), cancel_at=4)  # all free again
    assert run.admit("after", AskRequest("hi", max_new_tokens=3))
    run.run()
    assert isinstance(run.results["cancelled"], JobCancelled) and len(run.heard["cancelled"]) == 4
    assert isinstance(run.results["after"], str)
    assert run.admit("refill", ImagineRequest("a dog", count=4, seed=2))  # the cancelled one freed its slots


def test_out_of_memory_stops_the_newest_request_and_the_others_go_on(
    engine: JanusEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = ImagineRequest("a fox", count=2, seed=1), ImagineRequest("a cat", count=2, seed=2)
    run = Run(engine)
    original, calls = StepScheduler._step, []

    def step(scheduler: StepScheduler) -> None:
        calls.append(len(scheduler.galleries))
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory")
        original(scheduler)

    monkeypatch.setattr(StepScheduler, "_step", step)
    run.admit("first", first)
    run.at(2, lambda: run.admit("second", second))

    results = run.run()

    assert calls[4] == 2  # both were running when memory ran out
    assert isinstance(results["second"], JobFailed) and str(results["second"]) == OUT_OF_MEMORY
    assert tokens(results["first"]) == tokens(engine.imagine(first))
    assert run.admit("refill", ImagineRequest("a dog", count=8))  # the failed request's slots are free


def test_upscales_run_between_steps_one_waiting_at_a_time_while_a_gallery_draws(studio: Studio) -> None:
    """U buttons pressed while a gallery draws are served between its steps, not after it: each upscale is
    exactly what it is alone, one that cannot be done fails alone, one withdrawn while it waited stops before
    any work, and the gallery is still exactly itself."""
    engine = studio.engine
    drawn = [d.tokens for d in engine.imagine(ImagineRequest("a paper boat", count=2, seed=11))]
    upscales = {"U1": UpscaleRequest(drawn[0]), "U2": UpscaleRequest(drawn[1])}
    first = ImagineRequest("a red fox in the snow", count=2, seed=3)
    run = Run(engine, upscale=studio.upscale)
    run.admit("first", first)
    admitted: list[bool] = []
    run.at(3, lambda: admitted.extend([run.admit("U1", upscales["U1"]), run.admit("U2", upscales["U2"])]))
    run.at(5, lambda: admitted.append(run.admit("U2", upscales["U2"])))
    run.at(7, lambda: admitted.append(run.admit("foreign", UpscaleRequest((1, 2, 3)))))
    run.at(9, lambda: admitted.append(run.admit("withdrawn", upscales["U1"], cancel_at=0)))

    results = run.run()

    assert admitted == [True, False, True, True, True]  # one upscale waits for its turn at a time
    assert run.finished == ["U1", "U2", "foreign", "withdrawn", "first"]
    for name, request in upscales.items():
        alone = studio.upscale(request)
        assert results[name].size == alone.size == (2 * studio.output_size,) * 2
        assert np.array_equal(np.asarray(results[name]), np.asarray(alone)), name
    assert isinstance(results["foreign"], JobFailed) and "another model" in str(results["foreign"])
    assert isinstance(results["withdrawn"], JobCancelled)
    assert run.heard["withdrawn"] == [Progress(0, 3)]  # stopped before its decode
    assert tokens(results["first"]) == tokens(engine.imagine(first))
    assert not run.scheduler.pending()


def test_previews_come_per_request_with_its_own_images(engine: JanusEngine) -> None:
    assert engine.preview_seconds == 0  # a preview after every finished row of the token grid
    run = Run(engine)
    run.admit("first", ImagineRequest("a fox", count=2, seed=1))
    run.at(3, lambda: run.admit("later", ImagineRequest("a cat", count=3, seed=2)))

    run.run()

    for name, count in (("first", 2), ("later", 3)):
        previews = [p for p in run.heard[name] if p.preview is not None]
        assert previews and all(p.done % engine.grid == 0 for p in previews)
        assert all(len(p.preview) == count and p.preview[0].size == (64, 64) for p in previews)


def test_a_gallery_in_slots_used_before_shows_nothing_of_the_earlier_one(engine: JanusEngine) -> None:
    earlier, later = ImagineRequest("a fox", count=2, seed=1), ImagineRequest("a cat", count=2, seed=2)
    reused = Run(engine)
    reused.admit("earlier", earlier)
    reused.run()
    reused.admit("later", later)  # the same two slots, the earlier gallery's tokens still in them
    reused.run()
    fresh = Run(engine)
    fresh.admit("later", later)
    fresh.run()

    def previews(run: Run) -> list[bytes]:
        return [image.tobytes() for p in run.heard["later"] if p.preview for image in p.preview]

    assert previews(reused) and previews(reused) == previews(fresh)


# ---- through the executor --------------------------------------------------------------------------------


class SlowStepper:
    """A stepper whose loop does nothing but wait: each admitted request takes `steps` ticks of 10 ms,
    reporting at each; one named `ignores cancel` holds the thread until `release` is set (a GPU that does not
    come back)."""

    def __init__(self, slots: int = 2, steps: int = 5) -> None:
        self.slots, self.steps = slots, steps
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.inbox: list[tuple[str, Any, Any]] = []
        self.running: list[list[Any]] = []

    def admit(self, payload: str, report: Any, finish: Any) -> bool:
        with self.lock:
            if len(self.inbox) + len(self.running) >= self.slots:
                return False
            self.inbox.append((payload, report, finish))
            return True

    def pending(self) -> bool:
        with self.lock:
            return bool(self.inbox or self.running)

    def run(self) -> None:
        while True:
            with self.lock:
                self.running += [[payload, report, finish, 0] for payload, report, finish in self.inbox]
                self.inbox = []
                if not self.running:
                    return
            time.sleep(0.01)
            for entry in list(self.running):
                entry[3] += 1
                try:
                    entry[1](Progress(entry[3], self.steps))
                except JobCancelled as cancelled:
                    if entry[0] == "ignores cancel":
                        self.release.wait(LIMIT)
                    self.running.remove(entry)
                    entry[2](cancelled)
                    continue
                if entry[3] >= self.steps:
                    self.running.remove(entry)
                    entry[2](f"done {entry[0]}")


async def test_stepped_jobs_join_while_slots_are_free_and_wait_in_line_otherwise() -> None:
    stepper = SlowStepper(slots=2, steps=20)
    async with GpuExecutor(job_timeout=LIMIT) as executor:
        first = executor.submit_stepped(stepper, "first", kind="imagine")
        await asyncio.sleep(0.05)
        assert first.running
        joining = executor.submit_stepped(stepper, "joining", kind="ask")
        await asyncio.sleep(0.05)
        assert joining.running and first.running  # joined the running loop
        third = executor.submit_stepped(stepper, "third", kind="imagine")
        plain = executor.submit(lambda _report: "plain", kind="upscale")
        behind = executor.submit_stepped(stepper, "behind", kind="ask")
        await asyncio.sleep(0.05)
        assert (third.position, plain.position, behind.position) == (1, 2, 3)
        assert await asyncio.wait_for(first, LIMIT) == "done first"
        assert await asyncio.wait_for(third, LIMIT) == "done third"  # it took the freed slot
        assert await joining == "done joining" and await plain == "plain" and await behind == "done behind"
        # Plain work waits for the loop to drain, and what came after it waits for the plain work.
        assert first.finished_at and third.finished_at and plain.started_at and behind.started_at
        assert third.finished_at <= plain.started_at <= behind.started_at
        assert executor.jobs_done == 5


async def test_a_stepped_job_past_the_timeout_is_stopped_and_a_gpu_that_does_not_let_go_is_given_up() -> None:
    stepper = SlowStepper(slots=2, steps=10_000)
    stuck = asyncio.Event()
    async with GpuExecutor(job_timeout=0.3, stuck_grace=0.3) as executor:
        executor.on_stuck = stuck.set
        slow = executor.submit_stepped(stepper, "slow", kind="ask")
        with pytest.raises(JobCancelled, match="took longer than 0.3 seconds"):
            await asyncio.wait_for(slow, LIMIT)
        await asyncio.sleep(0.1)
        assert not executor.running and not executor.stuck  # the loop let it go

        hung = executor.submit_stepped(stepper, "ignores cancel", kind="ask")
        with pytest.raises(JobCancelled, match="took longer"):
            await asyncio.wait_for(hung, LIMIT)
        await asyncio.wait_for(stuck.wait(), LIMIT)
        assert executor.stuck
        stepper.release.set()


# ---- as members see it -------------------------------------------------------------------------------------


@pytest.fixture
async def simcord_bot(make_bot):
    return await make_bot(scheduler="step", max_answer_tokens=4)


@pytest.fixture
def scene(simcord_env) -> Scene:
    return open_scene(simcord_env)


class HeldGallery:
    """A gallery queued through the bot's backend, as the /imagine cog does (SimCord runs one member action at
    a time), whose steps wait for a job of `kind`: until one joins the loop, the gallery does not step; while
    it is in the loop, the gallery steps with it; once it has left, the gallery waits for `release()`. So the
    member's request is served while the gallery is drawn, however slow the machine."""

    def __init__(
        self, scene: Scene, monkeypatch: pytest.MonkeyPatch, request: ImagineRequest, owner: int, kind: str
    ) -> None:
        self.released = threading.Event()
        self.sent_when_drawn: list[int] = []  # the bot's HTTP requests so far, once the gallery is done
        jobs, original, seen = scene.bot.executor, StepScheduler._step, threading.Event()

        def held_step(scheduler: StepScheduler) -> None:
            deadline = time.perf_counter() + LIMIT
            while time.perf_counter() < deadline:
                if any(job.kind == kind for job in list(jobs.running)):
                    seen.set()
                    break
                if seen.is_set():
                    self.released.wait(LIMIT)
                    break
                time.sleep(0.005)
            original(scheduler)

        monkeypatch.setattr(StepScheduler, "_step", held_step)
        job = scene.bot.backend.imagine(request, owner=owner)
        assert isinstance(job, executor.Job)  # local mode: the executor's own job
        self.job: executor.Job[Any] = job
        self.job.future.add_done_callback(
            lambda _future: self.sent_when_drawn.append(len(scene.env.http_requests))
        )

    async def drawing(self) -> None:
        while not self.job.running:
            await asyncio.sleep(0.01)

    async def result(self) -> Any:
        self.released.set()
        return await asyncio.wait_for(self.job, LIMIT)


async def test_a_question_asked_while_a_gallery_draws_is_answered_before_the_gallery_is_done(
    scene: Scene, studio: Studio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gallery is being drawn when Bob mentions the bot: his answer streams and is posted while the gallery
    is still being drawn, and the gallery is still exactly the one it would be alone."""
    request = ImagineRequest("a paper boat", count=2, seed=11)
    gallery = HeldGallery(scene, monkeypatch, request, scene.alice.id, kind="ask")
    await gallery.drawing()

    question = await scene.bob.send(scene.channel, f"{scene.mention} hi")

    [answer] = [m for m in scene.bot_messages() if m.reference is not None]
    assert answer.reference is not None and answer.reference.message_id == question.id and answer.content
    calls = [(e.method, e.path) for e in scene.env.http_requests]
    posted = calls.index(("POST", f"/channels/{scene.channel.id}/messages"))
    drawn = await gallery.result()
    assert gallery.sent_when_drawn and posted < gallery.sent_when_drawn[0]  # answered while it was drawing
    assert [d.tokens for d in drawn] == [d.tokens for d in studio.engine.imagine(request)]
    assert [d.image.size for d in drawn] == [(studio.output_size, studio.output_size)] * 2
    [worker] = (await scene.bot.backend.status()).workers
    assert worker.slots == 16 + 4 and worker.busy == 0  # MAX_BATCH_IMAGES image slots and 16 / 4 answer slots


async def test_an_image_upscaled_while_another_gallery_draws_is_posted_before_that_gallery_is_done(
    scene: Scene, studio: Studio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's gallery is done; while Bob's gallery is being drawn, Alice presses U1: her upscale is posted
    while Bob's gallery is still being drawn, and his gallery is exactly itself."""
    gallery = (await scene.alice.slash(scene.channel, "imagine", prompt="a paper boat", count=2)).response
    request = ImagineRequest("a lighthouse at night", count=2, seed=5)
    bobs = HeldGallery(scene, monkeypatch, request, scene.bob.id, kind="upscale")
    await bobs.drawing()
    before = len(scene.env.http_requests)

    pressed = await scene.alice.click(gallery, label="U1")

    assert pressed.ephemeral and pressed.response.content.startswith("Here it is: ")
    path = f"/channels/{scene.channel.id}/messages"
    posts = [i for i, e in enumerate(scene.env.http_requests) if (e.method, e.path) == ("POST", path)]
    drawn = await bobs.result()
    [posted] = [i for i in posts if i >= before]  # the upscale's reply, the one post since the press
    assert bobs.sent_when_drawn and posted < bobs.sent_when_drawn[0]  # upscaled while Bob's was drawing
    [reply] = [m for m in scene.bot_messages() if m.reference and m.reference.message_id == gallery.id]
    [attachment] = reply.attachments
    assert Image.open(io.BytesIO(await attachment.read())).size == (2 * studio.output_size,) * 2
    assert [d.tokens for d in drawn] == [d.tokens for d in studio.engine.imagine(request)]


async def test_an_upscale_that_runs_out_of_memory_between_steps_is_told_privately_and_refunded(
    scene: Scene, studio: Studio, monkeypatch: pytest.MonkeyPatch
) -> None:
    gallery = (await scene.alice.slash(scene.channel, "imagine", prompt="a paper boat", count=2)).response
    assert studio.upscaler is not None

    def out_of_memory(*_args: object) -> Image.Image:
        raise torch.OutOfMemoryError("CUDA out of memory")

    enlarge = studio.upscaler.enlarge
    monkeypatch.setattr(studio.upscaler, "enlarge", out_of_memory)

    told = await scene.bob.click(gallery, label="U1")

    assert told.ephemeral and told.response.content == f"⚠️ {OUT_OF_MEMORY_UPSCALING}"
    assert not [m for m in scene.bot_messages() if m.reference and m.reference.message_id == gallery.id]
    assert "Generations: 0/" in (await scene.bob.slash(scene.channel, "usage")).response.content
    monkeypatch.setattr(studio.upscaler, "enlarge", enlarge)  # the GPU has memory again: the press now works
    again = await scene.bob.click(gallery, label="U1")
    assert again.response.content.startswith("Here it is: ")


def test_warming_up_the_steps_draws_and_answers_once(engine: JanusEngine) -> None:
    studio = Studio(engine, None)  # compile_steps=False: the same warm-up, without the minutes of compiling
    studio.warm_up_steps(4, 1)
    scheduler = studio.scheduler(4, 1)
    assert scheduler.steps == engine.num_image_tokens - 1 and not scheduler.pending()


def test_a_cache_that_cannot_grow_is_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SlotCache(2, 3, 1, 4, torch.device("cpu"), torch.float32)
    cache.ensure(10)
    assert cache.length == 64  # a multiple of CACHE_GROWTH
    for tensor in cache.tensors():
        tensor.fill_(1.0)
    zeros, made = torch.zeros, []

    def zeros_until_memory_runs_out(*args: Any, **kwargs: Any) -> torch.Tensor:
        made.append(args)
        if len(made) == 3:  # the keys are made, not yet the values
            raise torch.OutOfMemoryError("CUDA out of memory")
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros_until_memory_runs_out)
    with pytest.raises(torch.OutOfMemoryError):
        cache.ensure(100)
    assert cache.length == 64 and all(t.shape[2] == 64 and bool((t == 1).all()) for t in cache.tensors())
    monkeypatch.setattr(torch, "zeros", zeros)
    assert cache.ensure(100) and cache.length == 128
    assert all(bool((t[:, :, :64] == 1).all()) and not t[:, :, 64:].any() for t in cache.tensors())
    assert SlotCache(1, 1, 1, 4, torch.device("cpu"), torch.float32, doubling=True).ensure(700)


class IdleRefusingStepper(SlowStepper):
    """A broken stepper: it never takes anything, even with nothing running."""

    def admit(self, payload: str, report: Any, finish: Any) -> bool:
        return False


async def test_a_job_the_stepper_would_never_take_is_told_and_the_rest_is_served() -> None:
    async with GpuExecutor(job_timeout=LIMIT) as executor:
        refused = executor.submit_stepped(IdleRefusingStepper(), "never", kind="imagine")
        plain = executor.submit(lambda _report: "plain", kind="upscale")
        with pytest.raises(JobFailed, match="something went wrong"):
            await asyncio.wait_for(refused, LIMIT)
        assert await asyncio.wait_for(plain, LIMIT) == "plain"
