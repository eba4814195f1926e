"""The README's settings table and .env.example say exactly what the Settings class reads."""

from __future__ import annotations

import re
from pathlib import Path

from settings_for_tests import settings_for_tests

from bot.settings import Settings

ROOT = Path(__file__).parent.parent
FIELDS = {name.upper() for name in Settings.model_fields}


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_env_example_lists_every_setting_with_a_reason() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    assert set(env_example()) == FIELDS
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[index - 1].startswith("# "), f"{line.split('=')[0]} has no line of why above it"


def test_env_example_defaults_are_the_real_defaults(tmp_path: Path) -> None:
    """Loading .env.example as it is gives the same settings as no file at all (token aside)."""
    example = settings_for_tests(ROOT / ".env.example")
    plain = settings_for_tests()
    assert example.model_dump(exclude={"discord_token"}) == plain.model_dump(exclude={"discord_token"})


def test_readme_settings_table_matches_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    table = re.findall(r"^\| `([A-Z_]+)` \| (.*?) \|", readme, flags=re.MULTILINE)
    assert {name for name, _ in table} == FIELDS
    assert len(table) == len(FIELDS), "a setting is listed twice"
    for name, default in table:
        field = Settings.model_fields[name.lower()]
        expected = field.default
        if expected is None:
            assert default == "(empty)", name
        elif isinstance(expected, bool):
            assert default == f"`{str(expected).lower()}`", name
        elif isinstance(expected, Path):
            assert Path(default.strip("`")) == expected, name
        else:
            assert default == f"`{expected}`", name


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"Run the tests.*?```bash\n(.+?)\n```", readme, flags=re.DOTALL)
    assert command is not None
    assert command[1].strip() in ci.splitlines()
