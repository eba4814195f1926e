"""The Real-ESRGAN upscaler: loading and checking weights, batching, tiling, and how Studio wires it in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from settings_for_tests import settings_for_tests
from tiny_models import build_not_an_upscaler

from bot.engine import ImagineRequest
from bot.errors import JobFailed, StartupError
from bot.requests import UpscaleRequest
from bot.studio import Studio
from bot.upscaler import Upscaler, UpscalerError


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def x2(tiny_dir: Path) -> Upscaler:
    return Upscaler.load(tiny_dir / "RealESRGAN_x2.pth")


@pytest.mark.parametrize("scale", [2, 4])
def test_x2_and_x4_files_load_with_their_scale(tiny_dir: Path, scale: int) -> None:
    """Real-ESRGAN x2 and x4 files load through spandrel and upscale by their factor."""
    upscaler = Upscaler.load(tiny_dir / f"RealESRGAN_x{scale}.pth")
    assert upscaler.scale == scale
    [big] = upscaler.upscale([picture(40, 24)])
    assert (big.mode, big.size) == ("RGB", (40 * scale, 24 * scale))


@pytest.mark.parametrize("scale", [2, 4])
def test_output_follows_the_input(tiny_dir: Path, scale: int) -> None:
    """The tiny weights carry an identity path, so the output resembles the input (catches swapped channels,
    a wrong value range or a scrambled layout)."""
    upscaler = Upscaler.load(tiny_dir / f"RealESRGAN_x{scale}.pth")
    ramp = np.linspace(0, 255, 32)
    red, green = np.tile(ramp, (20, 1)), np.tile(ramp[:20, None], (1, 32))  # across, down
    source = np.stack([red, green, np.full((20, 32), 60.0)], -1)  # [20, 32, 3]
    [big] = upscaler.upscale([Image.fromarray(source.astype(np.uint8))])
    shrunk = np.asarray(big.resize((32, 20), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(shrunk - source).mean(axis=(0, 1)).max() < 30  # per channel, out of 255; a swap costs ~85


def test_a_file_that_is_not_an_upscaler_is_a_clear_error(tmp_path: Path) -> None:
    """A .pth that spandrel does not recognise is refused with a line naming UPSCALER_WEIGHTS and the file."""
    path = build_not_an_upscaler(tmp_path / "classifier.pth")
    with pytest.raises(UpscalerError) as error:
        Upscaler.load(path)
    message = str(error.value)
    assert message.startswith("UPSCALER_WEIGHTS:")
    assert str(path) in message
    assert "x2 or x4" in message
    assert "\n" not in message


def test_an_upscaler_of_another_scale_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    """An image model spandrel loads but whose scale is not 2 or 4 (here a 1x ESRGAN) is refused at load."""
    state = torch.load(tiny_dir / "RealESRGAN_x2.pth", weights_only=True)["params_ema"]
    weight = state["conv_first.weight"]  # [16, 12, 3, 3]; 48 input channels = pixel-unshuffle by 4 = scale 1
    state["conv_first.weight"] = torch.cat([weight] * 4, dim=1)
    torch.save({"params_ema": state}, tmp_path / "x1.pth")
    refusal = r"UPSCALER_WEIGHTS: .*x1\.pth is not a 2x/4x image upscaler.*scale 1"
    with pytest.raises(UpscalerError, match=refusal):
        Upscaler.load(tmp_path / "x1.pth")


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A path that does not exist (not the default one) says so and how to turn upscaling off."""
    path = tmp_path / "nowhere" / "RealESRGAN_x4.pth"
    with pytest.raises(UpscalerError) as error:
        Upscaler.load(path)
    message = str(error.value)
    assert message.startswith("UPSCALER_WEIGHTS:")
    assert str(path) in message and "does not exist" in message
    assert "UPSCALER_WEIGHTS=none" in message


def test_mixed_sizes_come_back_in_order_with_their_sizes(x2: Upscaler) -> None:
    """Images of different sizes, interleaved, come back in their order, each upscaled as if alone."""
    sizes = [(32, 32), (40, 24), (32, 32), (24, 40), (40, 24)]
    images = [picture(width, height, seed) for seed, (width, height) in enumerate(sizes)]
    results = x2.upscale(images)
    assert [image.size for image in results] == [(64, 64), (80, 48), (64, 64), (48, 80), (80, 48)]
    for source, result in zip(images, results, strict=True):
        [alone] = x2.upscale([source])
        assert np.abs(np.asarray(alone, dtype=int) - np.asarray(result, dtype=int)).max() <= 1


class RecordingModel:
    """Stands in for the spandrel descriptor, recording the input shape of every call."""

    def __init__(self, model: Any) -> None:
        self.model, self.shapes = model, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.model(x)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@pytest.mark.parametrize(("scale", "tile"), [(2, 64), (2, 67), (2, 66), (4, 67)])
