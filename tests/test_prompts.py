"""Parsing the prompts /describe asks Janus for (bot/prompts.py): the usual list formats, and what is no
prompt."""

from __future__ import annotations

import pytest

from bot.prompts import MAX_PROMPT_CHARS, QUESTION, parse_prompts


@pytest.mark.parametrize(
    "answer",
    [
        "1. a red fox in snow\n2. a small fox sleeping\n3. foxes playing in winter\n4. a fox, oil painting",
        "1) a red fox in snow\n2) a small fox sleeping\n3) foxes playing in winter\n4) a fox, oil painting",
        (
            "Sure! Here are four:\n\n**1.** a red fox in snow\n**2.** a small fox sleeping\n"
            "**3.** foxes playing in winter\n**4.** a fox, oil painting\n\nEnjoy!"
        ),
        (
            "Prompt 1: \"a red fox in snow\"\nPrompt 2: 'a small fox sleeping'\n"
            "Prompt 3: foxes playing in winter\nPrompt 4: a fox, oil painting"
        ),
        "1. a red fox in snow 2. a small fox sleeping 3. foxes playing in winter 4. a fox, oil painting",
        (
            "1 - a red fox in snow\n2 - a small fox sleeping\n3 - foxes playing in winter\n"
            "4 - a fox, oil painting\n5 - one more than asked for"
        ),
    ],
)
def test_numbered_lists_in_the_usual_formats(answer: str) -> None:
    assert parse_prompts(answer) == [
        "a red fox in snow",
        "a small fox sleeping",
        "foxes playing in winter",
        "a fox, oil painting",
    ]


def test_unnumbered_lines_are_taken_and_duplicates_dropped() -> None:
    answer = "A dog on a beach at sunset\nA DOG ON A BEACH AT SUNSET\n\nA happy dog running on sand"
    assert parse_prompts(answer) == ["A dog on a beach at sunset", "A happy dog running on sand"]


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   \n ",
        "qz#@ 12 ▁▁ xx\n~~ 7 ##",
        "1. 2. 3. 4.",
        "1. fox\n2. dog",
        "<image_placeholder><pad><pad>",
        f"0 turns: | now: {QUESTION} (red)",  # the question echoed back
    ],
)
def test_what_is_no_prompt_gives_none(answer: str) -> None:
    assert parse_prompts(answer) == []


def test_a_long_prompt_is_cut_at_a_word() -> None:
    long = "a very detailed harbour with boats " * 30
    [prompt] = parse_prompts("1. " + long)
    assert len(prompt) <= MAX_PROMPT_CHARS < len(long.strip())
    assert long.startswith(prompt + " ")  # ends at a whole word
