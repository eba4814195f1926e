"""`python -m bot`: the offline `ask` and `imagine` commands on the tiny model, and one-line start-up errors.

Most tests call `bot.__main__.main([...])` in-process (fast); one runs the real entry point in a subprocess.
Settings come from the environment and `.env` in the current directory, so each test runs in an empty
temporary directory with every setting's variable removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bot.__main__ import main
from bot.settings import Settings

PROMPT = "a red fox in the snow"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty working directory (no .env) and no setting in the environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_env(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> dict[str, str]:
    """Point the settings at the tiny model and the x2 upscaler, on the CPU."""
    values = {
        "JANUS_MODEL": str(tiny_dir / "janus"),
        "JANUS_DEVICE": "cpu",
        "UPSCALER_WEIGHTS": str(tiny_dir / "RealESRGAN_x2.pth"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def decoded(paths: list[Path]) -> list[np.ndarray]:
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            arrays.append(np.asarray(image.convert("RGB")))
    return arrays


def imagine(capsys: pytest.CaptureFixture[str], out: str, seed: int) -> tuple[list[Path], str]:
    """Run `imagine PROMPT --out out --count 2 --seed seed`; return the files and what went to stderr."""
    assert main(["imagine", PROMPT, "--out", out, "--count", "2", "--seed", str(seed)]) == 0
    captured = capsys.readouterr()
    printed = [Path(line) for line in captured.out.split()]
    assert sorted(printed) == pngs(Path(out))
    return pngs(Path(out)), captured.err


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.usefixtures("tiny_env")
def test_ask_prints_an_answer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`python -m bot ask photo.jpg "What is in this picture?"` prints the model's answer."""
    Image.new("RGB", (80, 50), (200, 30, 30)).save(tmp_path / "photo.jpg")
    assert main(["ask", "photo.jpg", "What is in this picture?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "Error" not in captured.err and "Traceback" not in captured.err


@pytest.mark.usefixtures("tiny_env")
def test_ask_about_a_missing_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A picture that is not there is named in one line, with exit status 1."""
    assert main(["ask", "holiday.jpg", "What is this?"]) == 1
    assert "holiday.jpg" in one_line(capsys.readouterr().err)


@pytest.mark.usefixtures("tiny_env")
def test_imagine_writes_upscaled_pngs_and_the_seed_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    """`imagine ... --count 2 --seed 7` writes 2 PNGs of twice the model's 64 px, with a progress bar;
    the same command gives the same pictures, another seed other pictures."""
    first, progress = imagine(capsys, "out", seed=7)
    assert len(first) == 2
    assert [image.shape for image in decoded(first)] == [(128, 128, 3)] * 2
    assert "Drawing 2 image(s)" in progress

    again, _ = imagine(capsys, "again", seed=7)
    other, _ = imagine(capsys, "other", seed=8)
    for a, b in zip(decoded(first), decoded(again), strict=True):
        assert np.array_equal(a, b)
    for a, c in zip(decoded(first), decoded(other), strict=True):
        assert not np.array_equal(a, c)


def test_the_real_entry_point_draws_the_same_images(
    capsys: pytest.CaptureFixture[str], tiny_env: dict[str, str], tmp_path: Path
) -> None:
    """`python -m bot imagine` in a fresh process writes the same 128 px PNGs as the in-process run."""
    expected, _ = imagine(capsys, "in_process", seed=7)
    env = {**os.environ, **tiny_env, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bot", "imagine", PROMPT, "--out", "cli", "--count", "2", "--seed", "7"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "Drawing 2 image(s)" in done.stderr  # the progress bar
    written = pngs(tmp_path / "cli")
    assert [path.name for path in written] == [path.name for path in expected]
    assert sorted(Path(line) for line in done.stdout.split()) == [Path("cli") / path.name for path in written]
    for a, b in zip(decoded(expected), decoded(written), strict=True):
        assert a.shape == (128, 128, 3) and np.array_equal(a, b)


@pytest.mark.parametrize(
    ("name", "value"),
    [("JANUS_DEVICE", "gpu0"), ("IMAGES_PER_PROMPT", "11"), ("QUEUE_SIZE", "none"), ("JANUS_DTYPE", "fp8")],
)
def test_a_bad_setting_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A bad value exits with status 2 and one line naming the variable, its value, and where to fix it."""
    monkeypatch.setenv(name, value)
    assert main(["imagine", PROMPT]) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith("Configuration error: ")
    assert f"{name}:" in line and repr(value) in line and ".env" in line
    assert captured.out == ""


def test_a_bad_setting_in_dotenv_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The same goes for a bad value in .env in the current directory."""
    (tmp_path / ".env").write_text("DISCORD_TOKEN=abc.def.secret\nJANUS_DEVICE=gpu0\n")
    assert main(["ask", "What is this?"]) == 2
    err = capsys.readouterr().err
    assert "JANUS_DEVICE" in one_line(err)
    assert "abc.def.secret" not in err


@pytest.mark.usefixtures("tiny_env")
def test_a_missing_model_directory_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """JANUS_MODEL pointing at a directory that does not exist: exit 1 and one line saying so."""
    missing = tmp_path / "models" / "Janus-Pro-7B"
    monkeypatch.setenv("JANUS_MODEL", str(missing))
    assert main(["imagine", PROMPT, "--out", "out"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("Error: JANUS_MODEL:")
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("tiny_env")
def test_a_missing_upscaler_file_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """UPSCALER_WEIGHTS pointing at a missing file: exit 1 and one line naming the setting."""
    monkeypatch.setenv("UPSCALER_WEIGHTS", str(tmp_path / "RealESRGAN_x4.pth"))
    assert main(["imagine", PROMPT, "--out", "out"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("Error: UPSCALER_WEIGHTS:") and "RealESRGAN_x4.pth" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.usefixtures("tiny_env")
def test_asking_for_a_gpu_that_is_not_there_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """JANUS_DEVICE=cuda on a machine without CUDA names JANUS_DEVICE and what to use instead."""
    monkeypatch.setenv("JANUS_DEVICE", "cuda")
    assert main(["imagine", PROMPT, "--out", "out"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("Error: JANUS_DEVICE=cuda") and "JANUS_DEVICE=cpu" in line


@pytest.mark.parametrize("argv", [[], ["run"]])
def test_running_the_bot_without_a_token_is_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`python -m bot` without DISCORD_TOKEN stops at once with one line naming DISCORD_TOKEN."""
    assert main(argv) != 0
    line = one_line(capsys.readouterr().err)
    assert "DISCORD_TOKEN" in line
