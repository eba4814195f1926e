"""The Janus engine on the tiny random checkpoint: image generation (seeds, sizes, guidance, batching, parity
with transformers' own generate) and understanding (answers, image modes, history, streaming)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import IMAGE_SIZE, NUM_IMAGE_TOKENS
from transformers import GenerationMixin, JanusVisionConfig, JanusVQVAEConfig

from bot.engine import AskRequest, Drawing, ImageBatch, ImagineRequest, JanusEngine, Turn
from bot.jobs import Progress
from bot.studio import Studio
from bot.upscaler import Upscaler

SYSTEM_PROMPT_START = "You are a helpful language and vision assistant"


@pytest.fixture
def engine(studio: Studio) -> JanusEngine:
    return studio.engine


def pixels(images: Sequence[Image.Image | Drawing]) -> list[np.ndarray]:
    """Pixels of images, or of drawings' images (engine.imagine returns drawings, engine.decode images)."""
    return [np.asarray(image.image if isinstance(image, Drawing) else image) for image in images]


def same_images(a: Sequence[Image.Image | Drawing], b: Sequence[Image.Image | Drawing]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))


@pytest.fixture(params=[False, True], ids=["dynamic-cache", "static-cache"])
def any_engine(request: pytest.FixtureRequest, studio: Studio) -> JanusEngine:
    """The engine with the default dynamic KV cache, and the same model with the static cache (bucketed
    prompt lengths, batches filled up to a power of two) that compiled decoding uses."""
    if not request.param:
        return studio.engine
    return JanusEngine(studio.engine.model, studio.engine.processor, preview_seconds=0, static_cache=True)


def tokens_of(engine: JanusEngine, *requests: ImagineRequest) -> torch.Tensor:
    """The image tokens our loop draws for these requests together: [sum of counts, n_img] (filler rows of a
    static-cache batch left out)."""
    batch = engine.prepare_batch(list(requests))
    tokens = engine.generate_tokens(batch)
    return torch.cat([tokens[span] for span in batch.spans])


def photo(width: int = 80, height: int = 50, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def spy_generate(monkeypatch: pytest.MonkeyPatch, engine: JanusEngine) -> list[dict[str, Any]]:
    """Record what text generation (transformers' GenerationMixin.generate) is given and returns, still
    running it."""
    calls: list[dict[str, Any]] = []
    # transformers annotates the mixin's `self` with a protocol that GenerationMixin itself does not satisfy,
    # so pyright cannot look the method up on the class.
    original = GenerationMixin.generate  # pyright: ignore[reportAttributeAccessIssue]

    def generate(model: Any, **kwargs: Any) -> torch.Tensor:
        output = original(model, **kwargs)
        if model is engine.model:
            calls.append({"inputs": kwargs, "output": output})
        return output

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    return calls


# ---- generation ------------------------------------------------------------------------------------------


def test_image_size_and_token_count_come_from_the_model_config(engine: JanusEngine) -> None:
    """The tiny config has 16 image tokens (4 x 4) and a 5-level VQ decoder: 4 * 2**4 = 64 px images."""
    config = engine.model.config
    vision, vq = cast(JanusVisionConfig, config.vision_config), cast(JanusVQVAEConfig, config.vq_config)
    assert engine.num_image_tokens == vision.num_image_tokens == NUM_IMAGE_TOKENS == 16
    side_tokens = int(vision.num_image_tokens**0.5)
    expected = side_tokens * 2 ** (len(vq.channel_multiplier) - 1)
    assert engine.image_size == expected == IMAGE_SIZE == 64
    images = engine.imagine(ImagineRequest("a red fox in the snow", count=3, seed=1))
    assert [(d.image.mode, d.image.size) for d in images] == [("RGB", (64, 64))] * 3
    assert [len(d.tokens) for d in images] == [NUM_IMAGE_TOKENS] * 3


def test_upscaled_images_are_twice_or_four_times_the_model_size(studio: Studio, tiny_dir: Path) -> None:
    """With the x2 upscaler a 64 px image becomes 128 px; with the x4 file, 256 px."""
    request = ImagineRequest("a red fox in the snow", count=2, seed=3)
    [gallery] = studio.imagine_batch([request], [lambda progress: None])
    assert not isinstance(gallery, BaseException)
    assert studio.output_size == 128
    assert [d.image.size for d in gallery] == [(128, 128)] * 2

    x4 = Studio(studio.engine, Upscaler.load(tiny_dir / "RealESRGAN_x4.pth"))
    [gallery4] = x4.imagine_batch([request], [lambda progress: None])
    assert not isinstance(gallery4, BaseException)
    assert x4.output_size == 256
    assert [d.image.size for d in gallery4] == [(256, 256)] * 2


def test_equal_seeds_give_identical_images_and_different_seeds_differ(engine: JanusEngine) -> None:
    """The same request with the same seed draws the same images, whatever the global RNG did meanwhile."""
    request = ImagineRequest("a red fox in the snow", count=2, seed=7)
    first = engine.imagine(request)
    torch.manual_seed(12345)
    torch.rand(100)  # disturb the global RNG: the seed of the request alone decides
    again = engine.imagine(request)
    other = engine.imagine(ImagineRequest("a red fox in the snow", count=2, seed=8))
    assert same_images(first, again)
    assert not np.array_equal(pixels(first)[0], pixels(other)[0])
    assert not np.array_equal(pixels(first)[1], pixels(other)[1])
    assert not np.array_equal(pixels(first)[0], pixels(first)[1])  # the images of one request differ


VASE = "A watercolor drawing of flowers in a glass vase"


@pytest.mark.parametrize("prompt", ["a red fox in the snow", VASE])
def test_greedy_generation_matches_transformers_generate_token_for_token(
    any_engine: JanusEngine, prompt: str
) -> None:
    """Our CFG loop at temperature 0 gives exactly the tokens of HF generate(generation_mode="image")
    in greedy mode with guidance 5, and imagine() decodes exactly those tokens."""
    engine = any_engine
    inputs = engine.processor(
        text=[engine.prompt_text(prompt)],
        generation_mode="image",
        return_tensors="pt",  # pyright: ignore[reportCallIssue]  # flat kwarg, missing from the kwargs type
    )
    expected = engine.model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=5.0)
    assert isinstance(expected, torch.Tensor)  # image mode returns the tokens themselves
    request = ImagineRequest(prompt, count=1, guidance=5.0, temperature=0)
    ours = tokens_of(engine, request)
    assert ours.shape == expected.shape == (1, NUM_IMAGE_TOKENS)
    assert ours.tolist() == expected.tolist()
    assert same_images(engine.imagine(request), engine.decode(expected))


