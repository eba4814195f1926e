"""The offline commands: the same executor and model code the bot uses, with a terminal instead of Discord."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from bot.engine import AskRequest, ImagineRequest
from bot.errors import BadAttachment, StartupError
from bot.executor import GpuExecutor, Job
from bot.images import decode_image
from bot.settings import Settings
from bot.studio import Studio


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def open_image(path: Path) -> Image.Image:
    """The same checked decoding the bot applies to attachments (pixel cap, every mode to RGB)."""
    try:
        return decode_image(path.read_bytes())
    except FileNotFoundError:
        raise StartupError(f"{path}: no such file") from None
    except (BadAttachment, OSError) as error:
        raise StartupError(f"{path}: not a readable image ({error})") from None


async def ask(settings: Settings, images: list[Path], question: str, *, seed: int, temperature: float) -> str:
    """Answer a question about local image files."""
    pictures = tuple(open_image(path) for path in images)
    settings = settings.model_copy(update={"upscaler_weights": "none"})  # answering needs no upscaler
    async with GpuExecutor(settings.queue_size) as executor:
        studio = await executor.call(Studio.load, settings)
        request = AskRequest(question, pictures, temperature=temperature, seed=seed)
        return await executor.submit(lambda report: studio.ask(request, report), kind="ask")


async def imagine(
    settings: Settings, prompt: str, out: Path, *, count: int, seed: int, guidance: float, temperature: float
) -> list[Path]:
    """Draw `count` images, upscale them, and save them as PNG files in `out`; returns their paths."""
    async with GpuExecutor(settings.queue_size, max_batch=settings.max_batch_images) as executor:
        studio = await executor.call(Studio.load, settings)
        request = ImagineRequest(prompt, count=count, guidance=guidance, temperature=temperature, seed=seed)
        job = executor.submit_batched(studio.imagine_batch, request, weight=count, kind="imagine")
        await show_progress(job, total=studio.engine.num_image_tokens, what=f"Drawing {count} image(s)")
        drawings = await job
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, drawing in enumerate(drawings):
        path = out / f"{slug(prompt)}-{seed}-{index}.png"
        await asyncio.to_thread(drawing.image.save, path)
        paths.append(path)
    return paths


async def show_progress(job: Job[object], *, total: int, what: str) -> None:
    """A terminal progress bar of image tokens drawn, polled from the job without slowing the GPU."""
    with tqdm(total=total, desc=what, unit="tok", leave=False) as bar:
        while not job.done():
            await asyncio.wait([job.future], timeout=0.1)
            if job.progress is not None:
                bar.update(job.progress.done - bar.n)
