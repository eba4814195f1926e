"""Settings as the tests build them: from the values given (and the environment), never from a stray .env."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.settings import Settings


def settings_for_tests(env_file: Path | None = None, **values: Any) -> Settings:
    """`Settings(**values)` reading `env_file` (none by default) instead of the working directory's .env."""
    # pydantic-settings accepts `_env_file` at run time, but its generated __init__ signature omits it.
    return Settings(_env_file=env_file, **values)  # pyright: ignore[reportCallIssue]
