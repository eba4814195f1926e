"""The model work the bot offers, as the GPU thread runs it: Janus, then the optional upscaler."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image

from bot.engine import AskRequest, ImagineRequest, JanusEngine
from bot.errors import JobFailed
from bot.executor import Reporter
from bot.settings import Settings
from bot.upscaler import Upscaler, UpscalerError

log = logging.getLogger(__name__)

OUT_OF_MEMORY = "The GPU ran out of memory for this request. Please try again with fewer images."


class StartupError(Exception):
    """The model or the upscaler cannot be loaded; one line says which setting to fix and how."""


class Studio:
    """Janus plus the upscaler, loaded on one device; every method runs on the GPU thread."""

    def __init__(self, engine: JanusEngine, upscaler: Upscaler | None) -> None:
        self.engine, self.upscaler = engine, upscaler

    @classmethod
    def load(cls, settings: Settings, *, preview_seconds: float | None = None) -> Studio:
        """Load Janus and the upscaler, turning every way this can fail into one StartupError line."""
        try:
            engine = JanusEngine.load(settings.janus_model, device=settings.janus_device,
                                      dtype=settings.janus_dtype, preview_seconds=preview_seconds)
        except Exception as error:  # noqa: BLE001 - hub errors, missing files, bad configs, CUDA...
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise StartupError(f"JANUS_MODEL: could not load {settings.janus_model!r}: {first_line}") from error
        upscaler = None
        if settings.upscaling_enabled:
            try:
                upscaler = Upscaler.load(settings.upscaler_weights, device=engine.device,
                                         half=engine.device.type == "cuda", tile=settings.upscaler_tile)
            except UpscalerError as error:
                raise StartupError(str(error)) from None
        return cls(engine, upscaler)

    @property
    def output_size(self) -> int:
        """Side in pixels of a finished image."""
        return self.engine.image_size * (self.upscaler.scale if self.upscaler else 1)

    def ask(self, request: AskRequest, report: Reporter | None = None) -> str:
        try:
            return self.engine.ask(request, report)
        except torch.OutOfMemoryError:
            free_gpu_memory()
            raise JobFailed(OUT_OF_MEMORY) from None

    def imagine_batch(self, requests: Sequence[ImagineRequest],
                      reports: Sequence[Reporter]) -> list[list[Image.Image] | BaseException]:
        """Draw and upscale several requests together. On GPU out-of-memory, retry each request alone once;
        a request that still does not fit gets a clear error while the others are delivered."""
        try:
            return list(self._imagine_and_upscale(requests, reports))
        except torch.OutOfMemoryError:
            free_gpu_memory()
            log.warning("Out of GPU memory on a batch of %d requests; retrying one by one", len(requests))
        results: list[list[Image.Image] | BaseException] = []
        for request, report in zip(requests, reports, strict=True):
            try:
                results.extend(self._imagine_and_upscale([request], [report]))
            except torch.OutOfMemoryError:
                free_gpu_memory()
                results.append(JobFailed(OUT_OF_MEMORY))
        return results

    def _imagine_and_upscale(self, requests: Sequence[ImagineRequest],
                             reports: Sequence[Reporter]) -> list[list[Image.Image]]:
        galleries = self.engine.imagine_batch(requests, reports)
        if self.upscaler is None:
            return galleries
        flat = self.upscaler.upscale([image for gallery in galleries for image in gallery])
        out, start = [], 0
        for gallery in galleries:
            out.append(flat[start:start + len(gallery)])
            start += len(gallery)
        return out


def free_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
