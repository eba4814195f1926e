"""Continuous batching on the GPU thread (SCHEDULER=step): requests join a running loop of steps.

Image rows (a conditional and an unconditional row per image) and answer rows run through the same language
model and differ only in their input embeddings and output head, so every step is one forward pass over all
running rows: image rows get the image head, answer rows the text head. Each row has a slot in a
preallocated KV cache and its own position; a request is prefilled into free slots as soon as it is
admitted, joins at the next step, and leaves when its own rows are done, its images decoded and upscaled
at once. Each request gets exactly what it would get alone: its own seed, guidance, temperature and top-p,
sampled by the same functions the batch-at-a-time engine uses. An upscale of one image (a U button) runs
between two steps, so it neither waits for the loop to drain nor holds back the requests behind it.

Plain synchronous torch; `admit` and `pending` may be called from any thread, everything else runs on the
GPU thread. Nothing here knows about Discord.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from bot.engine import (
    JanusEngine,
    answer_uniforms,
    encode_prompts,
    free_gpu_memory,
    sample_image_rows,
    sample_text_rows,
)
from bot.errors import OUT_OF_MEMORY, OUT_OF_MEMORY_ASKING, OUT_OF_MEMORY_UPSCALING, JobCancelled, JobFailed
from bot.jobs import Progress, Reporter
from bot.requests import AskRequest, Drawing, ImagineRequest, UpscaleRequest

log = logging.getLogger(__name__)

CACHE_GROWTH = 64  # a pool's cache grows to the next multiple of this many positions, so shapes repeat
# With static shapes, the caches start this long: image prompts of up to 192 tokens (500 characters and the
# template), and questions whose prompt (an image is 576 tokens on Janus-Pro) and answer fit in 2048; longer
# ones grow the cache (images by CACHE_GROWTH, answers to the next power of two) and compile the step anew.
STATIC_PROMPT_LENGTH, STATIC_ANSWER_LENGTH = 192, 2048
REPORT_SECONDS = 0.25  # answers stream to their reporters at most this often (the first token at once)

Finish = Callable[[Any], None]  # called once per admitted request: its result, or the exception for it


class SlotCache:
    """Keys and values of `rows` cache rows for every layer: [rows, kv_heads, length, head_dim] each. Rows
    are preallocated; the length grows only when a longer request arrives: to the next multiple of
    CACHE_GROWTH, or with `doubling` (fixed shapes, where every new length is compiled anew) to the next power
    of two."""

    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        doubling: bool = False,
    ) -> None:
        self.layers, self.rows, self.kv_heads, self.head_dim = layers, rows, kv_heads, head_dim
        self.device, self.dtype, self.doubling = device, dtype, doubling
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def ensure(self, length: int) -> bool:
        """Make room for `length` positions per row, keeping what is cached; whether the cache grew. Should
        memory run out meanwhile, the cache is left as it was."""
        if length <= self.length:
            return False
        grown = 1 << (length - 1).bit_length() if self.doubling else -(-length // CACHE_GROWTH) * CACHE_GROWTH
        shape = (self.rows, self.kv_heads, grown, self.head_dim)
        keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.layers)]
        values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.layers)]
        for new, old in zip(keys + values, self.keys + self.values, strict=False):  # none before the first
            new[:, :, : self.length] = old
        self.keys, self.values, self.length = keys, values, grown
        return True

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values]


@dataclass
class _Attend:
    """How one request's rows attend in a forward pass. Prefill (`targets`): row j's keys and values for
    positions [0, T) go to cache rows targets[j] (one, or several sharing a prompt), and the rows attend
    causally among themselves. Decode (`rows`, `position`): each row's one new token goes to its cache row at
    `position` (a request's rows move in step), and it attends to that row's cache up to there: a slice of
    the cache, no mask, and a view when the rows are contiguous. All rows (`positions`): every row of the
    cache takes part, row j writes at positions[j] and attends up to it through a mask, so that shapes never
    change (rows of free slots sit at position 0 and their output is thrown away)."""

    cache: SlotCache
    targets: list[torch.Tensor] = field(default_factory=list)
    rows: slice | torch.Tensor | None = None
    position: int = 0
    size: int = 0  # rows of the forward pass this group covers
    # Fixed shapes (compiled): every cache row, row j's new token at positions[j], a mask up to it.
    positions: torch.Tensor | None = None


def _rows(indices: list[int], device: torch.device) -> slice | torch.Tensor:
    """Cache rows as a slice when they are contiguous (views, no copies), else as an index tensor."""
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, dtype=torch.long, device=device)


@dataclass(eq=False)
class _Gallery:
    request: ImagineRequest
    report: Reporter | None
    finish: Finish
    slots: list[int]  # image slots, one per image: cache rows 2 slot (conditional) and 2 slot + 1
    order: int  # admission order: on out-of-memory the newest request gives way
    prompt_length: int = 0
    done: int = 0  # image tokens drawn per image
    dropped: bool = False
    last_preview: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Answer:
    request: AskRequest
    report: Reporter | None
    finish: Finish
    slot: int
    order: int
    prompt_length: int = 0
    tokens: list[int] = field(default_factory=list)
    dropped: bool = False
    last_report: float = 0.0


@dataclass(eq=False)
class _Upscale:
    """One image to upscale: it takes no slot and runs between two steps."""

    request: UpscaleRequest
    report: Reporter | None
    finish: Finish
    dropped: bool = False


_Entry = _Gallery | _Answer | _Upscale


class StepScheduler:
    """A fixed pool of image slots and answer slots on one engine, stepped until no work is left."""

    def __init__(
        self,
        engine: JanusEngine,
        *,
        image_slots: int,
        answer_slots: int,
        finish_gallery: Callable[[list[Drawing]], list[Drawing]] = lambda drawings: drawings,
        upscale: Callable[[UpscaleRequest, Reporter | None], Any] | None = None,
        static_shapes: bool = False,
        compile: bool = False,
    ) -> None:
        """With `static_shapes` (implied by `compile`), every step runs all slots whether running or not, so
        that its shapes stay fixed for torch.compile and CUDA graphs (on a GPU the extra rows cost little; on
        a CPU they cost their full share, which is why it is off by default); the caches then start long
        enough for most requests, and grow (compiling anew) only for longer ones. `upscale` runs an
        UpscaleRequest (without it, the scheduler takes none)."""
        if engine.text_config.model_type != "llama":
            raise ValueError(
                f"the step scheduler runs Llama language models, not {engine.text_config.model_type}"
            )
        self.engine, self.finish_gallery, self.upscale = engine, finish_gallery, upscale
        self.image_slots, self.answer_slots = image_slots, answer_slots
        lm = engine.model.model.language_model
        self.lm = lm
        attention = lm.layers[0].self_attn
        self.head_dim: int = attention.head_dim
        self.heads: int = engine.text_config.num_attention_heads
        self.kv_heads: int = engine.text_config.num_key_value_heads
        layers, device, dtype = len(lm.layers), engine.device, engine.dtype
        self.static_shapes, self.compiled = static_shapes or compile, compile
        cache_shape = (self.kv_heads, self.head_dim, device, dtype)
        self.image_cache = SlotCache(layers, 2 * image_slots, *cache_shape)
        self.answer_cache = SlotCache(layers, answer_slots, *cache_shape, doubling=self.static_shapes)
        n_img = engine.num_image_tokens
        # Per image slot: what sampling needs, on the device, so a step samples all rows without the host.
        self.image_tokens = torch.zeros((image_slots, n_img), dtype=torch.long, device=device)
        self.image_uniforms = torch.zeros((image_slots, n_img), device=device)
        self.image_kept = torch.full((image_slots, n_img), -1, dtype=torch.long, device=device)
        self.image_guidance = torch.zeros(image_slots, device=device)
        self.image_temperature = torch.zeros(image_slots, device=device)
        # Per answer slot: the same for questions (uniforms grow with the longest answer admitted).
        self.answer_uniforms = torch.zeros((answer_slots, 1), device=device)
        self.answer_temperature = torch.zeros(answer_slots, device=device)
        self.answer_top_p = torch.ones(answer_slots, device=device)
        self.answer_last = torch.zeros(answer_slots, dtype=torch.long, device=device)
        eos = engine.model.generation_config.eos_token_id
        self.eos: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # Shared with the admitting thread: free slots and the requests admitted but not yet prefilled.
        self._lock = threading.Lock()
        self._free_images = list(range(image_slots))
        self._free_answers = list(range(answer_slots))
        self._inbox: list[_Entry] = []
        self._orders = itertools.count()
        self.galleries: list[_Gallery] = []
        self.answers: list[_Answer] = []
        self.steps = 0  # forward passes run (prefills not counted), for tests and benchmarks
        self._all_slots_step = self._step_all_slots_tensors
        if self.static_shapes:
            self.image_cache.ensure(n_img + STATIC_PROMPT_LENGTH)
            self.answer_cache.ensure(STATIC_ANSWER_LENGTH)
            self.answer_uniforms = torch.zeros((answer_slots, STATIC_ANSWER_LENGTH), device=device)
        if compile:
            self._mark_static(
                *self._state_tensors(), *self.image_cache.tensors(), *self.answer_cache.tensors()
            )
            self._all_slots_step = torch.compile(
                self._step_all_slots_tensors,
                mode="reduce-overhead" if device.type == "cuda" else "default",
                dynamic=False,
            )

    def _mark_static(self, *tensors: torch.Tensor) -> None:
        """Tensors every compiled step updates in place: CUDA graphs may keep their addresses."""
        if self.compiled and self.engine.device.type == "cuda":
            for tensor in tensors:
                torch._dynamo.mark_static_address(tensor)

    def _ensure(self, cache: SlotCache, length: int) -> None:
        if cache.ensure(length) and self.compiled:
            self._mark_static(*cache.tensors())
            log.warning(
                "The step's KV cache grew to %d positions for a longer request: compiling anew", length
            )

    def _state_tensors(self) -> list[torch.Tensor]:
        return [
            self.image_tokens,
            self.image_uniforms,
            self.image_kept,
            self.image_guidance,
            self.image_temperature,
            self.answer_uniforms,
            self.answer_temperature,
            self.answer_top_p,
            self.answer_last,
        ]

    # ---- any thread ---------------------------------------------------------------------------------

    def admit(self, request: Any, report: Reporter | None, finish: Finish) -> bool:
        """Reserve slots for a request and queue it for prefill; False (nothing reserved) while the slots
        it needs are taken, or for an upscale while another one waits for its turn (so that later ones keep
        their place in the executor's queue). A request that could never fit is refused with a JobFailed."""
        with self._lock:
            if isinstance(request, ImagineRequest):
                if request.count > self.image_slots:
                    n = self.image_slots
                    raise JobFailed(
                        f"This bot draws at most {n} images at once; please ask for {n} or fewer."
                    )
                if request.count > len(self._free_images):
                    return False
                slots = _take_slots(self._free_images, request.count)
                self._inbox.append(_Gallery(request, report, finish, slots, next(self._orders)))
            elif isinstance(request, AskRequest):
                if not self._free_answers:
                    return False
                slot = self._free_answers.pop(0)
                self._inbox.append(_Answer(request, report, finish, slot, next(self._orders)))
            elif isinstance(request, UpscaleRequest) and self.upscale is not None:
                if any(isinstance(entry, _Upscale) for entry in self._inbox):
                    return False
                self._inbox.append(_Upscale(request, report, finish))
            else:
                raise TypeError(f"the step scheduler takes no {type(request).__name__} here")
            return True

    def pending(self) -> bool:
        """Whether any admitted request is not finished yet."""
        with self._lock:
            return bool(self._inbox or self.galleries or self.answers)

    # ---- the GPU thread -----------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self) -> None:
        """Prefill what was admitted, step every running row, deliver what is done; until nothing is left."""
        while True:
            with self._lock:
                arrived, self._inbox = self._inbox, []
                if not arrived and not self.galleries and not self.answers:
                    return
            for index, entry in enumerate(arrived):
                try:
                    self._start(entry)
                except BaseException as error:  # not one of the failures _start hands to its request
                    for never_started in arrived[index:]:
                        self._drop(never_started, error)
                    raise
            if self.galleries or self.answers:
                self._step_or_give_way()

    def _start(self, entry: _Entry) -> None:
        """Prefill one request into its slots (or run an upscale); a failure reaches that request alone."""
        try:
            if isinstance(entry, _Upscale):
                assert self.upscale is not None  # admitted only with it
                self._drop(entry, self.upscale(entry.request, entry.report))
            elif isinstance(entry, _Gallery):
                self._prefill_gallery(entry)
                self.galleries.append(entry)
                self._after_image_token(entry)
            else:
                self._prefill_answer(entry)
                self.answers.append(entry)
                self._after_answer_token(entry, int(self.answer_last[entry.slot]))
        except torch.OutOfMemoryError:
            free_gpu_memory()
            self._drop(entry, JobFailed(self._out_of_memory(entry)))
        except Exception as error:  # noqa: BLE001 - this request's own failure (a cancel, bad input, a bug)
            if not isinstance(error, JobCancelled | JobFailed):  # those say what the member is told
                log.exception("Starting a %s request failed", type(entry.request).__name__)
            self._drop(entry, error)

    def _step_or_give_way(self) -> None:
        try:
            self._step()
        except torch.OutOfMemoryError:
            free_gpu_memory()
            newest = max((*self.galleries, *self.answers), key=lambda entry: entry.order)
            log.warning("Out of GPU memory stepping %d rows; stopping the newest request", self._row_count())
            self._drop(newest, JobFailed(self._out_of_memory(newest)))
        except Exception as error:  # noqa: BLE001 - a failed shared step fails everyone in it, who is told
            log.exception("A step of %d rows failed", self._row_count())
            for entry in (*self.galleries, *self.answers):
                self._drop(entry, error)

    def _row_count(self) -> int:
        return 2 * sum(len(g.slots) for g in self.galleries) + len(self.answers)

    @staticmethod
    def _out_of_memory(entry: _Entry) -> str:
        if isinstance(entry, _Upscale):
            return OUT_OF_MEMORY_UPSCALING
        return OUT_OF_MEMORY if isinstance(entry, _Gallery) else OUT_OF_MEMORY_ASKING

    def _drop(self, entry: _Entry, outcome: Any) -> None:
        """Take a request out of the loop, free its slots and hand over its result or error (once)."""
        if entry.dropped:
            return
        entry.dropped = True
        if isinstance(entry, _Gallery):
            if entry in self.galleries:
                self.galleries.remove(entry)
            with self._lock:
                self._free_images = sorted(self._free_images + entry.slots)
        elif isinstance(entry, _Answer):
            if entry in self.answers:
                self.answers.remove(entry)
            with self._lock:
                self._free_answers = sorted([*self._free_answers, entry.slot])
        try:
            entry.finish(outcome)
        except Exception:  # noqa: BLE001 - the receiving side is gone (shutdown); the loop goes on
            log.exception("Could not hand over a finished request")

    # ---- the forward pass ---------------------------------------------------------------------------

    def _forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, groups: Sequence[_Attend]
    ) -> torch.Tensor:
        """Every decoder layer over all rows at once, attention per group against its own cache rows.
        [R, T, D] embeddings, [R, T] positions -> [R, D] final hidden state of each row's last position."""
        hidden = embeds
        rows, length = hidden.shape[:2]
        cos, sin = self.lm.rotary_emb(hidden, positions)
        for index, layer in enumerate(self.lm.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (rows, length, -1, self.head_dim)
            q = attention.q_proj(x).view(shape).transpose(1, 2)  # [R, H, T, hd]
            k = attention.k_proj(x).view(shape).transpose(1, 2)  # [R, KV, T, hd]
            v = attention.v_proj(x).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outputs, start = [], 0
            for group in groups:
                stop = start + group.size
                outputs.append(
                    self._attend(group, index, q[start:stop], k[start:stop], v[start:stop], attention)
                )
                start = stop
            out = torch.cat(outputs).transpose(1, 2).reshape(rows, length, -1)
            hidden = hidden + attention.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.lm.norm(hidden[:, -1])

    def _attend(
        self, group: _Attend, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Any
    ) -> torch.Tensor:
        keys, values = group.cache.keys[layer], group.cache.values[layer]
        if group.positions is not None:  # all rows, fixed shapes
            rows = torch.arange(len(group.positions), device=q.device)
            keys[rows, :, group.positions] = k[:, :, 0]
            values[rows, :, group.positions] = v[:, :, 0]
            span = torch.arange(group.cache.length, device=q.device)
            mask = (span[None, :] <= group.positions[:, None])[:, None, None, :]  # [rows, 1, 1, C]
            return functional.scaled_dot_product_attention(
                q, self._grouped(keys), self._grouped(values), attn_mask=mask, scale=attention.scaling
            )
        if group.rows is None:  # prefill from position 0
            length = k.shape[2]
            for row, targets in enumerate(group.targets):
                keys[targets, :, :length] = k[row]
                values[targets, :, :length] = v[row]
            k_all, v_all, causal = k, v, True
        else:
            keys[group.rows, :, group.position] = k[:, :, 0]
            values[group.rows, :, group.position] = v[:, :, 0]
            k_all = keys[group.rows, :, : group.position + 1]  # [r, KV, position + 1, hd]
            v_all = values[group.rows, :, : group.position + 1]
            causal = False
        k_all, v_all = self._grouped(k_all), self._grouped(v_all)
        return functional.scaled_dot_product_attention(
            q, k_all, v_all, is_causal=causal, scale=attention.scaling
        )

    def _grouped(self, kv: torch.Tensor) -> torch.Tensor:
        """Keys or values repeated for grouped-query attention (as many heads as the queries)."""
        return kv if self.kv_heads == self.heads else kv.repeat_interleave(self.heads // self.kv_heads, dim=1)

    # ---- prefill --------------------------------------------------------------------------------------

    def _prefill_gallery(self, gallery: _Gallery) -> None:
        """The prompt's conditional and unconditional rows once, copied into every image's cache rows; then
        the first token of every image."""
        engine, request = self.engine, gallery.request
        keep = engine.checked_keep(request.keep)
        ids = encode_prompts(
            engine.processor, [engine.prompt_text(request.prompt)], [], generation_mode="image"
        )["input_ids"].to(engine.device)  # [1, L]
        rows = torch.cat([ids, engine.unconditional(ids)])  # [2, L]
        length = rows.shape[1]
        self._ensure(self.image_cache, length + engine.num_image_tokens)
        slots = torch.tensor(gallery.slots, device=engine.device)
        count, n_img = len(gallery.slots), engine.num_image_tokens
        uniforms = torch.rand((count, n_img), generator=torch.Generator().manual_seed(request.seed))
        kept = torch.full((count, n_img), -1, dtype=torch.long)
        kept[:, : len(keep)] = torch.tensor(keep, dtype=torch.long)
        self.image_tokens[slots] = 0  # nothing of the slots' previous galleries in this one's previews
        self.image_uniforms[slots] = uniforms.to(engine.device)
        self.image_kept[slots] = kept.to(engine.device)
        self.image_guidance[slots] = request.guidance
        self.image_temperature[slots] = request.temperature
        gallery.prompt_length = length
        positions = torch.arange(length, device=engine.device).expand(2, length)
        group = _Attend(self.image_cache, targets=[2 * slots, 2 * slots + 1], size=2)
        hidden = self._forward(engine.model.get_input_embeddings()(rows), positions, [group])  # [2, D]
        logits = engine.model.model.generation_head(hidden).float()  # [2, V]
        cond, uncond = logits[:1].expand(count, -1), logits[1:].expand(count, -1)
        self.image_tokens[slots, 0] = self._sample_images(slots, cond, uncond, step=0)
        gallery.done = 1

    def _prefill_answer(self, answer: _Answer) -> None:
        engine, request = self.engine, answer.request
        inputs = engine.ask_inputs([request])
        length = inputs["input_ids"].shape[1]
        self._ensure(self.answer_cache, length + request.max_new_tokens)
        if request.max_new_tokens > self.answer_uniforms.shape[1]:
            grown = torch.zeros((self.answer_slots, request.max_new_tokens), device=engine.device)
            grown[:, : self.answer_uniforms.shape[1]] = self.answer_uniforms
            self.answer_uniforms = grown
            self._mark_static(grown)
        slot = answer.slot
        self.answer_uniforms[slot, : request.max_new_tokens] = answer_uniforms(request).to(engine.device)
        self.answer_temperature[slot] = request.temperature
        self.answer_top_p[slot] = request.top_p
        answer.prompt_length = length
        slots = torch.tensor([slot], device=engine.device)
        positions = torch.arange(length, device=engine.device)[None]
        hidden = self._forward(
            engine.question_embeddings(inputs),
            positions,
            [_Attend(self.answer_cache, targets=[slots], size=1)],
        )
        self.answer_last[slots] = self._sample_answers(slots, engine.model.lm_head(hidden), [0])

    # ---- sampling --------------------------------------------------------------------------------------

    def _sample_images(
        self, slots: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, step: int | torch.Tensor
    ) -> torch.Tensor:
        steps = torch.as_tensor(step, device=slots.device).expand(len(slots))[:, None]
        return sample_image_rows(
            cond,
            uncond,
            self.image_guidance[slots],
            self.image_temperature[slots],
            self.image_uniforms[slots].gather(1, steps).squeeze(1),
            self.image_kept[slots].gather(1, steps).squeeze(1),
        )

    def _sample_answers(self, slots: torch.Tensor, logits: torch.Tensor, steps: list[int]) -> torch.Tensor:
        step = torch.tensor(steps, device=slots.device)[:, None]
        return sample_text_rows(
            logits,
            self.answer_temperature[slots],
            self.answer_top_p[slots],
            self.answer_uniforms[slots].gather(1, step).squeeze(1),
        )

    # ---- one step ------------------------------------------------------------------------------------

    def _step(self) -> None:
        """One token for every running row, in one forward pass."""
        galleries, answers = list(self.galleries), list(self.answers)
        if self.static_shapes:
            words = self._step_all_slots(galleries, answers)
        else:
            words = self._step_running_rows(galleries, answers)
        self.steps += 1
        for gallery in galleries:
            gallery.done += 1
            self._after_image_token(gallery)
        for answer, word in zip(answers, words, strict=True):
            self._after_answer_token(answer, word)

    def _step_running_rows(self, galleries: list[_Gallery], answers: list[_Answer]) -> list[int]:
        """The step over the running rows only; each answer's new word."""
        engine, device = self.engine, self.engine.device
        image_slot_list = [slot for g in galleries for slot in g.slots]
        image_steps = [g.done for g in galleries for _slot in g.slots]
        image_slots = torch.tensor(image_slot_list, dtype=torch.long, device=device)
        answer_slots = torch.tensor([a.slot for a in answers], dtype=torch.long, device=device)
        embeds, positions, groups = [], [], []
        if galleries:
            steps = torch.tensor(image_steps, device=device)
            last = self.image_tokens[image_slots].gather(1, (steps - 1)[:, None]).squeeze(1)  # [n]
            # Each image's conditional and unconditional rows side by side, as its cache rows are.
            embeds.append(engine.model.prepare_embeddings_for_image_generation(last.repeat_interleave(2)))
            for gallery in galleries:
                position = gallery.prompt_length + gallery.done - 1
                rows = [row for slot in gallery.slots for row in (2 * slot, 2 * slot + 1)]
                groups.append(
                    _Attend(self.image_cache, rows=_rows(rows, device), position=position, size=len(rows))
                )
                positions += [position] * len(rows)
        if answers:
            embeds.append(engine.model.get_input_embeddings()(self.answer_last[answer_slots]))  # [t, D]
            for answer in answers:
                position = answer.prompt_length + len(answer.tokens) - 1
                groups.append(
                    _Attend(
                        self.answer_cache, rows=slice(answer.slot, answer.slot + 1), position=position, size=1
                    )
                )
                positions.append(position)
        hidden = self._forward(
            torch.cat(embeds)[:, None], torch.tensor(positions, device=device)[:, None], groups
        )  # [R, D]
        images = 2 * len(image_slot_list)
        if galleries:
            logits = engine.model.model.generation_head(hidden[:images]).float()
            chosen = self._sample_images(image_slots, logits[0::2], logits[1::2], steps)
            self.image_tokens[image_slots, steps] = chosen
        if answers:
            chosen_words = self._sample_answers(
                answer_slots, engine.model.lm_head(hidden[images:]), [len(a.tokens) for a in answers]
            )
            self.answer_last[answer_slots] = chosen_words
            return chosen_words.tolist()  # the one host synchronisation of a step
        return []

    def _step_all_slots(self, galleries: list[_Gallery], answers: list[_Answer]) -> list[int]:
        """The step over every slot, running or not (fixed shapes); each running answer's new word."""
        device = self.engine.device
        image_active, image_steps, image_positions = (
            [False] * self.image_slots,
            [1] * self.image_slots,
            [0] * self.image_slots,
        )
        for gallery in galleries:
            for slot in gallery.slots:
                image_active[slot], image_steps[slot] = True, gallery.done
                image_positions[slot] = gallery.prompt_length + gallery.done - 1
        answer_active, answer_steps, answer_positions = (
            [False] * self.answer_slots,
            [0] * self.answer_slots,
            [0] * self.answer_slots,
        )
        for answer in answers:
            answer_active[answer.slot], answer_steps[answer.slot] = True, len(answer.tokens)
            answer_positions[answer.slot] = answer.prompt_length + len(answer.tokens) - 1
        words = self._all_slots_step(
            torch.tensor(image_active, device=device),
            torch.tensor(image_steps, device=device),
            torch.tensor(image_positions, device=device),
            torch.tensor(answer_active, device=device),
            torch.tensor(answer_steps, device=device),
            torch.tensor(answer_positions, device=device),
        )
        if not answers:
            return []
        every = words.tolist()  # the one host synchronisation of a step
        return [every[answer.slot] for answer in answers]

    def _step_all_slots_tensors(
        self,
        image_active: torch.Tensor,
        image_steps: torch.Tensor,
        image_positions: torch.Tensor,
        answer_active: torch.Tensor,
        answer_steps: torch.Tensor,
        answer_positions: torch.Tensor,
    ) -> torch.Tensor:
        """Tensors only, fixed shapes (what torch.compile captures): every slot's next token; the running
        ones are stored. [S] image and [A] answer slot state -> [A] the answer slots' words."""
        model, n_img = self.engine.model, self.engine.num_image_tokens
        last = self.image_tokens.gather(1, (image_steps - 1).clamp(min=0)[:, None]).squeeze(1)  # [S]
        embeds = torch.cat(
            [
                model.prepare_embeddings_for_image_generation(last.repeat_interleave(2)),
                model.get_input_embeddings()(self.answer_last),
            ]
        )  # [2S + A, D]
        row_positions = image_positions.repeat_interleave(2)
        groups = [
            _Attend(self.image_cache, positions=row_positions, size=2 * self.image_slots),
            _Attend(self.answer_cache, positions=answer_positions, size=self.answer_slots),
        ]
        hidden = self._forward(embeds[:, None], torch.cat([row_positions, answer_positions])[:, None], groups)
        images = 2 * self.image_slots
        logits = model.model.generation_head(hidden[:images]).float()
        step = image_steps.clamp(max=n_img - 1)[:, None]  # [S, 1]
        chosen = sample_image_rows(
            logits[0::2],
            logits[1::2],
            self.image_guidance,
            self.image_temperature,
            self.image_uniforms.gather(1, step).squeeze(1),
            self.image_kept.gather(1, step).squeeze(1),
        )
        kept = self.image_tokens.gather(1, step).squeeze(1)
        self.image_tokens.scatter_(1, step, torch.where(image_active, chosen, kept)[:, None])
        word_step = answer_steps.clamp(max=self.answer_uniforms.shape[1] - 1)[:, None]
        words = sample_text_rows(
            model.lm_head(hidden[images:]),
            self.answer_temperature,
            self.answer_top_p,
            self.answer_uniforms.gather(1, word_step).squeeze(1),
        )
        self.answer_last.copy_(torch.where(answer_active, words, self.answer_last))
        return words

    def _after_image_token(self, gallery: _Gallery) -> None:
        """Report progress (and a preview when due); deliver the gallery once its last token is drawn."""
        engine, n_img = self.engine, self.engine.num_image_tokens
        try:
            if gallery.done >= n_img:
                tokens = self.image_tokens[torch.tensor(gallery.slots, device=engine.device)]
                if gallery.report:
                    gallery.report(Progress(n_img, n_img))
                drawings = [
                    Drawing(image, tuple(row))
                    for image, row in zip(engine.decode(tokens), tokens.tolist(), strict=True)
                ]
                self._drop(gallery, self.finish_gallery(drawings))
                return
            if gallery.report is None:
                return
            previews = None
            if engine.preview_due(gallery.done, gallery.last_preview):
                gallery.last_preview = time.perf_counter()
                previews = engine.preview(
                    self.image_tokens[torch.tensor(gallery.slots, device=engine.device)], gallery.done
                )
            gallery.report(Progress(gallery.done, n_img, previews))
        except torch.OutOfMemoryError:
            free_gpu_memory()
            self._drop(gallery, JobFailed(OUT_OF_MEMORY))
        except Exception as error:  # noqa: BLE001 - a cancel, or a failure of this gallery's decode/upscale
            if not isinstance(error, JobCancelled | JobFailed):
                log.exception("Finishing a gallery failed")
            self._drop(gallery, error)

    def _after_answer_token(self, answer: _Answer, word: int) -> None:
        """Stream the answer so far (the first word at once); deliver it at its end of text or length."""
        answer.tokens.append(word)
        finished = word in self.eos or len(answer.tokens) >= answer.request.max_new_tokens
        try:
            now = time.perf_counter()
            if answer.report and (finished or now - answer.last_report >= REPORT_SECONDS):
                answer.last_report = now
                answer.report(
                    Progress(
                        len(answer.tokens),
                        answer.request.max_new_tokens,
                        self.engine.decode_answer(answer.tokens),
                    )
                )
            if finished:
                self._drop(answer, self.engine.decode_answer(answer.tokens))
        except Exception as error:  # noqa: BLE001 - a cancel (or a failing reporter) stops this answer alone
            if not isinstance(error, JobCancelled):
                log.exception("Streaming an answer failed")
            self._drop(answer, error)


def _take_slots(free: list[int], count: int) -> list[int]:
    """`count` of the free slots (kept sorted), a contiguous run where there is one; removed from `free`."""
    for start in range(len(free) - count + 1):
        if free[start + count - 1] - free[start] == count - 1:
            taken = free[start : start + count]
            break
    else:
        taken = free[:count]
    for slot in taken:
        free.remove(slot)
    return taken
