"""Unit tests of the pure usage policy in bot/limits.py."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.limits import (
    LIMIT_FIELDS,
    Decision,
    Policy,
    Usage,
    banned_word_in,
    check,
    day_of,
    format_duration,
    resets_in,
)
from bot.settings import Settings

NOW = datetime(2024, 5, 1, 20, 48, tzinfo=UTC)  # 3 h 12 min before the UTC day ends
POLICY = Policy(
    generations_per_user=1,
    questions_per_user=5,
    generations_per_server=500,
    cooldown_seconds=0,
    max_queued_per_user=2,
    max_prompt_length=500,
)


def test_defaults_copy_every_limit_from_settings() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        generations_per_user=3,
        questions_per_user=4,
        generations_per_server=5,
        cooldown_seconds=6,
        max_queued_per_user=7,
        max_prompt_length=8,
    )
    assert Policy.defaults(settings) == Policy(3, 4, 5, 6, 7, 8)


def test_limit_fields_are_the_five_admin_limits_of_policy_and_settings() -> None:
    assert set(LIMIT_FIELDS) == {
        "generations_per_user",
        "questions_per_user",
        "generations_per_server",
        "cooldown_seconds",
        "max_queued_per_user",
    }
    policy_fields = {field.name for field in dataclasses.fields(Policy)}
    assert set(LIMIT_FIELDS) <= policy_fields
    assert set(LIMIT_FIELDS) <= set(Settings.model_fields)


def test_channels_and_roles() -> None:
    assert POLICY.allows_channel(1)
    limited = dataclasses.replace(POLICY, allowed_channels=frozenset({1}), exempt_roles=frozenset({9}))
    assert limited.allows_channel(1) and not limited.allows_channel(2)
    assert limited.exempts([3, 9]) and not limited.exempts([3]) and not limited.exempts([])


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(seconds=42), "42 s"),
        (timedelta(seconds=41.2), "42 s"),  # rounded up: never promise too soon
        (timedelta(0), "0 s"),
        (timedelta(seconds=-5), "0 s"),
        (timedelta(seconds=60), "1 min"),
        (timedelta(seconds=61), "2 min"),
        (timedelta(minutes=12), "12 min"),
        (timedelta(minutes=59, seconds=30), "1 h"),
        (timedelta(hours=3, minutes=12), "3 h 12 min"),
        (timedelta(hours=24), "24 h"),
    ],
)
def test_format_duration(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text


def test_day_and_reset_follow_utc() -> None:
    assert resets_in(NOW) == timedelta(hours=3, minutes=12)
    assert resets_in(datetime(2024, 5, 2, tzinfo=UTC)) == timedelta(days=1)
    late_in_chile = datetime(2024, 5, 1, 22, 30, tzinfo=timezone(timedelta(hours=-4)))  # 02:30 UTC on the 2nd
    assert day_of(late_in_chile) == "2024-05-02"
    assert resets_in(late_in_chile) == timedelta(hours=21, minutes=30)
    with pytest.raises(ValueError, match="timezone"):
        day_of(datetime(2024, 5, 1))


def test_allowed_under_every_limit() -> None:
    assert check("imagine", Usage(), POLICY, now=NOW, exempt=False) == Decision(True, "")
    assert check("ask", Usage(user_questions=4, queued=1), POLICY, now=NOW, exempt=False).allowed


def test_member_daily_limit_names_the_numbers_and_the_reset() -> None:
    decision = check("imagine", Usage(user_generations=1), POLICY, now=NOW, exempt=False)
    expected = "You've used 1/1 generations today on this server; resets in 3 h 12 min."
    assert decision == Decision(False, expected)
    decision = check("ask", Usage(user_questions=5), POLICY, now=NOW, exempt=False)
    assert decision.reason == "You've used 5/5 questions today on this server; resets in 3 h 12 min."


def test_kinds_count_separately() -> None:
    images_used_up = Usage(user_generations=1, server_generations=500)
    assert check("ask", images_used_up, POLICY, now=NOW, exempt=False).allowed
    assert check("imagine", Usage(user_questions=5), POLICY, now=NOW, exempt=False).allowed


def test_server_limit_applies_to_exempt_members_too() -> None:
    usage = Usage(server_generations=500)
    expected = "This server has used 500/500 generations today; resets in 3 h 12 min."
    assert check("imagine", usage, POLICY, now=NOW, exempt=False).reason == expected
    assert check("imagine", usage, POLICY, now=NOW, exempt=True).reason == expected


def test_exempt_members_skip_member_limits() -> None:
    busy = Usage(user_generations=9, user_questions=9, queued=5, last_request_at=NOW)
    strict = dataclasses.replace(POLICY, cooldown_seconds=600, generations_per_user=0, max_queued_per_user=0)
    assert check("imagine", busy, strict, now=NOW, exempt=True).allowed
    assert check("ask", busy, strict, now=NOW, exempt=True).allowed
    assert not check("imagine", busy, strict, now=NOW, exempt=False).allowed


def test_zero_turns_an_action_off() -> None:
    off = Usage()
    no_images = dataclasses.replace(POLICY, generations_per_user=0)
    assert check("imagine", off, no_images, now=NOW, exempt=False).reason == (
        "Image generation is turned off on this server."
    )
    assert check("ask", off, no_images, now=NOW, exempt=False).allowed
    no_questions = dataclasses.replace(POLICY, questions_per_user=0)
    assert check("ask", off, no_questions, now=NOW, exempt=False).reason == (
        "Questions are turned off on this server."
    )
    server_off = dataclasses.replace(POLICY, generations_per_server=0)
    assert check("imagine", off, server_off, now=NOW, exempt=True).reason == (
        "Image generation is turned off on this server."
    )
    no_queue = dataclasses.replace(POLICY, max_queued_per_user=0)
    assert check("ask", off, no_queue, now=NOW, exempt=False).reason == (
        "This server is not taking requests right now."
    )


def test_queue_cap_names_the_waiting_requests() -> None:
    decision = check("imagine", Usage(queued=2), POLICY, now=NOW, exempt=False)
    assert decision.reason == "You already have 2 requests waiting; please wait for them to finish."
    one = dataclasses.replace(POLICY, max_queued_per_user=1)
    decision = check("ask", Usage(queued=1), one, now=NOW, exempt=False)
    assert decision.reason == "You already have 1 request waiting; please wait for it to finish."


def test_cooldown_counts_down_from_the_last_request() -> None:
    policy = dataclasses.replace(POLICY, cooldown_seconds=60)
    usage = Usage(last_request_at=NOW - timedelta(seconds=18))
    decision = check("ask", usage, policy, now=NOW, exempt=False)
    assert decision.reason == "Please wait 42 s before your next request."
    assert check("ask", usage, policy, now=NOW + timedelta(seconds=42), exempt=False).allowed
    assert check("ask", usage, POLICY, now=NOW, exempt=False).allowed  # cooldown 0: none


def test_the_daily_limit_is_reported_before_the_cooldown() -> None:
    policy = dataclasses.replace(POLICY, cooldown_seconds=60)
    decision = check("imagine", Usage(user_generations=1, last_request_at=NOW), policy, now=NOW, exempt=False)
    assert decision.reason.startswith("You've used 1/1 generations")


@pytest.mark.parametrize(
    ("text", "words", "found"),
    [
        ("a cat sat", ["cat"], "cat"),
        ("A CAT!", ["cat"], "cat"),
        ("(cat)", ["cat"], "cat"),
        ("category", ["cat"], None),
        ("bobcat", ["cat"], None),
        ("cat_food", ["cat"], None),
        ("a BAD   word, really", ["bad word"], "bad word"),
        ("bad wordy", ["bad word"], None),
        ("badword", ["bad word"], None),
        ("STRASSE", ["straße"], "straße"),
        ("Straße", ["strasse"], "strasse"),
        ("nothing here", [], None),
        ("anything", ["", "  "], None),
        ("dog then cat", ["cat", "dog"], "cat"),
    ],
)
def test_banned_word_in(text: str, words: list[str], found: str | None) -> None:
    assert banned_word_in(text, words) == found


_WORDS = st.text(alphabet="abß", min_size=1, max_size=3)


@given(text=st.text(alphabet="abAB ß_.-!\n", max_size=30), word=_WORDS)
def test_banned_word_matches_exactly_the_whole_words(text: str, word: str) -> None:
    """A single word is found exactly when it is one of the text's words, ignoring case."""
    whole_words = re.findall(r"\w+", text.casefold())
    assert (banned_word_in(text, [word]) == word) == (word.casefold() in whole_words)


@given(
    before=st.text(alphabet="ab .!", max_size=10),
    after=st.text(alphabet="ab .!", max_size=10),
    words=st.lists(_WORDS, min_size=1, max_size=3),
)
def test_a_banned_phrase_between_separators_is_found(before: str, after: str, words: list[str]) -> None:
    phrase = " ".join(words)
    text = f"{before} {phrase.upper().replace(' ', '  ')}, {after}"
    assert banned_word_in(text, [phrase]) == phrase
