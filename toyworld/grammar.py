"""Prompt grammar of the toy world: template families that say a `SceneSpec` in English.

A family is one sentence frame for one kind of content (a single object, an object in a region, a pair,
a spatial relation, a count, a mix of groups). Families are split into **training** and **held-out**
families: models are trained on the first and judged on the second, so a score on held-out prompts
measures whether the model understands sentences it has never seen.

What a prompt must say is fixed by the spec: every attribute that differs from its default (a color
other than the shape's own, a size other than medium, a non-plain style, ...) is mentioned; attributes at
their default may be mentioned too (``p_optional``). Positions follow the arrangement conventions of
`toyworld.scene`, so the prompt determines the canonical plan.

**Widened grammar** (``wide=True`` families, issue 11): more training frames for every kind, spoken as people
type requests ("show me", "can you draw", "i want", "{b}, and to the left of it {a}", modifiers before the
objects), with synonyms for sizes, regions and scene fields (`WIDE_PHRASES`, added to the base phrasings) and
a seventh kind, ``stacked`` (two objects of one kind, "one on top of the other"). They are training families
only and are left out of ``families()`` unless ``wide=True``, so data sets and metadata made with the original
grammar stay the same row for row. They never reuse the distinctive phrases of the held-out frames
(`HELDOUT_PHRASES`, checked by a test); plain one-word relation synonyms ("over", "under", "beneath", "underneath",
"beside", "next to", "on top of") are allowed because a held-out frame is a whole sentence shape ("{a} positioned
over {b}", "{a} sitting underneath {b}"), not one word, and everyday English needs those words. Relation frames
with a filler verb ("resting on top of", "standing left of", "located below") teach that a verb before the
relation word does not change it; the verbs of the held-out frames ("positioned", "sitting", "placed") are
not among them. Relation frames
name the object being placed ``{a}`` and the reference ``{b}`` whatever the order of mention, and the relation
word always says the family's own relation, so "{b}, and to the left of it {a}" gives the same plan as
"{a} left of {b}" (the placed object first, as in the held-out "{b} with {a} on its left").
Casing, typos, politeness and chatter are `toyworld.augment`, applied to training prompts.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from dataclasses import dataclass

import numpy as np

from planner.schema import Plan
from safeio import InputError
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
BASE_PHRASES: dict[str, dict[str, list[str]]] = {
    "style": STYLE_PHRASES,
    "lighting": LIGHTING_PHRASES,
    "camera": CAMERA_PHRASES,
    "material_adj": MATERIAL_ADJECTIVES,
    "material": MATERIAL_PHRASES,
    "size": SIZE_WORDS,
    "region": REGION_PHRASES,
    "distractor": {"": DISTRACTORS},
}
# Extra phrasings that only wide families use (on top of the base ones): each still names one value.
WIDE_PHRASES: dict[str, dict[str, list[str]]] = {
    "style": {
        "plain": ["on a blank background", "plain background", "with a simple flat background"],
        "vertical gradient": ["with a top-to-bottom gradient", "on a vertical gradient", "vertical gradient bg"],
        "horizontal gradient": ["with a left-to-right gradient", "on a horizontal gradient", "horizontal gradient bg"],
        "vignette": ["with a vignette", "vignette background", "with darkened edges"],
    },
    "lighting": {
        "dim": ["with dim lighting", "in low lighting", "kind of dark"],
        "normal": ["with normal lighting", "in regular light"],
        "bright": ["with bright lighting", "very brightly lit", "really bright"],
    },
    "camera": {
        "wide": ["zoomed out", "from far away", "a wide shot"],
        "medium": ["at a medium distance", "a medium shot"],
        "close-up": ["zoomed in", "up close", "close up"],
    },
    "material_adj": {"solid": ["filled-in", "solid-colored"], "outlined": ["outline", "unfilled"]},
    "material": {"solid": ["filled in", "fully filled"], "outlined": ["as outlines", "just the outline"]},
    "size": {
        "small": ["teeny", "smallish"],
        "medium": ["mid-sized", "regular-sized"],
        "large": ["huge", "giant"],
    },
    "region": {
        "top left": ["in the upper left", "in the top-left corner", "up in the top left"],
        "top": ["along the top", "at the top of the picture", "up top"],
        "top right": ["in the upper right", "in the top-right corner", "up in the top right"],
        "left": ["on the left side", "over on the left", "to the left"],
        "center": ["in the centre", "right in the middle", "dead center"],
        "right": ["on the right side", "over on the right", "to the right"],
        "bottom left": ["in the lower left", "in the bottom-left corner", "down in the bottom left"],
        "bottom": ["along the bottom", "at the bottom of the picture", "down at the bottom"],
        "bottom right": ["in the lower right", "in the bottom-right corner", "down in the bottom right"],
    },
    "distractor": {
        "": [
            "keep it simple",
            "in a clean style",
            "simple style",
            "in a calm setting",
            "in a peaceful picture",
            "for fun",
        ]
    },
}
# Wide families join groups with any of these (the base families always say " and ").
WIDE_JOINERS = [" and ", " and ", " and ", ", plus ", " with ", " and also "]
# Distinctive phrases of the held-out frames: no training frame or phrasing may contain them.
HELDOUT_PHRASES = (
    "both",
    "alongside",
    "on its left",
    "on its right",
    "positioned over",
    "sitting underneath",
    "exactly",
    "a set of",
    "a scene containing",
    "please render",
    "i would like to see",
    "is all there is",
    "placed",
)


@dataclass(frozen=True)
class TemplateFamily:
    """One sentence frame. Placeholders: ``{o}`` (all objects), ``{a}``/``{b}`` (pair), ``{region}``, ``{m}``
    (field modifiers, with their leading separator), ``{mp}`` (the same modifiers said first, with a trailing
    comma)."""

    name: str
    kind: str  # single | region | pair | relation | count | mixed | stacked (wide only)
    frame: str
    split: str  # train | heldout
    relation: str | None = None  # for relation frames: "left of", "right of", "above", "below"
    digits: bool = False  # counts as digits ("3 circles") instead of words ("three circles")
    wide: bool = False  # widened grammar: extra phrasings, object-phrase variants; digits or words at random

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


def _w(name, kind, frame, relation=None) -> TemplateFamily:
    return TemplateFamily("wide_" + name, kind, frame, "train", relation, wide=True)


WIDE_FAMILIES: tuple[TemplateFamily, ...] = (
    # single object (center)
    _w("single_show_me", "single", "show me {o}{m}"),
    _w("single_make", "single", "make {o}{m}"),
    _w("single_generate", "single", "generate {o}{m}"),
    _w("single_i_want", "single", "i want {o}{m}"),
    _w("single_can_you", "single", "can you draw {o}{m}"),
    _w("single_give_me", "single", "give me {o}{m}"),
    _w("single_just", "single", "just {o}{m}"),
    _w("single_drawing_of", "single", "a drawing of {o}{m}"),
    _w("single_mods_first", "single", "{mp}{o}"),
    _w("single_mods_first_draw", "single", "{mp}draw {o}"),
    _w("single_id_love", "single", "i'd love {o}{m}"),
    _w("single_i_need", "single", "i need {o}{m}"),
    _w("single_could_you", "single", "could you make {o}{m}"),
    _w("single_let_me_see", "single", "let me see {o}{m}"),
    # one object in a named region
    _w("region_draw", "region", "draw {o} {region}{m}"),
    _w("region_put", "region", "put {o} {region}{m}"),
    _w("region_colon", "region", "{region}: {o}{m}"),
    _w("region_show_me", "region", "show me {o} {region}{m}"),
    _w("region_i_want", "region", "i want {o} {region}{m}"),
    _w("region_can_you", "region", "can you draw {o} {region}{m}"),
    _w("region_there_is", "region", "{region} there is {o}{m}"),
    _w("region_mods_first", "region", "{mp}{o} {region}"),
    _w("region_mods_region_first", "region", "{mp}{region}, {o}"),
    # two objects, side by side in mention order
    _w("pair_next_to", "pair", "{a} next to {b}{m}"),
    _w("pair_beside", "pair", "{a} beside {b}{m}"),
    _w("pair_side_by_side", "pair", "{a} and {b} side by side{m}"),
    _w("pair_next_to_each_other", "pair", "{a} and {b} next to each other{m}"),
    _w("pair_draw", "pair", "draw {a} and {b}{m}"),
    _w("pair_show_me", "pair", "show me {a} and {b}{m}"),
    _w("pair_make", "pair", "make {a} and {b}{m}"),
    _w("pair_i_want", "pair", "i want {a} and {b}{m}"),
    _w("pair_can_you", "pair", "can you draw {a} and {b}{m}"),
    _w("pair_plus", "pair", "{a}, plus {b}{m}"),
    _w("pair_mods_first", "pair", "{mp}{a} and {b}"),
    _w("pair_mods_first_next_to", "pair", "{mp}{a} next to {b}"),
    _w("pair_near", "pair", "{a} near {b}{m}"),
    _w("pair_by", "pair", "{a} by {b}{m}"),
    _w("pair_close_to", "pair", "{a} close to {b}{m}"),
    _w("pair_paired_with", "pair", "{a} paired with {b}{m}"),
    _w("pair_as_well_as", "pair", "{a} as well as {b}{m}"),
    _w("pair_accompanied", "pair", "{a} accompanied by {b}{m}"),
    _w("pair_comma", "pair", "{a}, {b}{m}"),
    # spatial relations: {a} is the object placed, {b} the reference, in either order of mention
    _w("rel_to_the_left_of", "relation", "{a} to the left of {b}{m}", "left of"),
    _w("rel_draw_left_of", "relation", "draw {a} left of {b}{m}", "left of"),
    _w("rel_ref_first_left", "relation", "{b}, and to the left of it {a}{m}", "left of"),
    _w("rel_ref_first_left_that", "relation", "{b}, and left of that {a}{m}", "left of"),
    _w("rel_mods_first_left", "relation", "{mp}{a} to the left of {b}", "left of"),
    _w("rel_ref_with_to_its_left", "relation", "{b} with {a} to its left{m}", "left of"),
    _w("rel_ref_has_left_of_it", "relation", "{b} that has {a} to the left of it{m}", "left of"),
    _w("rel_ref_with_on_the_left_of_it", "relation", "{b} with {a} on the left of it{m}", "left of"),
    _w("rel_ref_with_at_its_left", "relation", "{b} with {a} at its left{m}", "left of"),
    _w("rel_ref_having_left_side", "relation", "{b} having {a} at its left side{m}", "left of"),
    _w("rel_standing_left_of", "relation", "{a} standing left of {b}{m}", "left of"),
    _w("rel_located_left_of", "relation", "{a} located to the left of {b}{m}", "left of"),
    _w("rel_to_the_right_of", "relation", "{a} to the right of {b}{m}", "right of"),
    _w("rel_draw_right_of", "relation", "draw {a} right of {b}{m}", "right of"),
    _w("rel_ref_first_right", "relation", "{b}, and to the right of it {a}{m}", "right of"),
    _w("rel_ref_first_right_that", "relation", "{b}, and right of that {a}{m}", "right of"),
    _w("rel_mods_first_right", "relation", "{mp}{a} to the right of {b}", "right of"),
    _w("rel_ref_with_to_its_right", "relation", "{b} with {a} to its right{m}", "right of"),
    _w("rel_ref_has_right_of_it", "relation", "{b} that has {a} to the right of it{m}", "right of"),
    _w("rel_ref_with_on_the_right_of_it", "relation", "{b} with {a} on the right of it{m}", "right of"),
    _w("rel_ref_with_at_its_right", "relation", "{b} with {a} at its right{m}", "right of"),
    _w("rel_ref_having_right_side", "relation", "{b} having {a} at its right side{m}", "right of"),
    _w("rel_standing_right_of", "relation", "{a} standing right of {b}{m}", "right of"),
    _w("rel_located_right_of", "relation", "{a} located to the right of {b}{m}", "right of"),
    _w("rel_on_top_of", "relation", "{a} on top of {b}{m}", "above"),
    _w("rel_over", "relation", "{a} over {b}{m}", "above"),
    _w("rel_draw_above", "relation", "draw {a} above {b}{m}", "above"),
    _w("rel_ref_first_above", "relation", "{b}, and above it {a}{m}", "above"),
    _w("rel_ref_first_over", "relation", "{b}, and over it {a}{m}", "above"),
    _w("rel_mods_first_on_top", "relation", "{mp}{a} on top of {b}", "above"),
    _w("rel_ref_with_above_it", "relation", "{b} with {a} above it{m}", "above"),
    _w("rel_ref_with_on_top", "relation", "{b} with {a} on top of it{m}", "above"),
    _w("rel_resting_on_top", "relation", "{a} resting on top of {b}{m}", "above"),
    _w("rel_floating_over", "relation", "{a} floating over {b}{m}", "above"),
    _w("rel_located_above", "relation", "{a} located above {b}{m}", "above"),
    _w("rel_set_over", "relation", "{a} set over {b}{m}", "above"),
    _w("rel_under", "relation", "{a} under {b}{m}", "below"),
    _w("rel_beneath", "relation", "{a} beneath {b}{m}", "below"),
    _w("rel_draw_below", "relation", "draw {a} below {b}{m}", "below"),
    _w("rel_ref_first_below", "relation", "{b}, and below it {a}{m}", "below"),
    _w("rel_ref_first_beneath", "relation", "{b}, and beneath it {a}{m}", "below"),
    _w("rel_mods_first_under", "relation", "{mp}{a} under {b}", "below"),
    _w("rel_ref_with_below_it", "relation", "{b} with {a} below it{m}", "below"),
    _w("rel_ref_with_under_it", "relation", "{b} with {a} under it{m}", "below"),
    _w("rel_underneath", "relation", "{a} underneath {b}{m}", "below"),
    _w("rel_ref_first_underneath", "relation", "{b}, and underneath it {a}{m}", "below"),
    _w("rel_standing_beneath", "relation", "{a} standing beneath {b}{m}", "below"),
    _w("rel_lying_under", "relation", "{a} lying under {b}{m}", "below"),
    _w("rel_located_below", "relation", "{a} located below {b}{m}", "below"),
    # counts of one kind of object
    _w("count_draw", "count", "draw {o}{m}"),
    _w("count_show_me", "count", "show me {o}{m}"),
    _w("count_make", "count", "make {o}{m}"),
    _w("count_i_want", "count", "i want {o}{m}"),
    _w("count_can_you", "count", "can you draw {o}{m}"),
    _w("count_generate", "count", "generate {o}{m}"),
    _w("count_give_me", "count", "give me {o}{m}"),
    _w("count_mods_first", "count", "{mp}{o}"),
    # two objects of one kind, stacked (the count convention would put them side by side)
    _w("stacked_on_top", "stacked", "{o}, one on top of the other{m}"),
    _w("stacked_above", "stacked", "{o}, one above the other{m}"),
    _w("stacked_each_other", "stacked", "{o} stacked on top of each other{m}"),
    _w("stacked_vertically", "stacked", "draw {o} stacked vertically{m}"),
    _w("stacked_mods_first", "stacked", "{mp}{o}, one over the other"),
    # two groups, three or four objects in mention order
    _w("mixed_draw", "mixed", "draw {o}{m}"),
    _w("mixed_show_me", "mixed", "show me {o}{m}"),
    _w("mixed_make", "mixed", "make {o}{m}"),
    _w("mixed_i_want", "mixed", "i want {o}{m}"),
    _w("mixed_can_you", "mixed", "can you draw {o}{m}"),
    _w("mixed_generate", "mixed", "generate {o}{m}"),
    _w("mixed_mods_first", "mixed", "{mp}{o}"),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES + WIDE_FAMILIES}


def families(
    split: str | None = None, kind: str | None = None, relation: str | None = None, *, wide: bool = False
) -> list[TemplateFamily]:
    """Families of a split (``train`` / ``heldout`` / None for both) and kind (and relation).

    ``wide`` adds the widened-grammar families (all of split ``train``); without it the list is the original
    grammar, so everything drawn from it (data sets, ShapesEval metadata) is unchanged.
    """
    if split not in (None, "train", "heldout"):
        raise InputError(f"split must be 'train', 'heldout' or None, got {split!r}")
    return [
        f
        for f in FAMILIES + (WIDE_FAMILIES if wide else ())
        if (split is None or f.split == split)
        and (kind is None or f.kind == kind)
        and (relation is None or f.relation == relation)
    ]


def _choice(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def phrasings(table: str, key: str, wide: bool = False) -> list[str]:
    """The ways to say ``key`` (e.g. ``table="region", key="top left"``): base ones, plus wide ones if asked."""
    return BASE_PHRASES[table][key] + (WIDE_PHRASES[table].get(key, []) if wide else [])


def _say(rng: np.random.Generator, table: str, key: str, family: TemplateFamily) -> str:
    return _choice(rng, phrasings(table, key, family.wide))


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _wide_object_phrase(obj, words: list[str], color: str | None, rng: np.random.Generator) -> str:
    """Wide families: the color may follow the noun ("a star in purple"), one object may be "one star", and
    counts are digits or words at random."""
    trailing = ""
    if color is not None:
        if rng.uniform() < 0.2:
            trailing = " in " + color
        else:
            words = [*words, color]
    if obj.count == 1:
        noun = " ".join([*words, obj.name])
        return ("one " + noun if rng.uniform() < 0.1 else _article(noun)) + trailing
    number = str(obj.count) if rng.uniform() < 0.35 else NUMBER_WORDS[obj.count]
    return " ".join([number, *words, PLURALS[obj.name]]) + trailing


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
        words.append(_say(rng, "size", obj.size, family))
    if material_as_adjective:
        words.append(_say(rng, "material_adj", spec.material, family))
    say_color = obj.color != V.DEFAULT_COLOR[obj.name] or "color" in force or rng.uniform() < p_optional
    if family.wide:
        return _wide_object_phrase(obj, words, obj.color if say_color else None, rng)
    if say_color:
        words.append(obj.color)
    if obj.count == 1:
        return _article(" ".join([*words, obj.name]))
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
        mods.append(_say(rng, "material", spec.material, family))
    if wants("style", spec.style == V.DEFAULT_STYLE):
        mods.append(_say(rng, "style", spec.style, family))
    if wants("lighting", spec.lighting == V.DEFAULT_LIGHTING):
        mods.append(_say(rng, "lighting", spec.lighting, family))
    if wants("camera", spec.camera == V.DEFAULT_CAMERA):
        mods.append(_say(rng, "camera", spec.camera, family))
    order = rng.permutation(len(mods))
    mods = [mods[i] for i in order]
    if rng.uniform() < p_optional / 3:
        mods.append(_say(rng, "distractor", "", family))
    separators = [", " if rng.uniform() < 0.6 else " " for _ in mods]
    values = {"m": "".join(sep + x for sep, x in zip(separators, mods)), "mp": "".join(x + ", " for x in mods)}
    if family.kind in ("pair", "relation"):
        values["a"], values["b"] = phrases
    elif family.kind in ("count", "mixed"):
        values["o"] = (_choice(rng, WIDE_JOINERS) if family.wide else " and ").join(phrases)
    else:
        values["o"] = phrases[0]
    if family.kind == "region":
        values["region"] = _say(rng, "region", spec.objects[0].positions[0], family)
    elif family.kind == "single" and (wants("position", True) and rng.uniform() < 0.3):
        values["o"] += " " + _say(rng, "region", "center", family)
    prompt = family.frame.format(**values)
    return " ".join(prompt.split())


def check_prompt(prompt: str, max_chars: int = 2000) -> str:
    """Normalise a user prompt (strip, collapse whitespace) or raise `InputError` naming the problem (empty, too
    long, a control character or an unpaired surrogate, as undecodable bytes give)."""
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
    text = " ".join(prompt.split())
    if not text:
        raise InputError("prompt is empty or whitespace only")
    control = next((i for i, ch in enumerate(text) if unicodedata.category(ch) in ("Cc", "Cs")), None)
    if control is not None:
        raise InputError(f"prompt has a control character (U+{ord(text[control]):04X}) at position {control}")
    if len(text) > max_chars:
        raise InputError(f"prompt has {len(text)} characters (max {max_chars})")
    return text


# The frame `plan_caption` says each kind of content in (training families: the words the base model knows).
CAPTION_FAMILIES = {
    "single": "single_bare",
    "region": "region_suffix",
    "pair": "pair_and",
    "count": "count_words",
    "mixed": "mixed_and",
    "left of": "rel_left_of",
    "above": "rel_above",
}


def plan_caption(plan, seed: int = 0) -> str:
    """A toy plan said in the training grammar's plainest frames (every color stated), e.g. for the base model's
    own text encoder: ``<OBJECT> 1 medium blue square at left <OBJECT> 1 medium red circle at right ...`` ->
    ``a medium blue square left of a medium red circle``. Deterministic for a given ``seed``.

    Two single objects side by side or stacked are said as a relation (the left or upper one first); other
    layouts in mention order. Raises `PlanError` if the plan is not a drawable toy plan.
    """
    draw, family = caption_draw(plan)
    return render_prompt(draw, family, np.random.default_rng(seed), p_optional=0.0, force=frozenset({"color"}))


def caption_draw(plan) -> tuple[SpecDraw, TemplateFamily]:
    """The spec of a toy plan (text or `Plan`) and the training family `plan_caption` says it with."""
    if isinstance(plan, str):
        plan = Plan.parse(plan, V.TOY_PLAN_SPEC)
    spec = SceneSpec.from_plan(plan)
    objects = spec.objects
    relation = None
    if len(objects) == 2 and all(o.count == 1 for o in objects):
        where = {o.positions[0]: o for o in objects}
        for first, second, rel in (("left", "right", "left of"), ("top", "bottom", "above")):
            if set(where) == {first, second}:
                spec = dataclasses.replace(spec, objects=(where[first], where[second]))
                relation = rel
    if relation is not None:
        kind, name = "relation", CAPTION_FAMILIES[relation]
    elif spec.n_instances == 1:
        kind = "single" if objects[0].positions[0] == "center" else "region"
        name = CAPTION_FAMILIES[kind]
    else:
        kind = "count" if len(objects) == 1 else "mixed"
        name = CAPTION_FAMILIES[kind]
    return SpecDraw(spec, kind, relation), next(f for f in FAMILIES if f.name == name)


def reading_order_plan(plan) -> str:
    """The same toy plan with its OBJECT entries in reading order (top to bottom, then left to right, by each
    entry's first position), COLOR following; the scene it describes is unchanged. Raises `PlanError` if the
    plan is not a drawable toy plan."""
    if isinstance(plan, str):
        plan = Plan.parse(plan, V.TOY_PLAN_SPEC)
    spec = SceneSpec.from_plan(plan)

    def key(o):
        x, y = V.REGION_CENTERS[o.positions[0]]
        return (y, x)

    objects = tuple(sorted(spec.objects, key=key))
    return dataclasses.replace(spec, objects=objects).to_plan().to_text()
