"""Prompt grammar of the toy world: template families that say a `SceneSpec` in English.

A family is one sentence frame for one kind of content (a single object, an object in a region, a pair,
a spatial relation, a count, a mix of groups). Families are split into **training** and **held-out**
families: models are trained on the first and judged on the second, so a score on held-out prompts
measures whether the model understands sentences it has never seen.

What a prompt must say is fixed by the spec: every attribute that differs from its default (a color
other than the shape's own, a size other than medium, a non-plain style, ...) is mentioned; attributes at
their default may be mentioned too (``p_optional``). Positions follow the arrangement conventions of
`toyworld.scene`, so the prompt determines the canonical plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toyworld import vocab as V
from toyworld.scene import SceneSpec, SpecDraw

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {s: s + "s" for s in V.SHAPES}

# Field phrasings. The same phrasings serve every family: a held-out family differs in its frame.
STYLE_PHRASES = {
    "plain": ["on a plain background", "on a flat backdrop", "with a plain background"],
    "vertical gradient": [
        "on a vertical gradient background",
        "with a vertical gradient backdrop",
        "against a vertical gradient",
    ],
    "horizontal gradient": [
        "on a horizontal gradient background",
        "with a horizontal gradient backdrop",
        "against a horizontal gradient",
    ],
    "vignette": ["on a vignette background", "with a vignette backdrop", "framed by a vignette"],
}
LIGHTING_PHRASES = {
    "dim": ["in dim light", "dimly lit", "in low light"],
    "normal": ["in normal light", "under ordinary light", "normally lit"],
    "bright": ["in bright light", "brightly lit", "under strong light"],
}
CAMERA_PHRASES = {
    "wide": ["wide shot", "seen from far away", "from a distance"],
    "medium": ["medium shot", "seen from a normal distance"],
    "close-up": ["close-up", "close-up shot", "seen up close"],
}
MATERIAL_ADJECTIVES = {"solid": ["solid", "filled"], "outlined": ["outlined", "hollow"]}
MATERIAL_PHRASES = {"solid": ["drawn solid", "with solid fill"], "outlined": ["drawn as outlines", "in outline only"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium", "medium-sized"], "large": ["large", "big"]}
REGION_PHRASES = {
    "top left": ["in the top left corner", "at the top left"],
    "top": ["at the top", "near the top edge"],
    "top right": ["in the top right corner", "at the top right"],
    "left": ["on the left", "at the left side"],
    "center": ["in the center", "in the middle"],
    "right": ["on the right", "at the right side"],
    "bottom left": ["in the bottom left corner", "at the bottom left"],
    "bottom": ["at the bottom", "near the bottom edge"],
    "bottom right": ["in the bottom right corner", "at the bottom right"],
}
DISTRACTORS = ["in a calm mood", "for a poster", "nothing fancy", "as a simple picture"]


@dataclass(frozen=True)
class TemplateFamily:
    """One sentence frame. Placeholders: ``{o}`` (all objects), ``{a}``/``{b}`` (pair), ``{region}``, ``{m}``
    (field modifiers, with their leading separator)."""

    name: str
    kind: str  # single | region | pair | relation | count | mixed
    frame: str
    split: str  # train | heldout
    relation: str | None = None  # for relation frames: "left of", "right of", "above", "below"
    digits: bool = False  # counts as digits ("3 circles") instead of words ("three circles")

    def render(
        self, draw: SpecDraw, rng: np.random.Generator, p_optional: float = 0.3, force: frozenset[str] = frozenset()
    ) -> str:
        return render_prompt(draw, self, rng, p_optional=p_optional, force=force)


def _f(name, kind, frame, split, relation=None, digits=False) -> TemplateFamily:
    return TemplateFamily(name, kind, frame, split, relation, digits)


FAMILIES: tuple[TemplateFamily, ...] = (
    # single object (center)
    _f("single_bare", "single", "{o}{m}", "train"),
    _f("single_photo", "single", "a photo of {o}{m}", "train"),
    _f("single_image", "single", "an image showing {o}{m}", "train"),
    _f("single_draw", "single", "draw {o}{m}", "train"),
    _f("single_nothing_else", "single", "{o}{m}, nothing else", "train"),
    _f("single_mood", "single", "a picture of {o}{m}, in a calm mood", "train"),
    _f("single_render", "single", "please render {o}{m}", "heldout"),
    _f("single_like_to_see", "single", "i would like to see {o}{m}", "heldout"),
    _f("single_all_there_is", "single", "{o}{m} is all there is in this picture", "heldout"),
    # one object in a named region
    _f("region_suffix", "region", "{o} {region}{m}", "train"),
    _f("region_prefix", "region", "{region}, {o}{m}", "train"),
    _f("region_photo", "region", "a photo of {o} {region}{m}", "train"),
    _f("region_placed", "region", "{o} placed {region}{m}", "heldout"),
    # two objects, side by side in mention order
    _f("pair_and", "pair", "{a} and {b}{m}", "train"),
    _f("pair_photo", "pair", "a photo of {a} and {b}{m}", "train"),
    _f("pair_together", "pair", "{a} together with {b}{m}", "train"),
    _f("pair_nothing_else", "pair", "an image with {a} and {b}{m}, nothing else", "train"),
    _f("pair_both", "pair", "both {a} and {b}{m}", "heldout"),
    _f("pair_alongside", "pair", "{a} alongside {b}{m} in a quiet scene", "heldout"),
    # spatial relations
    _f("rel_left_of", "relation", "{a} left of {b}{m}", "train", "left of"),
    _f("rel_to_the_left_of", "relation", "a photo of {a} to the left of {b}{m}", "train", "left of"),
    _f("rel_right_of", "relation", "{a} right of {b}{m}", "train", "right of"),
    _f("rel_on_the_right_of", "relation", "{a} on the right of {b}{m}", "train", "right of"),
    _f("rel_above", "relation", "{a} above {b}{m}", "train", "above"),
    _f("rel_photo_above", "relation", "a photo of {a} above {b}{m}", "train", "above"),
    _f("rel_below", "relation", "{a} below {b}{m}", "train", "below"),
    _f("rel_photo_below", "relation", "a photo of {a} below {b}{m}", "train", "below"),
    _f("rel_on_its_left", "relation", "{b} with {a} on its left{m}", "heldout", "left of"),
    _f("rel_on_its_right", "relation", "{b} with {a} on its right{m}", "heldout", "right of"),
    _f("rel_positioned_over", "relation", "{a} positioned over {b}{m}", "heldout", "above"),
    _f("rel_underneath", "relation", "{a} sitting underneath {b}{m}", "heldout", "below"),
    # counts of one kind of object
    _f("count_words", "count", "{o}{m}", "train"),
    _f("count_digits", "count", "{o}{m}", "train", digits=True),
    _f("count_photo", "count", "a photo of {o}{m}", "train"),
    _f("count_group", "count", "a group of {o}{m}", "train", digits=True),
    _f("count_exactly", "count", "exactly {o}{m}", "heldout"),
    _f("count_set", "count", "a set of {o}{m}, nothing else", "heldout", digits=True),
    # two groups, three or four objects in mention order
    _f("mixed_and", "mixed", "{o}{m}", "train"),
    _f("mixed_photo", "mixed", "a photo of {o}{m}", "train", digits=True),
    _f("mixed_containing", "mixed", "a scene containing {o}{m}", "heldout"),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


def families(split: str | None = None, kind: str | None = None, relation: str | None = None) -> list[TemplateFamily]:
    """Families of a split (``train`` / ``heldout`` / None for both) and kind (and relation)."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
    return [
        f
        for f in FAMILIES
        if (split is None or f.split == split)
        and (kind is None or f.kind == kind)
        and (relation is None or f.relation == relation)
    ]


