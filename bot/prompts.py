"""Prompts from a picture: the question /describe asks Janus when given no question, and the parsing of its
answer into at most four short prompts. Models do not always follow the requested format (a small or random
one writes anything), so the parser accepts the usual ways of numbering a list and drops what is not a
prompt."""

from __future__ import annotations

import re

PROMPT_COUNT = 4
MAX_PROMPT_CHARS = 300  # a suggestion longer than this is cut at a word
QUESTION = (
    "Write four different short prompts that an image generator could use to draw this picture. "
    "Answer with a numbered list from 1 to 4, one prompt per line, and nothing else."
)

# Where a list item starts: "1. ", "2) ", "3: ", "**4.** ", "Prompt 1: ", "#1 - ", at a line start or after a
# space.
_MARKER = re.compile(
    r"(?:^|(?<=\s))(?:\*\*|__)?(?:prompt\s*)?#?[1-9](?:\*\*|__)?\s*[.):\]-](?:\*\*|__)?\s+",
    re.IGNORECASE | re.MULTILINE,
)
_WORD = re.compile(r"[^\W\d_]{2,}")  # a word of at least two letters, in any script
_QUESTION_WORDS = frozenset(word.casefold() for word in _WORD.findall(QUESTION))


def parse_prompts(answer: str) -> list[str]:
    """Up to PROMPT_COUNT distinct prompts from the model's answer; empty when it wrote none."""
    pieces = _MARKER.split(answer)
    # With markers: the text after each one, up to the next marker or line end; without: each line.
    candidates = [piece.split("\n", 1)[0] for piece in pieces[1:]] if len(pieces) > 1 else answer.splitlines()
    prompts: list[str] = []
    seen: set[str] = set()
    for candidate in candidates:
        prompt = clean_prompt(candidate)
        key = prompt.casefold()
        if looks_like_prompt(prompt) and key not in seen:
            seen.add(key)
            prompts.append(prompt)
        if len(prompts) == PROMPT_COUNT:
            break
    return prompts


def clean_prompt(text: str) -> str:
    """Markdown emphasis, surrounding quotes and a leading "Prompt:" removed; whitespace collapsed; cut to
    MAX_PROMPT_CHARS at a word."""
    text = re.sub(r"[*_`]+", "", text)
    text = re.sub(r"^\s*(?:prompt\s*\d*\s*[:.-]\s*)", "", text, flags=re.IGNORECASE)
    text = " ".join(text.split()).strip(" \"'“”‘’-–—")
    if len(text) > MAX_PROMPT_CHARS:
        cut = text[:MAX_PROMPT_CHARS].rsplit(" ", 1)[0]
        text = cut if len(cut) > MAX_PROMPT_CHARS // 2 else text[:MAX_PROMPT_CHARS]
    return text


def looks_like_prompt(text: str) -> bool:
    """At least three words, mostly letters and spaces, and not our question repeated: not a fragment, not
    token
    soup, not an echo."""
    words = [word.casefold() for word in _WORD.findall(text)]
    if len(words) < 3:
        return False
    echoed = sum(word in _QUESTION_WORDS for word in words)
    wordy = sum(char.isalpha() or char.isspace() or char in ",.'-" for char in text)
    return wordy >= 0.85 * len(text) and echoed < 0.6 * len(words)