def test_greedy_parity_is_not_vacuous(engine: JanusEngine) -> None:
    """Guard for the parity test: prompts and guidance change the greedy tokens, so matching them means
    something."""
    fox = tokens_of(engine, ImagineRequest("a red fox in the snow", count=1, temperature=0))
    vase = tokens_of(engine, ImagineRequest(VASE, count=1, temperature=0))
    unguided = tokens_of(engine, ImagineRequest("a red fox in the snow", count=1, guidance=1, temperature=0))
    assert fox.tolist() != vase.tolist()
    assert fox.tolist() != unguided.tolist()


def test_batched_requests_get_exactly_the_tokens_they_get_alone(
    any_engine: JanusEngine, studio: Studio
) -> None:
    """Requests of different prompt lengths, counts, guidance, temperatures and seeds, drawn together, each
    get the tokens (and images) they would get alone, with either KV cache."""
    engine, reference = any_engine, studio.engine
    requests = [
        ImagineRequest("a red fox in the snow", count=2, guidance=5.0, temperature=1.0, seed=7),
        ImagineRequest("cat", count=1, guidance=3.0, temperature=0, seed=1),
        ImagineRequest(
            "A watercolor drawing of flowers in a glass vase, soft colors.",
            count=3,
            guidance=1.0,
            temperature=0.7,
            seed=123,
        ),
    ]
    batch = engine.prepare_batch(requests)
    together = engine.generate_tokens(batch)
    assert [span.stop - span.start for span in batch.spans] == [2, 1, 3]
    for request, span in zip(requests, batch.spans, strict=True):
        assert together[span].tolist() == tokens_of(reference, request).tolist(), request

    galleries = engine.imagine_batch(requests)
    assert [len(gallery) for gallery in galleries] == [2, 1, 3]
    assert same_images(galleries[0], engine.imagine(requests[0]))
    assert same_images(galleries[2], engine.imagine(requests[2]))