def _choice(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _object_phrase(
    obj,
    spec: SceneSpec,
    rng,
    family: TemplateFamily,
    p_optional: float,
    force: frozenset[str],
    material_as_adjective: bool,
) -> str:
    words = []
    if obj.size != V.DEFAULT_SIZE or "size" in force or rng.uniform() < p_optional / 3:
        words.append(_choice(rng, SIZE_WORDS[obj.size]))
    if material_as_adjective:
        words.append(_choice(rng, MATERIAL_ADJECTIVES[spec.material]))
    if obj.color != V.DEFAULT_COLOR[obj.name] or "color" in force or rng.uniform() < p_optional:
        words.append(obj.color)
    if obj.count == 1:
        noun = " ".join([*words, obj.name])
        return ("an " if noun[0] in "aeiou" else "a ") + noun
    number = str(obj.count) if family.digits else NUMBER_WORDS[obj.count]
    return " ".join([number, *words, PLURALS[obj.name]])


def render_prompt(
    draw: SpecDraw,
    family: TemplateFamily,
    rng: np.random.Generator,
    *,
    p_optional: float = 0.3,
    force: frozenset[str] = frozenset(),
) -> str:
    """Say ``draw.spec`` with ``family``'s frame.

    ``force`` names attributes to mention even at their default (``color``, ``size``, ``style``,
    ``lighting``, ``camera``, ``material``); ``p_optional`` is the chance of mentioning any other
    attribute that is at its default.
    """
    spec = draw.spec
    if family.kind != draw.kind:
        raise ValueError(f"family {family.name} says {family.kind} content, the spec is {draw.kind}")
    if family.kind == "relation" and family.relation != draw.relation:
        raise ValueError(f"family {family.name} says '{family.relation}', the spec needs '{draw.relation}'")

    def wants(name: str, is_default: bool) -> bool:
        return not is_default or name in force or rng.uniform() < p_optional

    mention_material = wants("material", spec.material == V.DEFAULT_MATERIAL)
    material_adj = mention_material and rng.uniform() < 0.6
    phrases = [_object_phrase(o, spec, rng, family, p_optional, force, material_adj) for o in spec.objects]
    mods = []
    if mention_material and not material_adj:
        mods.append(_choice(rng, MATERIAL_PHRASES[spec.material]))
    if wants("style", spec.style == V.DEFAULT_STYLE):
        mods.append(_choice(rng, STYLE_PHRASES[spec.style]))
    if wants("lighting", spec.lighting == V.DEFAULT_LIGHTING):
        mods.append(_choice(rng, LIGHTING_PHRASES[spec.lighting]))
    if wants("camera", spec.camera == V.DEFAULT_CAMERA):
        mods.append(_choice(rng, CAMERA_PHRASES[spec.camera]))
    order = rng.permutation(len(mods))
    mods = [mods[i] for i in order]
    if rng.uniform() < p_optional / 3:
        mods.append(_choice(rng, DISTRACTORS))
    m = "".join((", " if rng.uniform() < 0.6 else " ") + x for x in mods)

    values = {"m": m}
    if family.kind in ("pair", "relation"):
        values["a"], values["b"] = phrases
    elif family.kind in ("count", "mixed"):
        values["o"] = " and ".join(phrases)
    else:
        values["o"] = phrases[0]
    if family.kind == "region":
        values["region"] = _choice(rng, REGION_PHRASES[spec.objects[0].positions[0]])
    elif family.kind == "single" and (wants("position", True) and rng.uniform() < 0.3):
        values["o"] += " " + _choice(rng, REGION_PHRASES["center"])
    prompt = family.frame.format(**values)
    return " ".join(prompt.split())


def check_prompt(prompt: str, max_chars: int = 2000) -> str:
    """Normalise a user prompt (strip, collapse whitespace) or raise `ValueError` naming the problem."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    text = " ".join(prompt.split())
    if not text:
        raise ValueError("prompt is empty or whitespace only")
    if len(text) > max_chars:
        raise ValueError(f"prompt has {len(text)} characters (max {max_chars})")
    return text