def test_tiled_upscaling_matches_untiled(tiny_dir: Path, scale: int, tile: int) -> None:
    """Above the tile size the image is upscaled in overlapping tiles no larger than the tile, and the result
    matches upscaling it whole.

    The tiny network sees about 37 input pixels around each output pixel, more than the 16 px overlap, so
    tiling is not exact in principle; but what lies beyond 16 px contributes less than 1e-6 here, so after
    rounding to 8 bits no pixel may be off by more than 1. Misaligned tiles (odd tile sizes shift the x2
    model's 2 x 2 pixel-unshuffle grid; padding inside the image) show up as errors of 10 to 170."""
    whole = Upscaler.load(tiny_dir / f"RealESRGAN_x{scale}.pth", tile=4096)
    tiled = Upscaler.load(tiny_dir / f"RealESRGAN_x{scale}.pth", tile=tile)
    recorder = RecordingModel(tiled.model)
    tiled.model = recorder  # type: ignore[assignment]
    images = [picture(90, 70, seed=1), picture(90, 70, seed=2)]  # sides not multiples of 4 on purpose

    expected = whole.upscale(images)
    got = tiled.upscale(images)

    assert len(recorder.shapes) >= 4  # it did tile
    assert all(max(shape[2:]) <= tile and shape[0] == 2 for shape in recorder.shapes)  # bounded, batched
    for want, have in zip(expected, got, strict=True):
        assert have.size == want.size == (90 * scale, 70 * scale)
        assert np.abs(np.asarray(have, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def test_images_at_or_below_the_tile_size_go_through_whole(x2: Upscaler) -> None:
    """No tiling for images that fit in one tile."""
    recorder = RecordingModel(x2.model)
    upscaler = Upscaler(recorder, tile=64)  # type: ignore[arg-type]
    upscaler.upscale([picture(64, 40), picture(64, 40)])
    assert recorder.shapes == [(2, 3, 40, 64)]


@pytest.mark.parametrize("scale", [2, 4])
def test_enlarge_doubles_the_side_running_the_model_again_tiled(tiny_dir: Path, scale: int) -> None:
    """Upscale's second pass: twice the side whatever the model's scale (an x4 result is resized down), tiled
    above the tile size like any upscale."""
    upscaler = Upscaler.load(tiny_dir / f"RealESRGAN_x{scale}.pth", tile=64)
    recorder = RecordingModel(upscaler.model)
    upscaler.model = recorder  # type: ignore[assignment]
    image = picture(96, 80)

    big = upscaler.enlarge(image, 2)

    assert big.size == (192, 160)
    assert len(recorder.shapes) >= 4 and all(max(shape[2:]) <= 64 for shape in recorder.shapes)  # tiled
    once = upscaler.upscale([image])[0]
    expected = once if scale == 2 else once.resize((192, 160), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(big, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_studio_upscales_one_drawing_from_its_tokens_to_twice_the_gallery_side(studio: Studio) -> None:
    [gallery] = studio.imagine_batch([ImagineRequest("a cat", count=2, seed=3)], [lambda progress: None])
    assert not isinstance(gallery, BaseException)
    [drawing, _] = gallery

    big = studio.upscale(UpscaleRequest(drawing.tokens))

    assert big.size == (2 * studio.output_size, 2 * studio.output_size)
    assert studio.upscaler is not None
    again = studio.upscaler.enlarge(drawing.image, 2)  # the gallery image, upscaled once more
    assert np.abs(np.asarray(big, dtype=int) - np.asarray(again, dtype=int)).mean() < 1
    with pytest.raises(JobFailed, match="another model"):
        studio.upscale(UpscaleRequest(drawing.tokens[:-1]))


def test_studio_without_an_upscaler_draws_model_size_images(tiny_dir: Path) -> None:
    """UPSCALER_WEIGHTS=none turns upscaling off: no upscaler is loaded and images stay 64 px."""
    settings = settings_for_tests(
        janus_model=str(tiny_dir / "janus"), janus_device="cpu", upscaler_weights="none"
    )
    studio = Studio.load(settings)
    assert studio.upscaler is None
    assert studio.output_size == 64
    [gallery] = studio.imagine_batch([ImagineRequest("a cat", count=2, seed=1)], [lambda progress: None])
    assert not isinstance(gallery, BaseException)
    assert [drawing.image.size for drawing in gallery] == [(64, 64)] * 2


def test_missing_default_weights_offline_say_which_file_to_put_where(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline and without weights/RealESRGAN_x2.pth, start-up fails with one line naming the file, where it
    goes and where it comes from (conftest sets HF_HUB_OFFLINE=1, so nothing is downloaded)."""
    monkeypatch.chdir(tmp_path)
    settings = settings_for_tests(janus_model=str(tiny_dir / "janus"), janus_device="cpu")
    assert settings.upscaler_weights == "weights/RealESRGAN_x2.pth"
    with pytest.raises(StartupError) as error:
        Studio.load(settings)
    message = str(error.value)
    assert message.startswith("UPSCALER_WEIGHTS:")
    assert "RealESRGAN_x2.pth" in message and "into weights/" in message
    assert "huggingface.co/ai-forever/Real-ESRGAN" in message
    assert "UPSCALER_WEIGHTS=none" in message
    assert "\n" not in message
    assert not (tmp_path / "weights" / "RealESRGAN_x2.pth").exists()
