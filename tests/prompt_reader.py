"""A rule-based reader of toy-world prompts, for tests: if it recovers the spec from the words, the words say it.

The reader knows the toy vocabulary and every phrasing (`toyworld.grammar.phrasings`), and takes from the
family only what its frame's fixed words say: the kind of arrangement and, for relations, which object is
placed (``{a}``) and which is the reference (``{b}``). Everything else (counts, sizes, colors, material,
regions, background, lighting, camera) must be read off the prompt; a field said two ways is an error.
"""

from __future__ import annotations

import re

from planner.schema import PlanObject
from toyworld import vocab as V
from toyworld.grammar import BASE_PHRASES, NUMBER_WORDS, PLURALS, TemplateFamily, phrasings
from toyworld.scene import RELATIONS, SceneSpec, default_slots

NUMBERS = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}, **{str(n): n for n in NUMBER_WORDS}}
SHAPE_OF = {**{s: s for s in V.SHAPES}, **{p: s for s, p in PLURALS.items()}}


def _words_of(table: str) -> dict[str, str]:
    return {w: key for key in BASE_PHRASES[table] for w in phrasings(table, key, wide=True)}


SIZE_OF = _words_of("size")
MATERIAL_OF = _words_of("material_adj")
ADJECTIVES = "|".join(sorted([*SIZE_OF, *MATERIAL_OF, *V.COLORS], key=len, reverse=True))
COLOR_ALT = "|".join(V.COLORS)
OBJECT_RE = re.compile(
    rf"\b({'|'.join(NUMBERS)})\s+((?:(?:{ADJECTIVES})\s+)*)({'|'.join(sorted(SHAPE_OF, key=len, reverse=True))})\b"
    rf"(?:\s+in\s+({COLOR_ALT})\b)?"
)


def _found(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


def _one_value(text: str, table: str, default: str) -> str:
    """The one value of ``table`` that some phrasing in ``text`` names (``default`` if none)."""
    hits = {key for key in BASE_PHRASES[table] if any(_found(text, p) for p in phrasings(table, key, wide=True))}
    assert len(hits) <= 1, f"{table} said as {hits} in {text!r}"
    return hits.pop() if hits else default


def _region(text: str) -> str:
    """The region whose longest matching phrase is not part of a longer match of another region."""
    matches = [(p, key) for key in V.REGIONS for p in phrasings("region", key, wide=True) if _found(text, p)]
    maximal = {key for p, key in matches if not any(p != q and p in q for q, _ in matches)}
    assert len(maximal) == 1, f"regions {maximal} in {text!r}"
    return maximal.pop()


def _objects(text: str) -> list[tuple[str, int, str, str, list[str]]]:
    """(shape, count, size, color, material adjectives) of each object phrase, in mention order."""
    out = []
    for m in OBJECT_RE.finditer(text):
        adjectives = m.group(2).split()
        sizes = {SIZE_OF[w] for w in adjectives if w in SIZE_OF}
        colors = {w for w in adjectives if w in V.COLORS} | ({m.group(4)} if m.group(4) else set())
        assert len(sizes) <= 1 and len(colors) <= 1, f"two sizes or colors in {m.group(0)!r}"
        shape = SHAPE_OF[m.group(3)]
        size = sizes.pop() if sizes else V.DEFAULT_SIZE
        color = colors.pop() if colors else V.DEFAULT_COLOR[shape]
        out.append((shape, NUMBERS[m.group(1)], size, color, [MATERIAL_OF[w] for w in adjectives if w in MATERIAL_OF]))
    return out


def _positions(family: TemplateFamily, text: str, counts: list[int]) -> list[tuple[str, ...]]:
    if family.kind == "single":
        return [("center",)]
    if family.kind == "region":
        return [(_region(text),)]
    if family.kind == "pair":
        return [("left",), ("right",)]
    if family.kind == "relation":
        pa, pb = RELATIONS[family.relation]
        return [(pa,), (pb,)]
    if family.kind == "stacked":
        return [("top", "bottom")]
    slots = default_slots(sum(counts))  # count, mixed: slots filled in mention order
    return [slots[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(counts))]


def read_prompt(prompt: str, family: TemplateFamily) -> SceneSpec:
    """The spec ``prompt`` (said with ``family``'s frame, maybe with chatter, typos and casing) describes."""
    text = prompt.lower()
    objects = _objects(text)
    if family.kind == "relation" and family.frame.index("{b}") < family.frame.index("{a}"):
        objects = objects[::-1]  # the reference was said first; the placed object comes first in the plan
    materials = {m for *_, adj in objects for m in adj}
    said = _one_value(text, "material", "")
    materials |= {said} if said else set()
    assert len(materials) <= 1, f"materials {materials} in {prompt!r}"
    positions = _positions(family, text, [o[1] for o in objects])
    assert len(positions) == len(objects), f"{len(objects)} objects read in {prompt!r}"
    return SceneSpec(
        tuple(PlanObject(s, n, size, c, None, pos) for (s, n, size, c, _), pos in zip(objects, positions)),
        style=_one_value(text, "style", V.DEFAULT_STYLE),
        lighting=_one_value(text, "lighting", V.DEFAULT_LIGHTING),
        camera=_one_value(text, "camera", V.DEFAULT_CAMERA),
        material=materials.pop() if materials else V.DEFAULT_MATERIAL,
    )