def test_kept_tokens_start_every_image_and_the_rest_is_drawn_anew(any_engine: JanusEngine) -> None:
    """A request with `keep` (Vary) draws images whose first tokens are exactly the kept ones; the rest
    follows
    from its own seed, the same again for the same seed, and drawn together with others it is unchanged."""
    engine = any_engine
    [source] = engine.imagine(ImagineRequest("a red fox in the snow", count=1, seed=3))
    top = source.tokens[: 2 * engine.grid]  # the first two token rows
    vary = ImagineRequest("a red fox in the snow", count=3, seed=11, keep=top)
    variations = engine.imagine(vary)
    assert [d.tokens[: len(top)] for d in variations] == [top] * 3
    rests = {d.tokens[len(top) :] for d in variations}
    assert (
        len(rests) == 3 and source.tokens[len(top) :] not in rests
    )  # new random numbers below the kept rows
    assert [d.tokens for d in engine.imagine(vary)] == [d.tokens for d in variations]
    together = engine.imagine_batch([ImagineRequest("cat", count=2, seed=1), vary])[1]
    assert [d.tokens for d in together] == [d.tokens for d in variations]


def test_kept_tokens_outside_the_image_vocabulary_are_refused(engine: JanusEngine) -> None:
    vocabulary = cast(JanusVQVAEConfig, engine.model.config.vq_config).num_embeddings
    with pytest.raises(ValueError, match="keep"):
        engine.imagine(ImagineRequest("a fox", count=1, keep=(vocabulary,)))


def test_temperature_zero_is_greedy_and_ignores_the_seed(engine: JanusEngine) -> None:
    """At temperature 0 the seed does not matter; at temperature 1 it does."""
    greedy = [tokens_of(engine, ImagineRequest("a red fox", count=1, temperature=0, seed=s)) for s in (1, 2)]
    sampled = [tokens_of(engine, ImagineRequest("a red fox", count=1, temperature=1, seed=s)) for s in (1, 2)]
    assert greedy[0].tolist() == greedy[1].tolist()
    assert sampled[0].tolist() != sampled[1].tolist()


def crafted_batch(guidance: list[float], temperature: list[float], uniforms: list[list[float]]) -> ImageBatch:
    rows = len(guidance)
    return ImageBatch(
        input_ids=torch.zeros((2 * rows, 1), dtype=torch.long),
        attention_mask=torch.ones((2 * rows, 1), dtype=torch.long),
        guidance=torch.tensor(guidance)[:, None],
        temperature=torch.tensor(temperature)[:, None],
        uniforms=torch.tensor(uniforms),
        kept=torch.zeros((rows, len(uniforms[0])), dtype=torch.long),
        kept_length=torch.zeros(rows, dtype=torch.long),
    )


def test_sampling_is_inverse_cdf_over_the_full_distribution() -> None:
    """A uniform u picks the first token whose cumulative probability reaches u, at each row's temperature;
    nothing is truncated, so a token ranked 100th of 128 can be drawn (HF's default top_k=50 forbids it)."""
    vocab = 128
    logits = torch.linspace(4.0, -4.0, vocab)  # token i is ranked i-th
    picks = [0, 3, 60, 100, 127, 20]

    def uniform_for(token: int, temperature: float) -> float:
        cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
        low = cdf[token - 1].item() if token else 0.0
        return (low + cdf[token].item()) / 2  # the middle of the token's slice of [0, 1)

    temperatures = [1.0, 1.0, 1.0, 1.0, 1.0, 0.5]
    uniforms = [[0.999, uniform_for(t, temp)] for t, temp in zip(picks, temperatures, strict=True)]
    batch = crafted_batch([5.0] * len(picks), temperatures, uniforms)
    rows = logits.repeat(len(picks), 1)  # [B, V], conditional == unconditional, so guidance changes nothing
    chosen = JanusEngine.sample(torch.cat([rows, rows]), batch, step=1)  # step 1: the second uniform
    assert chosen.tolist() == picks
    assert chosen[3].item() >= 50  # outside the top 50


def test_sampling_applies_guidance_per_row_and_temperature_zero_is_argmax() -> None:
    """Guided logits are uncond + g * (cond - uncond) per row; temperature 0 takes their argmax."""
    vocab = 128
    uncond = torch.zeros(vocab)
    uncond[9] = 3.0
    cond = uncond.clone()
    cond[5] = 2.0  # conditional: 9 still wins at g = 1, 5 wins once guidance amplifies the difference
    guidance = [0.0, 1.0, 5.0]
    batch = crafted_batch(guidance, [0.0] * 3, [[0.0]] * 3)
    chosen = JanusEngine.sample(torch.stack([cond] * 3 + [uncond] * 3), batch, step=0)
    assert chosen.tolist() == [9, 9, 5]


