"""Real-ESRGAN upscaling through spandrel: load and check the weights, then upscale PIL images in batches,
tiling with overlap above a tile size so memory stays bounded. Nothing here knows about Discord."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from spandrel import ImageModelDescriptor, ModelLoader

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path("weights/RealESRGAN_x2.pth")
# Where the default file comes from when it is missing: ai-forever's Real-ESRGAN release on the Hugging Face
# hub.
DEFAULT_REPO, DEFAULT_FILENAME = "ai-forever/Real-ESRGAN", "RealESRGAN_x2.pth"


class UpscalerError(Exception):
    """The weights are missing or are not a 2x/4x image upscaler; the text says what to do."""


def fetch_default_weights(path: Path) -> Path:
    """Download the default x2 weights to `path` (as the model itself is fetched on first start)."""
    from huggingface_hub import hf_hub_download

    try:
        downloaded = hf_hub_download(DEFAULT_REPO, DEFAULT_FILENAME, local_dir=path.parent)
    except Exception as error:  # noqa: BLE001 - offline, proxy, 404...: all end in the same advice
        raise UpscalerError(
            f"UPSCALER_WEIGHTS: {path} is missing and could not be downloaded ({type(error).__name__}). "
            f"Download {DEFAULT_FILENAME} from https://huggingface.co/{DEFAULT_REPO} into {path.parent}/, "
            "or set UPSCALER_WEIGHTS=none to turn upscaling off."
        ) from None
    log.info("Downloaded %s to %s", DEFAULT_FILENAME, downloaded)
    return Path(downloaded)


class Upscaler:
    """A loaded Real-ESRGAN model (scale 2 or 4) on one device."""

    def __init__(self, model: ImageModelDescriptor, *, tile: int = 512, overlap: int = 16) -> None:
        self.model, self.tile, self.overlap = model, tile, overlap
        self.scale: int = model.scale

    @classmethod
    def load(
        cls, path: str | Path, *, device: torch.device | str = "cpu", half: bool = False, tile: int = 512
    ) -> Upscaler:
        """Load weights with spandrel and check they describe a 2x or 4x image upscaler."""
        path = Path(path)
        if not path.is_file():
            if path == DEFAULT_WEIGHTS:
                fetch_default_weights(path)
            else:
                raise UpscalerError(
                    f"UPSCALER_WEIGHTS: {path} does not exist; see weights/README.md, "
                    "or set UPSCALER_WEIGHTS=none to turn upscaling off."
                )
        started = time.perf_counter()
        try:
            model = ModelLoader(device=torch.device(device)).load_from_file(path)
        except Exception as error:  # noqa: BLE001 - spandrel raises many kinds for files it cannot read
            raise UpscalerError(
                f"UPSCALER_WEIGHTS: {path} is not a model spandrel can load "
                f"({error or type(error).__name__}); use a Real-ESRGAN x2 or x4 file"
            ) from None
        if not isinstance(model, ImageModelDescriptor) or model.scale not in (2, 4):
            kind = getattr(model, "architecture", None)
            raise UpscalerError(
                f"UPSCALER_WEIGHTS: {path} is not a 2x/4x image upscaler (got {getattr(kind, 'name', kind)}, "
                f"scale {getattr(model, 'scale', '?')}); use a Real-ESRGAN x2 or x4 file"
            )
        model.eval()
        if half and model.supports_half:
            model.half()
        log.info(
            "Loaded upscaler %s (%s x%d) in %.2fs",
            path,
            model.architecture.name,
            model.scale,
            time.perf_counter() - started,
        )
        return cls(model, tile=tile)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def upscale(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Upscale RGB images; images of the same size go through the model together."""
        results: dict[int, Image.Image] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.size, []).append(index)
        for indices in by_size.values():
            batch = torch.stack([to_tensor(images[i]) for i in indices]).to(
                self.device, self.dtype
            )  # [N,3,H,W]
            output = self.upscale_tensor(batch)  # [N, 3, sH, sW]
            for i, tensor in zip(indices, output, strict=True):
                results[i] = to_image(tensor)
        return [results[i] for i in range(len(images))]

    def enlarge(self, image: Image.Image, factor: int = 2) -> Image.Image:
        """`image` at `factor` times its side: the model run again on it (tiled above the tile size)
        until it is
        at least that large, then resized down to exactly that size when the model's scale overshoots."""
        target = (image.width * factor, image.height * factor)
        while image.width < target[0] or image.height < target[1]:
            image = self.upscale([image])[0]
        return image if image.size == target else image.resize(target, Image.Resampling.LANCZOS)

    def upscale_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, 3, sH, sW] in [0, 1]; tiled when a side exceeds the tile size."""
        _, _, height, width = x.shape
        if max(height, width) <= self.tile:
            return self.model(x)
        # Tile edges inside the image sit on the model's size grid (x2 models pixel-unshuffle by 2 and
        # spandrel
        # pads to a multiple of 4), so each tile sees the pixels in the same phase as the whole image would.
        s, grid = self.scale, self.model.size_requirements.multiple_of
        overlap = -(-self.overlap // grid) * grid  # rounded up to the grid
        step = max((self.tile - 2 * overlap) // grid * grid, grid)  # rounded down to the grid
        out = torch.zeros((x.shape[0], 3, height * s, width * s), dtype=x.dtype, device=x.device)
        for top in range(0, height, step):
            for left in range(0, width, step):
                # Each tile carries `overlap` pixels of context on every side; only its core is kept.
                y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
                y1, x1 = min(top + step + overlap, height), min(left + step + overlap, width)
                tile = self.model(x[:, :, y0:y1, x0:x1])  # [N, 3, s(y1-y0), s(x1-x0)]
                core_h, core_w = min(step, height - top), min(step, width - left)
                oy, ox = (top - y0) * s, (left - x0) * s
                out[:, :, top * s : (top + core_h) * s, left * s : (left + core_w) * s] = tile[
                    :, :, oy : oy + core_h * s, ox : ox + core_w * s
                ]
        return out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def to_image(tensor: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB PIL image."""
    array = (tensor.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
