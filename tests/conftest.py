"""Shared fixtures: tiny real models built once per session, and Settings that point at them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_esrgan, build_tiny_janus  # noqa: E402

from bot.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_janus(root / "janus")
    build_tiny_esrgan(root / "RealESRGAN_x2.pth", scale=2)
    build_tiny_esrgan(root / "RealESRGAN_x4.pth", scale=4)
    return root


@pytest.fixture
def settings(tiny_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,
        discord_token="test-token",
        janus_model=str(tiny_dir / "janus"),
        janus_device="cpu",
        upscaler_weights=str(tiny_dir / "RealESRGAN_x2.pth"),
        data_dir=tmp_path / "data",
    )


@pytest.fixture(scope="session")
def studio(tiny_dir: Path):
    """The tiny model and upscaler, loaded once through the path users take."""
    from bot.studio import Studio

    return Studio.load(Settings(_env_file=None, janus_model=str(tiny_dir / "janus"), janus_device="cpu",
                                upscaler_weights=str(tiny_dir / "RealESRGAN_x2.pth")), preview_seconds=0)