def test_imagine_reports_progress_per_token_and_previews(engine: JanusEngine) -> None:
    """Each request of a batch hears Progress(done, 16) for every token, and previews (one picture per
    image of that request) arrive while it draws (preview_seconds=0)."""
    assert engine.preview_seconds == 0
    reports: list[list[Progress]] = [[], []]
    requests = [ImagineRequest("a red fox", count=2, seed=1), ImagineRequest("a cat", count=1, seed=2)]
    galleries = engine.imagine_batch(requests, [reports[0].append, reports[1].append])
    assert [len(gallery) for gallery in galleries] == [2, 1]
    for request, heard in zip(requests, reports, strict=True):
        assert [p.done for p in heard] == list(range(1, NUM_IMAGE_TOKENS + 1))
        assert {p.total for p in heard} == {NUM_IMAGE_TOKENS}
        previews = [p.preview for p in heard if p.preview is not None]
        assert previews, "no preview arrived"
        for preview in previews:
            assert isinstance(preview, list) and len(preview) == request.count
            assert all(isinstance(im, Image.Image) and im.size == (64, 64) for im in preview)


# ---- understanding ---------------------------------------------------------------------------------------


def test_the_answer_is_only_the_new_tokens(monkeypatch: pytest.MonkeyPatch, engine: JanusEngine) -> None:
    """The prompt (system prompt and question) is not echoed: the answer is the decoded new tokens only."""
    calls = spy_generate(monkeypatch, engine)
    question = "What is in this picture?"
    answer = engine.ask(AskRequest(question, (photo(),), temperature=0, max_new_tokens=24))
    [call] = calls
    prompt_length = call["inputs"]["input_ids"].shape[1]
    output = call["output"][0]
    assert output.shape[0] > prompt_length
    whole = engine.tokenizer.decode(output, skip_special_tokens=True)
    assert SYSTEM_PROMPT_START in whole and question in whole  # what a naive decode would return
    assert answer == engine.tokenizer.decode(output[prompt_length:], skip_special_tokens=True).strip()
    assert answer  # non-empty for this seed, so the checks below are not vacuous
    assert SYSTEM_PROMPT_START not in answer and question not in answer and "User" not in answer


def _image_of_mode(mode: str) -> Image.Image:
    size = (48, 30)
    if mode == "I;16":
        return Image.fromarray(np.arange(30 * 48, dtype=np.uint16).reshape(30, 48) * 40)
    if mode == "P":
        return photo(*size).convert("P")
    if mode == "P+transparency":
        image = photo(*size).convert("P")
        image.info["transparency"] = 0
        return image
    fills = {"RGBA": (255, 0, 0, 100), "L": 120, "LA": (120, 60), "CMYK": (0, 255, 255, 0), "1": 1}
    return Image.new(mode, size, fills[mode])


