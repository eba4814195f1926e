"""The model work the bot offers, as the GPU thread runs it: Janus, then the optional upscaler."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from bot.engine import AskRequest, Drawing, ImagineRequest, JanusEngine, free_gpu_memory, resolve_device
from bot.errors import (
    OUT_OF_MEMORY,
    OUT_OF_MEMORY_ASKING,
    OUT_OF_MEMORY_UPSCALING,
    JobCancelled,
    JobFailed,
    StartupError,
)
from bot.jobs import Progress, Reporter
from bot.requests import UpscaleRequest
from bot.scheduler import StepScheduler
from bot.settings import Settings
from bot.upscaler import Upscaler, UpscalerError

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")


class Studio:
    """Janus plus the upscaler, loaded on one device; every method runs on the GPU thread."""

    def __init__(
        self, engine: JanusEngine, upscaler: Upscaler | None, *, compile_steps: bool = False
    ) -> None:
        self.engine, self.upscaler = engine, upscaler
        self.compile_steps = compile_steps  # the step scheduler's step compiled (COMPILE with SCHEDULER=step)
        self._scheduler: StepScheduler | None = None

    def scheduler(self, image_slots: int, answer_slots: int) -> StepScheduler:
        """The step scheduler over this studio's model (SCHEDULER=step), made on first use; its galleries are
        upscaled as each one is done, and single-image upscales run between its steps."""
        if self._scheduler is None:
            self._scheduler = StepScheduler(
                self.engine,
                image_slots=image_slots,
                answer_slots=answer_slots,
                finish_gallery=lambda drawings: self._upscaled([drawings])[0],
                upscale=self.upscale,
                compile=self.compile_steps,
            )
        return self._scheduler

    @classmethod
    def load(cls, settings: Settings, *, preview_seconds: float | None = None) -> Studio:
        """Load the upscaler, then Janus, turning every way this can fail into one StartupError line.

        The small upscaler goes first, so a bad UPSCALER_WEIGHTS is reported before minutes of model
        loading."""
        try:
            device = resolve_device(settings.janus_device)
        except RuntimeError as error:  # JANUS_DEVICE=cuda without a GPU: name that setting, not JANUS_MODEL
            raise StartupError(str(error)) from None
        if _is_missing_directory(settings.janus_model):
            raise StartupError(
                f"JANUS_MODEL: {settings.janus_model} does not exist; set JANUS_MODEL to a "
                "downloaded model directory or a hub id such as deepseek-community/Janus-Pro-7B"
            )
        upscaler = None
        if settings.upscaling_enabled:
            try:
                upscaler = Upscaler.load(
                    settings.upscaler_weights,
                    device=device,
                    half=device.type == "cuda",
                    tile=settings.upscaler_tile,
                )
            except UpscalerError as error:
                raise StartupError(str(error)) from None
        compile = settings.compile and settings.scheduler == "batch"
        try:
            engine = JanusEngine.load(
                settings.janus_model,
                device=settings.janus_device,
                dtype=settings.janus_dtype,
                preview_seconds=preview_seconds,
                compile=compile,
            )
        except Exception as error:  # noqa: BLE001 - hub errors, missing files, bad configs, CUDA...
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise StartupError(
                f"JANUS_MODEL: could not load {settings.janus_model!r}: {first_line}"
            ) from error
        studio = cls(engine, upscaler, compile_steps=settings.compile and settings.scheduler == "step")
        if compile:
            studio.warm_up(settings.max_batch_images)
        elif studio.compile_steps:
            studio.warm_up_steps(settings.max_batch_images, settings.answer_slots)
        return studio

    def warm_up(self, max_images: int) -> None:
        """Compile the decode step for every batch size a request can meet, so no member waits for it."""
        started, count = time.perf_counter(), 1
        while True:
            self._imagine_and_upscale([ImagineRequest("warm-up", count=count)], [])
            if count >= max_images:
                break
            count = min(count * 2, max_images)
        log.info("Warmed up batches of 1-%d images in %.1fs", max_images, time.perf_counter() - started)

    def warm_up_steps(self, image_slots: int, answer_slots: int) -> None:
        """Compile the step scheduler's fixed-shape step (a gallery and a question) before members come."""
        started = time.perf_counter()
        scheduler = self.scheduler(image_slots, answer_slots)
        outcomes: list[object] = []
        scheduler.admit(ImagineRequest("warm-up", count=1), None, outcomes.append)
        scheduler.admit(AskRequest("warm-up", max_new_tokens=4), None, outcomes.append)
        scheduler.run()
        if failed := [outcome for outcome in outcomes if isinstance(outcome, BaseException)]:
            raise failed[0]
        log.info(
            "Compiled the step of %d image and %d answer slots in %.1fs",
            image_slots,
            answer_slots,
            time.perf_counter() - started,
        )

    def describe(self) -> dict[str, object]:
        """Device, dtype and GPU memory in use, for /status and metrics."""
        device = self.engine.device
        memory = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        return {
            "device": str(device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "gpu_memory_bytes": memory,
        }

    @property
    def output_size(self) -> int:
        """Side in pixels of a finished image."""
        return self.engine.image_size * (self.upscaler.scale if self.upscaler else 1)

    def ask(self, request: AskRequest, report: Reporter | None = None) -> str:
        result = self.ask_batch([request], [report] if report else [])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def ask_batch(
        self, requests: Sequence[AskRequest], reports: Sequence[Reporter]
    ) -> list[str | BaseException]:
        """Answer several questions together (see `_in_batch_or_alone` for failures)."""
        return self._in_batch_or_alone(self.engine.ask_batch, requests, reports, OUT_OF_MEMORY_ASKING)

    def imagine_batch(
        self, requests: Sequence[ImagineRequest], reports: Sequence[Reporter]
    ) -> list[list[Drawing] | BaseException]:
        """Draw and upscale several requests together (see `_in_batch_or_alone` for failures)."""
        return self._in_batch_or_alone(self._imagine_and_upscale, requests, reports, OUT_OF_MEMORY)

    def upscale(self, request: UpscaleRequest, report: Reporter | None = None) -> Image.Image:
        """One gallery image at twice the gallery's side: decoded from its tokens, upscaled as the
        gallery was,
        then upscaled again (tiled as needed)."""
        if self.upscaler is None:
            raise JobFailed("Upscaling is turned off on this bot.")
        if len(request.tokens) != self.engine.num_image_tokens:
            raise JobFailed("That image was drawn by another model; I can't upscale it.")
        if report:
            report(Progress(0, 3))  # a request cancelled while it waited stops here, before any GPU work
        try:
            image = self.engine.decode(torch.tensor([request.tokens], device=self.engine.device))[0]
            if report:
                report(Progress(1, 3))
            shown = self.upscaler.upscale([image])[0]  # as in the gallery
            if report:
                report(Progress(2, 3))
            return self.upscaler.enlarge(shown, 2)
        except torch.OutOfMemoryError:
            free_gpu_memory()
            raise JobFailed(OUT_OF_MEMORY_UPSCALING) from None

    def _in_batch_or_alone(
        self,
        run: Callable[[Sequence[R], Sequence[Reporter]], list[T]],
        requests: Sequence[R],
        reports: Sequence[Reporter],
        out_of_memory: str,
    ) -> list[T | BaseException]:
        """Run requests as one batch. On GPU out-of-memory, retry each request alone once; a request
        that still
        does not fit gets a clear error while the others are delivered. Any other failure of a batch
        is retried
        the same way, so it reaches only the requests that cause it."""
        try:
            return list(run(requests, reports))
        except torch.OutOfMemoryError:
            free_gpu_memory()
            log.warning("Out of GPU memory on a batch of %d requests; retrying one by one", len(requests))
        except JobCancelled:
            raise  # every request of the batch was withdrawn
        except Exception as error:
            if len(requests) == 1:
                raise
            log.warning("A batch of %d requests failed (%r); retrying one by one", len(requests), error)
        results: list[T | BaseException] = []
        for index, request in enumerate(requests):
            try:
                results.extend(run([request], reports[index : index + 1]))
            except torch.OutOfMemoryError:
                free_gpu_memory()
                results.append(JobFailed(out_of_memory))
            except JobCancelled:
                raise
            except Exception as error:  # noqa: BLE001 - this request's own failure, for its requester alone
                results.append(error)
        return results

    def _imagine_and_upscale(
        self, requests: Sequence[ImagineRequest], reports: Sequence[Reporter]
    ) -> list[list[Drawing]]:
        return self._upscaled(self.engine.imagine_batch(requests, reports))

    def _upscaled(self, galleries: list[list[Drawing]]) -> list[list[Drawing]]:
        if self.upscaler is None:
            return galleries
        flat = iter(self.upscaler.upscale([drawing.image for gallery in galleries for drawing in gallery]))
        return [
            [dataclasses.replace(drawing, image=next(flat)) for drawing in gallery] for gallery in galleries
        ]


def _is_missing_directory(name: str) -> bool:
    """True for a JANUS_MODEL that is clearly a path (not a hub id such as org/name) and does not exist."""
    looks_like_path = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name
    return looks_like_path and not Path(name).expanduser().exists()
