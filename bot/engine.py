"""Janus-Pro through transformers' own port: answer questions about images, and draw images from prompts.

Plain synchronous torch, meant to run on the executor's GPU thread. Nothing here knows about Discord.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    DynamicCache,
    GenerationMixin,
    JanusForConditionalGeneration,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    PreTrainedConfig,
    StaticCache,
)
from transformers.feature_extraction_utils import BatchFeature
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from bot.images import to_rgb
from bot.jobs import Progress, Reporter
from bot.requests import AskRequest, Drawing, ImagineRequest, Turn  # defined without torch; re-exported here

log = logging.getLogger(__name__)

PROMPT_BUCKET = 32  # prompt lengths are padded to a multiple of this when shapes must repeat (static cache)

# Private-use characters put around each special token a member typed (<image_placeholder>, <|User|>, ...), so
# that `encode_prompts` encodes it as the plain text it is made of: it never stands for an image or a turn.
_TYPED, _TYPED_END = "\U000f0000", "\U000f0001"
_TYPED_TOKEN = re.compile(f"{_TYPED}(.*?){_TYPED_END}", re.DOTALL)


def mark_special_tokens(text: str, special: re.Pattern[str]) -> str:
    """Member text with every special token in it marked as typed (markers already in it are dropped)."""
    text = text.replace(_TYPED, "").replace(_TYPED_END, "")
    return special.sub(lambda match: f"{_TYPED}{match[0]}{_TYPED_END}", text)


def encode_prompts(
    processor: JanusProcessor,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    *,
    generation_mode: str,
    pad_to_multiple_of: int | None = None,
) -> BatchFeature:
    """What `processor(text=prompts, images=images, generation_mode=..., padding=True, return_tensors="pt")`
    gives (left-padded input_ids and attention_mask, pixel_values), except that the special tokens
    `mark_special_tokens` marked are encoded as plain text: the template's own stay special."""
    tokenizer = processor.tokenizer
    image_tokens = processor.image_token * processor.num_image_tokens
    one_image = (
        processor.image_start_token + image_tokens + processor.image_end_token
    )  # as the processor expands
    rows = []
    for prompt in prompts:
        if generation_mode == "text" and processor.use_default_system_prompt:
            prompt = DEFAULT_SYSTEM_PROMPT + prompt
        elif generation_mode == "image":
            prompt += processor.image_start_token
        ids: list[int] = []
        for index, piece in enumerate(_TYPED_TOKEN.split(prompt)):  # [template, typed, template, typed, ...]
            if index % 2:
                ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif piece or index == 0:  # the first piece gets BOS (from the tokenizer's post-processor)
                ids += tokenizer(
                    piece.replace(processor.image_token, one_image), add_special_tokens=index == 0
                )["input_ids"]
        rows.append(ids)
    data = dict(
        tokenizer.pad(
            {"input_ids": rows},
            padding=True,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side="left",
            return_tensors="pt",
        )
    )
    if images:
        data["pixel_values"] = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    return BatchFeature(data)


@dataclass
class ImageBatch:
    """Several requests' rows laid out for one generation loop: rows [0, B) conditional, [B, 2B)
    unconditional."""

    input_ids: torch.Tensor  # [2B, L] long, left-padded
    attention_mask: torch.Tensor  # [2B, L] long
    guidance: torch.Tensor  # [B, 1] float
    temperature: torch.Tensor  # [B, 1] float, 0 = greedy
    uniforms: torch.Tensor  # [B, n_img] float in [0, 1), drawn from each request's own seed
    kept: torch.Tensor  # [B, n_img] long: tokens forced at the start of each row (ImagineRequest.keep)
    kept_length: torch.Tensor  # [B] long: how many of them; 0 = none
    spans: list[slice] = field(default_factory=list)  # each request's rows among the B (filler rows follow)


def free_gpu_memory() -> None:
    """Hand the memory a failed (out-of-memory) step left cached back to the GPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"JANUS_DEVICE={name} but PyTorch sees no CUDA GPU; use JANUS_DEVICE=cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    # bf16 is the checkpoints' own dtype and the GPU's fast path; float32 is exact and well supported on CPU.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class _TextReporter(BaseStreamer):
    """Feeds each row's answer decoded so far to its reporter, at most every `interval` seconds."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        reports: Sequence[Reporter],
        total: int,
        interval: float,
        eos: int | None,
    ) -> None:
        self.decode, self.reports, self.total, self.interval, self.eos = decode, reports, total, interval, eos
        self.tokens: list[list[int]] = [[] for _ in reports]
        self.finished = [False] * len(reports)
        self.prompt_seen = False
        self.last = 0.0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.reports), -1)[:, -1].tolist()):
            if not self.finished[row]:  # finished rows are padded; keep only what the row itself said
                self.tokens[row].append(token)
                self.finished[row] = token == self.eos
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self.end()

    def end(self) -> None:
        for tokens, report in zip(self.tokens, self.reports, strict=True):
            report(Progress(len(tokens), self.total, self.decode(tokens)))