@pytest.mark.parametrize("mode", ["RGBA", "P", "P+transparency", "L", "LA", "CMYK", "I;16", "1"])
def test_images_of_any_mode_are_understood(
    monkeypatch: pytest.MonkeyPatch, engine: JanusEngine, mode: str
) -> None:
    """Images that are not RGB (the image processor alone would reject them) are converted and answered."""
    image = _image_of_mode(mode)
    assert image.mode == mode.split("+")[0]
    calls = spy_generate(monkeypatch, engine)
    answer = engine.ask(AskRequest("What is this?", (image,), max_new_tokens=4))
    assert isinstance(answer, str)
    assert calls[0]["inputs"]["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_several_images_in_one_question(monkeypatch: pytest.MonkeyPatch, engine: JanusEngine) -> None:
    """All images of a question reach the model: one block of image tokens and one pixel tensor each."""
    calls = spy_generate(monkeypatch, engine)
    images = (photo(80, 50, seed=1), _image_of_mode("RGBA"), photo(30, 90, seed=2))
    answer = engine.ask(AskRequest("What do these pictures have in common?", images, max_new_tokens=8))
    assert isinstance(answer, str)
    inputs = calls[0]["inputs"]
    assert inputs["pixel_values"].shape[0] == 3
    image_token = engine.model.config.image_token_id
    assert (inputs["input_ids"] == image_token).sum().item() == 3 * NUM_IMAGE_TOKENS


def test_a_text_only_question_is_answered(monkeypatch: pytest.MonkeyPatch, engine: JanusEngine) -> None:
    """A question without images works and sends no pixels."""
    calls = spy_generate(monkeypatch, engine)
    answer = engine.ask(AskRequest("Please write a short poem about the sea.", max_new_tokens=8))
    assert isinstance(answer, str)
    assert calls[0]["inputs"].get("pixel_values") is None


def test_the_same_seed_gives_the_same_answer(engine: JanusEngine) -> None:
    """Sampling is seeded per request: equal seeds answer alike, and the seed does change the answer."""

    def answer(seed: int) -> str:
        return engine.ask(
            AskRequest(
                "What is in this picture?",
                (photo(),),
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=12,
                seed=seed,
            )
        )

    first = answer(1)
    torch.manual_seed(999)  # the global RNG state before the call must not matter
    assert answer(1) == first
    assert len({answer(seed) for seed in (1, 2, 3, 4)}) > 1


def test_history_turns_reach_the_model_in_order(monkeypatch: pytest.MonkeyPatch, engine: JanusEngine) -> None:
    """Earlier turns of the conversation, with their images, are part of the prompt the model reads."""
    calls = spy_generate(monkeypatch, engine)
    history = (Turn("user", "What colour is the car?", (photo(),)), Turn("assistant", "The car is red."))
    engine.ask(AskRequest("And the sky?", history=history, max_new_tokens=4))
    inputs = calls[0]["inputs"]
    prompt = engine.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    earlier, reply, question = (
        prompt.index(text) for text in ("What colour is the car?", "The car is red.", "And the sky?")
    )
    assert earlier < reply < question
    assert prompt.rstrip().endswith("<|Assistant|>:")
    assert inputs["pixel_values"].shape[0] == 1  # the history's image

    calls.clear()
    engine.ask(AskRequest("And the sky?", max_new_tokens=4))
    alone = engine.tokenizer.decode(calls[0]["inputs"]["input_ids"][0], skip_special_tokens=False)
    assert "The car is red." not in alone


def test_the_answer_streams_to_the_reporter(engine: JanusEngine) -> None:
    """The reporter hears partial answers as tokens arrive, ending with the final answer."""
    heard: list[Progress] = []
    answer = engine.ask(
        AskRequest("What is in this picture?", (photo(),), temperature=0, max_new_tokens=32), heard.append
    )
    assert len(heard) >= 2
    assert heard[-1].preview == answer
    assert all(isinstance(p.preview, str) for p in heard)
    assert {p.total for p in heard} == {32}
    dones = [p.done for p in heard]
    assert dones == sorted(dones) and 0 < dones[0] < dones[-1] <= 32


# ---- questions answered together ---------------------------------------------------------------------------


QUESTIONS = [
    AskRequest("What is this?", (photo(),), seed=1, temperature=1.0, max_new_tokens=12),
    AskRequest(
        "Tell me a long story about a castle on a hill at dawn",
        (),
        seed=2,
        temperature=0.7,
        max_new_tokens=12,
    ),
    AskRequest(
        "Compare these two", (photo(seed=1), photo(30, 60, seed=2)), seed=3, temperature=0, max_new_tokens=12
    ),
    AskRequest(
        "and now?",
        (),
        history=(Turn("user", "hi", (photo(),)), Turn("assistant", "hello")),
        seed=4,
        temperature=1.0,
        top_p=0.5,
        max_new_tokens=8,
    ),
]


def test_questions_batched_together_get_the_answers_they_get_alone(engine: JanusEngine) -> None:
    """Left-padded together, with their own seeds, temperatures, top-p, images, histories and lengths."""
    alone = [engine.ask(question) for question in QUESTIONS]
    assert len(set(alone)) == len(alone)  # the questions really differ, so equality below means something
    assert engine.ask_batch(QUESTIONS) == alone
    assert engine.ask_batch(QUESTIONS[::-1]) == alone[::-1]


def test_batched_questions_stream_each_its_own_answer(engine: JanusEngine) -> None:
    seen: list[list[Progress]] = [[], []]
    answers = engine.ask_batch(QUESTIONS[:2], [seen[0].append, seen[1].append])
    for progress, answer in zip(seen, answers, strict=True):
        assert progress and progress[-1].preview == answer


async def test_questions_waiting_together_are_answered_in_one_batch(studio, settings) -> None:
    """The backend batches questions that wait in the queue at the same time, each keeping its answer."""
    import threading

    from bot.backends import LocalBackend
    from bot.executor import GpuExecutor

    batches: list[int] = []

    class Counting:
        def ask_batch(self, requests, reports):  # the real studio, counting batch sizes
            batches.append(len(requests))
            return studio.ask_batch(requests, reports)

    gate = threading.Event()
    async with GpuExecutor(8) as executor:
        backend = LocalBackend(executor, Counting, settings)
        held = executor.submit(lambda _report: gate.wait(5))  # hold the GPU while three questions queue
        jobs = [backend.ask(question, owner=i) for i, question in enumerate(QUESTIONS[:3])]
        gate.set()
        await held
        answers = [await job for job in jobs]
    assert batches == [3]
    assert answers == [studio.ask(question) for question in QUESTIONS[:3]]
