"""Seeded noise on training prompts: chatter, politeness, character typos, casing and end punctuation.

People type requests with greetings ("hey,", "quick one:"), politeness ("please", "thanks!"), the odd typo
and random capitals. `augment_prompt` adds these to a rendered prompt with an explicit numpy ``Generator``,
so a training row is reproducible from its seed. None of it changes what the prompt means:

- Typos (swap two neighbouring letters, drop one, or double one) touch only words outside `PROTECTED_WORDS`:
  every word of the toy vocabulary (shapes and their plurals, colors, number words), every word of any
  phrasing that names a plan value (sizes, regions, styles, lighting, camera, material), the relation and
  arrangement words ("left", "above", "under", "next", "stacked", ...) and the words that join objects
  ("and", "with", "plus"). So a typo lands on a frame word ("draw" -> "darw", "please" -> "pleae") and never
  on a word the plan depends on: "bleu" would be readable, but "sar" or "rd" would not, and a rule that
  depends on how readable a misspelling is cannot be checked. A typo that happens to spell a protected
  word ("tow" -> "two") is thrown away.
- Chatter may contain vocabulary words used in another sense ("quick one:"), as real requests do; the plan
  never depends on them.
- Casing and punctuation change no word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from toyworld import vocab as V
from toyworld.grammar import BASE_PHRASES, NUMBER_WORDS, PLURALS, WIDE_PHRASES

POLITE_PREFIXES = ["please ", "please, ", "pls "]
POLITE_SUFFIXES = [" please", ", please", " thanks!", " thank you", ", thanks", " thx", " thank you so much"]
CHATTER_PREFIXES = ["hey, ", "hi! ", "quick one: ", "ok so ", "hello, ", "hmm, ", "can i get this: "]
CHATTER_SUFFIXES = [" for my kid's book", " for my slides", " :)", " for a birthday card", ", if you can"]
END_PUNCTUATION = [".", "!", "?", "..."]

# Words that say how objects relate, are arranged or are joined; with the phrase words below, never typo'd.
STRUCTURE_WORDS = frozenset(
    {
        *("left", "right", "above", "below", "under", "beneath", "over", "top", "bottom", "next", "beside"),
        *("side", "each", "other", "stacked", "vertically", "one", "and", "with", "plus", "also", "all"),
        *("in", "of", "it", "that", "its", "underneath", "near", "by", "close", "paired", "accompanied", "as", "well"),
    }
)


def _phrase_words() -> set[str]:
    words: set[str] = set()
    for tables in (BASE_PHRASES, WIDE_PHRASES):
        for table in tables.values():
            for phrases in table.values():
                for phrase in phrases:
                    words.update(re.findall(r"[a-z]+", phrase.lower()))
    return words


PROTECTED_WORDS: frozenset[str] = frozenset(
    set(V.SHAPES)
    | set(PLURALS.values())
    | set(V.COLORS)
    | set(NUMBER_WORDS.values())
    | set(V.SIZES)
    | STRUCTURE_WORDS
    | _phrase_words()
)


@dataclass(frozen=True)
class AugmentConfig:
    """Chance of each kind of noise per prompt (independent draws)."""

    p_chatter: float = 0.15  # a greeting before or a remark after the request
    p_polite: float = 0.2  # "please" before or "thanks!" after
    p_typo: float = 0.25  # one or two letter typos in unprotected words
    max_typos: int = 2
    p_case: float = 0.3  # Sentence case (most), Title Case or ALL CAPS
    p_punct: float = 0.2  # a final ".", "!", "?" or "..."


DEFAULT_AUGMENT = AugmentConfig()


def _choice(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def is_protected(word: str) -> bool:
    """True if a typo must not touch ``word`` (any piece of a hyphenated word protected, or any digit)."""
    core = word.lower().strip(".,!?:;'\"()")
    return any(ch.isdigit() for ch in core) or any(p in PROTECTED_WORDS for p in re.split(r"[-']", core))


def typo(word: str, rng: np.random.Generator) -> str:
    """Swap two neighbouring letters, drop one, or double one (``word`` has >= 3 letters)."""
    kind = int(rng.integers(3))
    if kind == 0:
        i = int(rng.integers(len(word) - 1))
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    i = int(rng.integers(len(word)))
    if kind == 1:
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


def add_typos(prompt: str, rng: np.random.Generator, n: int) -> str:
    """Up to ``n`` typos, each in a different unprotected all-letter word of 3+ letters."""
    words = prompt.split(" ")
    candidates = [i for i, w in enumerate(words) if re.fullmatch(r"[a-z]{3,}", w) and not is_protected(w)]
    for i in rng.permutation(candidates)[:n]:
        new = typo(words[i], rng)
        if new != words[i] and not is_protected(new):
            words[i] = new
    return " ".join(words)


def change_case(prompt: str, rng: np.random.Generator) -> str:
    """Sentence case (70%), Title Case (20%) or ALL CAPS (10%)."""
    u = rng.uniform()
    if u < 0.7:
        return prompt[:1].upper() + prompt[1:]
    if u < 0.9:
        return " ".join(w[:1].upper() + w[1:] for w in prompt.split(" "))
    return prompt.upper()


def augment_prompt(prompt: str, rng: np.random.Generator, cfg: AugmentConfig = DEFAULT_AUGMENT) -> str:
    """``prompt`` with seeded chatter, politeness, typos, casing and end punctuation (same rng, same text)."""
    text = prompt
    if rng.uniform() < cfg.p_polite:
        text = _choice(rng, POLITE_PREFIXES) + text if rng.uniform() < 0.5 else text + _choice(rng, POLITE_SUFFIXES)
    if rng.uniform() < cfg.p_chatter:
        text = _choice(rng, CHATTER_PREFIXES) + text if rng.uniform() < 0.6 else text + _choice(rng, CHATTER_SUFFIXES)
    if rng.uniform() < cfg.p_punct and text[-1].isalnum():
        text += _choice(rng, END_PUNCTUATION)
    if rng.uniform() < cfg.p_typo:
        text = add_typos(text, rng, 1 + int(rng.integers(cfg.max_typos)))
    if rng.uniform() < cfg.p_case:
        text = change_case(text, rng)
    return text