def answer_uniforms(request: AskRequest) -> torch.Tensor:
    """The random numbers a question's answer is sampled with, one per token, from its own seed."""
    return torch.rand((request.max_new_tokens,), generator=torch.Generator().manual_seed(request.seed))


def sample_text_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """One token per row, by inverse CDF over the row's nucleus (the smallest set of tokens reaching its
    top_p), greedy where its temperature is 0. [R, V] logits, [R] parameters and uniforms -> [R] long."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    probs, order = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1).sort(
        dim=-1, descending=True
    )
    kept = probs.cumsum(-1) - probs < top_p[:, None]
    cdf = (probs * kept).cumsum(-1)  # [R, V]
    index = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)  # [R, 1]
    sampled = order.gather(-1, index).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


def sample_image_rows(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: torch.Tensor,
    temperature: torch.Tensor,
    uniform: torch.Tensor,
    kept: torch.Tensor,
) -> torch.Tensor:
    """Classifier-free guidance, then one token per image row by inverse CDF over the full distribution
    (greedy where its temperature is 0); a kept token (>= 0) wins. [R, V] logits, [R] the rest -> [R] long."""
    guided = uncond + guidance[:, None] * (cond - uncond)  # [R, V]
    greedy = guided.argmax(dim=-1)
    cdf = torch.softmax(guided / temperature.clamp(min=1e-5)[:, None], dim=-1).cumsum(dim=-1)
    threshold = uniform[:, None] * cdf[:, -1:]  # [R, 1]
    sampled = torch.searchsorted(cdf, threshold).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    drawn = torch.where(temperature > 0, sampled, greedy)
    return torch.where(kept >= 0, kept, drawn)


class _RowSampler(LogitsProcessor):
    """Samples every row with its own seed, temperature and top-p (`sample_text_rows`, all rows at once),
    then hands generate() a one-hot choice to take greedily: questions answered together in one batch get the
    answers they would get alone, and the answers the step scheduler gives."""

    def __init__(self, requests: Sequence[AskRequest], prompt_length: int, device: torch.device) -> None:
        self.prompt_length = prompt_length
        longest = max(r.max_new_tokens for r in requests)
        self.uniforms = torch.stack(
            [torch.nn.functional.pad(answer_uniforms(r), (0, longest - r.max_new_tokens)) for r in requests]
        ).to(device)  # [B, longest]
        self.temperature = torch.tensor([r.temperature for r in requests], device=device)
        self.top_p = torch.tensor([r.top_p for r in requests], device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        chosen = sample_text_rows(scores, self.temperature, self.top_p, self.uniforms[:, step])
        picked = torch.full_like(scores, float("-inf"))
        picked.scatter_(1, chosen[:, None], 0.0)
        return picked


class JanusEngine:
    """A loaded Janus-Pro model and processor on one device."""

    def __init__(
        self,
        model: JanusForConditionalGeneration,
        processor: JanusProcessor,
        *,
        preview_seconds: float | None = None,
        static_cache: bool = False,
        compile: bool = False,
    ) -> None:
        self.model, self.processor = model, processor
        # A static KV cache keeps every decode step's shapes fixed, which torch.compile / CUDA graphs need.
        self.static_cache = static_cache or compile
        self.decode_step = (
            torch.compile(
                self._forward,
                mode="reduce-overhead" if model.device.type == "cuda" else "default",
                dynamic=False,
            )
            if compile
            else self._forward
        )
        self.tokenizer = processor.tokenizer
        longest_first = sorted(
            self.tokenizer.added_tokens_encoder, key=len, reverse=True
        )  # typed, they are text
        self.special_tokens = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self.device, self.dtype = model.device, model.dtype
        self.preview_seconds = preview_seconds  # None: no previews; 0: after every finished row
        vision = cast(JanusVisionConfig, model.config.vision_config)  # sub-configs are built by now
        self.vq_config = cast(JanusVQVAEConfig, model.config.vq_config)
        self.text_config = cast(PreTrainedConfig, model.config.text_config)
        self.num_image_tokens: int = vision.num_image_tokens
        self.grid = int(round(self.num_image_tokens**0.5))  # tokens per side
        self.image_size = self.grid * 2 ** (len(self.vq_config.channel_multiplier) - 1)
        gc = model.generation_config
        self.bos_id, self.pad_id = gc.bos_token_id, gc.pad_token_id
        self.boi_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)

    @classmethod
    def load(
        cls,
        model_name: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        preview_seconds: float | None = None,
        compile: bool = False,
    ) -> JanusEngine:
        """Load from a hub id or a local directory onto the chosen device."""
        started = time.perf_counter()
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        processor = AutoProcessor.from_pretrained(model_name)
        model = JanusForConditionalGeneration.from_pretrained(model_name, dtype=torch_dtype)
        # `PreTrainedModel.to` is wrapped with functools.wraps, so pyright does not bind `self` to it.
        model.to(target).eval()  # pyright: ignore[reportArgumentType]
        engine = cls(model, processor, preview_seconds=preview_seconds, compile=compile)
        params = sum(p.numel() for p in model.parameters())
        log.info(
            "Loaded %s on %s (%s, %.2f B params) in %.1fs; images %dpx from %d tokens",
            model_name,
            target,
            torch_dtype,
            params / 1e9,
            time.perf_counter() - started,
            engine.image_size,
            engine.num_image_tokens,
        )
        return engine

    # ---- understanding ---------------------------------------------------------------------------------

    def _conversation(self, request: AskRequest) -> tuple[list[dict], list[Image.Image]]:
        messages, images = [], []
        for turn in (*request.history, Turn("user", request.question, request.images)):
            content: list[dict] = [{"type": "image"} for _ in turn.images]
            content.append({"type": "text", "text": mark_special_tokens(turn.text, self.special_tokens)})
            messages.append({"role": turn.role, "content": content})
            images.extend(to_rgb(image) for image in turn.images)
        return messages, images

    def ask(self, request: AskRequest, report: Reporter | None = None) -> str:
        """The model's answer to a question about images (and earlier turns); only the new tokens."""
        return self.ask_batch([request], [report] if report else [])[0]

    def ask_inputs(self, requests: Sequence[AskRequest]) -> BatchFeature:
        """The questions' chat prompts, left-padded to one length, with their images' pixels, on device."""
        prompts, images = [], []
        for request in requests:
            messages, pictures = self._conversation(request)
            prompts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
            images.extend(pictures)
        inputs = encode_prompts(self.processor, prompts, images, generation_mode="text")
        return inputs.to(self.device, dtype=self.dtype) if images else inputs.to(self.device)

    def question_embeddings(self, inputs: BatchFeature) -> torch.Tensor:
        """The language model's input embeddings for `ask_inputs`, each image's features in place of its
        placeholder tokens, as JanusModel.forward builds them. -> [B, L, D]"""
        ids = inputs["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)
        if "pixel_values" in inputs:
            features = self.model.model.get_image_features(inputs["pixel_values"])
            assert not isinstance(features, tuple)  # a ModelOutput unless return_dict=False was asked for
            assert features.pooler_output is not None  # the aligner's output, set by get_image_features
            flat = features.pooler_output.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            placeholders = (ids == self.model.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(placeholders, flat)
        return embeds

    @torch.inference_mode()
    def ask_batch(self, requests: Sequence[AskRequest], reports: Sequence[Reporter] = ()) -> list[str]:
        """Answer several questions in one left-padded batch; each gets the answer it would get alone."""
        inputs = self.ask_inputs(requests)
        longest = max(r.max_new_tokens for r in requests)
        eos = self.model.generation_config.eos_token_id
        streamer = _TextReporter(self.decode_answer, reports, longest, 0.25, eos) if reports else None
        # Janus's own generate() drops `logits_processor` in text mode; its text mode is exactly the
        # generic GenerationMixin.generate without guidance, so call that directly.
        # (transformers annotates the mixin's `self` with a protocol that GenerationMixin itself does not
        # satisfy, so pyright cannot look the method up on the class.)
        output = GenerationMixin.generate(  # pyright: ignore[reportAttributeAccessIssue]
            self.model,
            **inputs,
            max_new_tokens=longest,
            streamer=streamer,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList(
                [_RowSampler(requests, inputs["input_ids"].shape[1], self.device)]
            ),
            guidance_scale=None,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )  # [B, L + new]
        prompt_length = inputs["input_ids"].shape[1]
        return [
            self.decode_answer(row[prompt_length : prompt_length + r.max_new_tokens].tolist())
            for row, r in zip(output, requests, strict=True)
        ]

    def decode_answer(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    # ---- generation ------------------------------------------------------------------------------------

    def prompt_text(self, prompt: str) -> str:
        """The chat-formatted prompt for image generation (the processor appends <begin_of_image>)."""
        text = mark_special_tokens(prompt, self.special_tokens)
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def prepare_batch(self, requests: Sequence[ImagineRequest]) -> ImageBatch:
        """Lay out every request's conditional and unconditional rows, left-padded to one length."""
        real = list(requests)
        total = sum(r.count for r in real)
        if self.static_cache and total & (total - 1):
            # Compiled shapes repeat only if batches come in a few sizes: fill up to a power of two with
            # greedy rows whose images are thrown away.
            filler = ImagineRequest(real[-1].prompt, count=(1 << total.bit_length()) - total, temperature=0)
            requests = [*real, filler]
        # With a static cache, prompt lengths are rounded up too (left padding), for the same reason.
        inputs = encode_prompts(
            self.processor,
            [self.prompt_text(r.prompt) for r in requests],
            [],
            generation_mode="image",
            pad_to_multiple_of=PROMPT_BUCKET if self.static_cache else None,
        )
        counts = torch.tensor([r.count for r in requests])
        cond = inputs["input_ids"].repeat_interleave(counts, dim=0)  # [B, L] prompt-major, as HF does
        mask = inputs["attention_mask"].repeat_interleave(counts, dim=0)
        uncond = self.unconditional(cond)
        spans, start = [], 0
        for r in real:
            spans.append(slice(start, start + r.count))
            start += r.count
        uniforms = torch.cat(
            [
                torch.rand((r.count, self.num_image_tokens), generator=torch.Generator().manual_seed(r.seed))
                for r in requests
            ]
        )
        kept = torch.zeros((len(uniforms), self.num_image_tokens), dtype=torch.long)
        kept_length = torch.zeros(len(uniforms), dtype=torch.long)
        for span, r in zip(spans, real, strict=True):
            kept[span, : len(r.keep)] = torch.tensor(self.checked_keep(r.keep), dtype=torch.long)
            kept_length[span] = len(r.keep)
        per_row = lambda values: torch.tensor(values, dtype=torch.float32).repeat_interleave(counts)[:, None]  # noqa: E731
        return ImageBatch(
            input_ids=torch.cat([cond, uncond]).to(self.device),
            attention_mask=torch.cat([mask, mask]).to(self.device),
            guidance=per_row([r.guidance for r in requests]).to(self.device),
            temperature=per_row([r.temperature for r in requests]).to(self.device),
            uniforms=uniforms.to(self.device),
            kept=kept.to(self.device),
            kept_length=kept_length.to(self.device),
            spans=spans,
        )

    def unconditional(self, cond: torch.Tensor) -> torch.Tensor:
        """The rows guidance pushes away from: only BOS and <begin_of_image> kept, as DeepSeek's demo and
        HF's port do."""
        uncond = cond.clone()
        uncond[(uncond != self.bos_id) & (uncond != self.boi_id)] = self.pad_id
        return uncond

    def checked_keep(self, keep: tuple[int, ...]) -> list[int]:
        """Kept tokens must be image tokens of this model, at most one image's worth."""
        vocabulary = self.vq_config.num_embeddings
        if len(keep) > self.num_image_tokens or any(not 0 <= token < vocabulary for token in keep):
            raise ValueError(
                f"keep: expected at most {self.num_image_tokens} image tokens in [0, {vocabulary})"
            )
        return list(keep)

    def _new_cache(self, max_length: int) -> DynamicCache | StaticCache:
        if self.static_cache:
            return StaticCache(config=self.text_config, max_cache_len=max_length)
        return DynamicCache(config=self.text_config)

    def _forward(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache | StaticCache,
    ) -> torch.Tensor:
        """Logits of the image head for the last position. [2B, S, D] -> [B*2, V] float32."""
        hidden = self.model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state[:, -1, :]  # [2B, D]
        return self.model.model.generation_head(hidden).float()  # [2B, V]

    @staticmethod
    def sample(logits: torch.Tensor, batch: ImageBatch, step: int) -> torch.Tensor:
        """Guidance, then per-row sampling from the full distribution by inverse CDF (greedy where T = 0)."""
        rows = logits.shape[0] // 2
        kept = torch.where(step < batch.kept_length, batch.kept[:, step], -1)
        return sample_image_rows(
            logits[:rows],
            logits[rows:],
            batch.guidance.squeeze(-1),
            batch.temperature.squeeze(-1),
            batch.uniforms[:, step],
            kept,
        )

    @torch.inference_mode()
    def generate_tokens(self, batch: ImageBatch, reports: Sequence[Reporter] = ()) -> torch.Tensor:
        """The image tokens of every row: [B, n_img] long. Reports progress (and previews) per request."""
        rows, prompt_length = batch.input_ids.shape[0] // 2, batch.input_ids.shape[1]
        n_img = self.num_image_tokens
        tokens = torch.zeros((rows, n_img), dtype=torch.long, device=self.device)  # [B, n_img]
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # [2B, L]; left padding starts at 0
        embeds = self.model.get_input_embeddings()(batch.input_ids)  # [2B, L, D]
        cache = self._new_cache(prompt_length + n_img)
        if self.static_cache:  # one mask of the cache's full length, filled in as tokens are added
            mask = torch.zeros((2 * rows, prompt_length + n_img), dtype=torch.long, device=self.device)
            mask[:, :prompt_length] = batch.attention_mask  # [2B, L + n_img]
        else:
            mask = batch.attention_mask  # [2B, L], grows by one column per step
        last_preview = time.perf_counter()
        for step in range(n_img):
            forward = self._forward if step == 0 else self.decode_step  # prefill eager, decode maybe compiled
            logits = forward(embeds, mask, positions, cache)  # [2B, V]
            chosen = self.sample(logits, batch, step)  # [B]
            tokens[:, step] = chosen
            embeds = self.model.prepare_embeddings_for_image_generation(chosen.repeat(2)).unsqueeze(
                1
            )  # [2B,1,D]
            positions = positions[:, -1:] + 1
            if self.static_cache:
                mask[:, prompt_length + step] = 1
            else:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            if reports:
                last_preview = self._report_step(batch, tokens, step + 1, reports, last_preview)
        return tokens

    def _report_step(
        self,
        batch: ImageBatch,
        tokens: torch.Tensor,
        done: int,
        reports: Sequence[Reporter],
        last_preview: float,
    ) -> float:
        preview_due = self.preview_due(done, last_preview)
        previews = self.preview(tokens[: batch.spans[-1].stop], done) if preview_due else None
        for span, report in zip(batch.spans, reports, strict=True):
            report(Progress(done, self.num_image_tokens, previews[span] if previews else None))
        return time.perf_counter() if preview_due else last_preview

    def preview_due(self, done: int, last_preview: float) -> bool:
        """Whether a request with `done` tokens per image, last previewed at `last_preview`, gets a preview
        now: at each finished row of the token grid, at most every preview_seconds, not once it is done."""
        return (
            self.preview_seconds is not None
            and done < self.num_image_tokens
            and done % self.grid == 0
            and time.perf_counter() - last_preview >= self.preview_seconds
        )

    def preview(self, tokens: torch.Tensor, done: int) -> list[Image.Image]:
        """The rows drawn so far of every image, the rest left grey."""
        rows_done = done // self.grid
        images = self.decode(tokens)
        cut = rows_done * self.image_size // self.grid
        previews = []
        for image in images:
            canvas = Image.new("RGB", image.size, (64, 64, 64))
            canvas.paste(image.crop((0, 0, image.width, cut)), (0, 0))
            previews.append(canvas)
        return previews

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """VQ tokens [N, n_img] -> N RGB images of image_size px."""
        pixels = self.model.decode_image_tokens(tokens)  # [N, H, W, 3] in about [-1, 1]
        rgb = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(array) for array in rgb]

    def imagine_batch(
        self, requests: Sequence[ImagineRequest], reports: Sequence[Reporter] = ()
    ) -> list[list[Drawing]]:
        """Draw every request's images in one loop; each request gets the images it would get alone."""
        batch = self.prepare_batch(requests)
        tokens = self.generate_tokens(batch, reports)[: batch.spans[-1].stop]  # filler rows are not decoded
        drawings = [
            Drawing(image, tuple(row))
            for image, row in zip(self.decode(tokens), tokens.tolist(), strict=True)
        ]
        return [drawings[span] for span in batch.spans]

    def imagine(self, request: ImagineRequest, report: Reporter | None = None) -> list[Drawing]:
        return self.imagine_batch([request], [report] if report else [])[0]
