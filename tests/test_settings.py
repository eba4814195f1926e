"""Settings: read from the environment and `.env`, the token kept secret, errors as one readable line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from settings_for_tests import settings_for_tests

from bot.settings import Settings, SettingsError, describe_validation_error, load_settings

TOKEN = "MTIzNDU2Nzg5.secret-token-value.xyz"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty working directory (no .env) and no setting in the environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_without_any_configuration() -> None:
    """Nothing set: no token, the 7B model, the x2 weights, the documented defaults."""
    settings = Settings()
    assert settings.discord_token is None
    assert settings.janus_model == "deepseek-community/Janus-Pro-7B"
    assert settings.upscaler_weights == "weights/RealESRGAN_x2.pth" and settings.upscaling_enabled
    assert (settings.images_per_prompt, settings.queue_size, settings.janus_device) == (4, 16, "auto")
    assert settings.database_path == Path("data") / "usage.db"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upper-case environment variables set the fields, converted to their types."""
    for name, value in {
        "DISCORD_TOKEN": TOKEN,
        "JANUS_DEVICE": "cuda:1",
        "QUEUE_SIZE": "3",
        "ALLOW_DMS": "true",
        "DEV_GUILD_ID": "1234567890",
        "UPSCALER_WEIGHTS": "None",
        "DISCORD_API_BASE": "http://127.0.0.1:8080/api/v10/",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.discord_token is not None and settings.discord_token.get_secret_value() == TOKEN
    assert (settings.janus_device, settings.queue_size, settings.allow_dms) == ("cuda:1", 3, True)
    assert settings.dev_guild_id == 1234567890
    assert not settings.upscaling_enabled
    assert settings.discord_api_base == "http://127.0.0.1:8080/api/v10"  # trailing slash dropped


def test_settings_come_from_dotenv_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`.env` in the current directory is read; a variable set in the environment overrides it."""
    (tmp_path / ".env").write_text(
        f"DISCORD_TOKEN={TOKEN}\nIMAGES_PER_PROMPT=2\nDATA_DIR=/srv/janus\n# a comment\nQUEUE_SIZE=5\n"
    )
    monkeypatch.setenv("QUEUE_SIZE", "9")
    settings = Settings()
    assert settings.discord_token is not None and settings.discord_token.get_secret_value() == TOKEN
    assert settings.images_per_prompt == 2
    assert settings.database_path == Path("/srv/janus/usage.db")
    assert settings.queue_size == 9


def test_empty_values_mean_unset(tmp_path: Path) -> None:
    """`DISCORD_TOKEN=` as shipped in .env.example counts as not set, and an empty value keeps the default."""
    (tmp_path / ".env").write_text("DISCORD_TOKEN=\nJANUS_DEVICE=\nDEV_GUILD_ID=\n")
    settings = Settings()
    assert settings.discord_token is None
    assert settings.janus_device == "auto" and settings.dev_guild_id is None


def test_the_token_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Printing or logging the settings never shows the token."""
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    settings = Settings()
    shown_ways = (
        repr(settings),
        str(settings),
        f"{settings}",
        settings.model_dump_json(),
        str(settings.discord_token),
    )
    for shown in shown_ways:
        assert TOKEN not in shown
    assert settings.discord_token is not None and settings.discord_token.get_secret_value() == TOKEN


def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings turns a validation error into one line per setting: the variable, the problem, the value,
    where to fix it, and never the token."""
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("JANUS_DEVICE", "gpu0")
    monkeypatch.setenv("IMAGES_PER_PROMPT", "11")
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert "\n" not in message
    assert "JANUS_DEVICE: " in message and "'gpu0'" in message and "cuda" in message
    assert "IMAGES_PER_PROMPT: " in message and "'11'" in message
    assert ".env" in message
    assert TOKEN not in message


def test_describe_validation_error_never_shows_a_token_value() -> None:
    """Even when the token itself is what failed validation, its value stays out of the message."""
    with pytest.raises(ValidationError) as error:
        settings_for_tests(discord_token=[TOKEN], janus_device="tpu")  # a list is no token
    message = describe_validation_error(error.value)
    assert "DISCORD_TOKEN" in message and "JANUS_DEVICE" in message and "'tpu'" in message
    assert TOKEN not in message and "secret-token" not in message


def test_a_bad_api_base_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """DISCORD_API_BASE must be an http(s) URL."""
    monkeypatch.setenv("DISCORD_API_BASE", "discord.com/api/v10")
    with pytest.raises(SettingsError, match=r"DISCORD_API_BASE: .*http\(s\) URL"):
        load_settings()


def test_tests_can_override_without_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`settings_for_tests(...)`, i.e. `Settings(_env_file=None, ...)`, ignores .env, as fixtures rely on."""
    (tmp_path / ".env").write_text("QUEUE_SIZE=5\n")
    assert settings_for_tests().queue_size == 16
    assert settings_for_tests(queue_size=2).queue_size == 2
