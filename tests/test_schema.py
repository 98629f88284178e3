"""Plan schema: exact round trips, validation, PlanError-only failures (fuzzed), repair."""

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.schema import (
    FIELD_TAGS,
    FIELDS,
    IMG_BEGIN,
    IMG_END,
    ObjectGrammar,
    Plan,
    PlanError,
    PlanObject,
    PlanSpec,
    repair_plan,
)
from toyworld import vocab as V

WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789,.-'", min_size=1, max_size=8)
FIELD_TEXT = st.lists(WORDS, min_size=1, max_size=6).map(" ".join)
LAX = PlanSpec(required=("OBJECT",))


@st.composite
def plans(draw):
    optional = {name.lower(): draw(st.none() | FIELD_TEXT) for name in FIELDS if name != "OBJECT"}
    objects = tuple(draw(st.lists(FIELD_TEXT, min_size=1, max_size=4)))
    return Plan(objects=objects, **optional)


@given(plans())
@settings(max_examples=300, deadline=None)
def test_parse_inverts_to_text(plan):
    text = plan.to_text()
    parsed = Plan.parse(text, LAX)
    assert parsed == plan
    assert parsed.to_text() == text


@given(plans(), st.text(alphabet=" \t\n", min_size=1, max_size=3))
@settings(max_examples=100, deadline=None)
def test_whitespace_is_normalised(plan, ws):
    messy = plan.to_text().replace(" ", ws)
    assert Plan.parse(messy, LAX) == plan


PIECES = [IMG_BEGIN, IMG_END, *FIELD_TAGS.values(), "<FOO>", "red", "circle", " ", "1 medium red circle at center", ""]


@given(st.lists(st.sampled_from(PIECES), max_size=20))
@settings(max_examples=500, deadline=None)
def test_fuzz_token_soup_raises_only_plan_error(pieces):
    text = " ".join(pieces)
    for spec in (None, LAX, V.TOY_PLAN_SPEC):
        try:
            plan = Plan.parse(text, spec)
        except PlanError as err:
            assert str(err)
        else:
            assert plan.to_text() == Plan.parse(plan.to_text(), spec).to_text()


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_fuzz_arbitrary_text_raises_only_plan_error(text):
    with contextlib.suppress(PlanError):
        Plan.parse(text)
    with contextlib.suppress(PlanError):
        repair_plan(text, V.TOY_PLAN_SPEC)


@given(plans(), st.data())
@settings(max_examples=200, deadline=None)
def test_fuzz_mutated_valid_plans_raise_only_plan_error(plan, data):
    words = plan.to_text().split(" ")
    i = data.draw(st.integers(0, len(words) - 1))
    op = data.draw(st.sampled_from(["drop", "dup", "swap", "junk"]))
    if op == "drop":
        del words[i]
    elif op == "dup":
        words.insert(i, words[i])
    elif op == "swap":
        j = data.draw(st.integers(0, len(words) - 1))
        words[i], words[j] = words[j], words[i]
    else:
        words.insert(i, data.draw(st.sampled_from(["<BAD>", "<", ">", "<IMG_BEGIN>", "\x00"])))
    with contextlib.suppress(PlanError):
        Plan.parse(" ".join(words), LAX)


CANONICAL = (
    "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 2 objects, side by side "
    "<OBJECT> 1 medium red circle at left <OBJECT> 1 medium blue square at right <COLOR> red, blue "
    "<MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"
)


def test_canonical_toy_plan_parses_with_structure():
    plan = Plan.parse(CANONICAL, V.TOY_PLAN_SPEC)
    assert plan.to_text() == CANONICAL
    objs = plan.structured_objects(V.OBJECT_GRAMMAR)
    assert objs[0] == PlanObject("circle", 1, "medium", "red", None, ("left",))
    assert objs[1].positions == ("right",)


@pytest.mark.parametrize(
    "text, field, words",
    [
        (CANONICAL.replace("<STYLE> plain background ", ""), "STYLE", "required"),
        (
            CANONICAL.replace("<COLOR> red, blue <MATERIAL>", "<MATERIAL> solid <COLOR> red, blue <MATERIAL>"),
            "COLOR",
            "comes after",
        ),
        (CANONICAL.replace("<CAMERA> medium shot", "<CAMERA> medium shot <CAMERA> wide shot"), "CAMERA", "repeats"),
        (CANONICAL.replace("<LIGHTING> normal light", "<LIGHTING>"), "LIGHTING", "empty"),
        (CANONICAL.replace("<LIGHTING> normal light", "<LIGHTING> disco light"), "LIGHTING", "vocabulary"),
        (CANONICAL.replace("1 medium red circle", "7 medium red circle"), "OBJECT", "count 7"),
        (CANONICAL.replace("red circle at left", "red hexagon at left"), "OBJECT", "no known object"),
        (CANONICAL.replace("<COLOR> red, blue", "<COLOR> " + "red " * 30), "COLOR", "tokens (max 24)"),
    ],
)
def test_errors_name_field_and_reason(text, field, words):
    with pytest.raises(PlanError) as info:
        Plan.parse(text, V.TOY_PLAN_SPEC)
    assert info.value.field == field
    assert words in str(info.value)
    assert f"field {field}" in str(info.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "start with"),
        ("<STYLE> x <IMG_END>", "start with"),
        ("hello " + CANONICAL, "text before"),
        (CANONICAL + " bye", "text after"),
        (CANONICAL.replace(" <IMG_END>", ""), "end with"),
        (CANONICAL.replace("<LAYOUT>", "<LAYOUTS>"), "unknown tag"),
    ],
)
def test_structural_errors(text, words):
    with pytest.raises(PlanError, match=words):
        Plan.parse(text)


def test_error_context_names_the_prompt():
    err = PlanError("has 41 tokens (max 32)", "COLOR").with_context("prompt #3")
    assert str(err) == "field COLOR has 41 tokens (max 32) in plan for prompt #3"


def test_non_string_plan_is_plan_error():
    with pytest.raises(PlanError, match="must be a str"):
        Plan.parse(None)  # type: ignore[arg-type]


def test_repair_fixes_what_can_be_fixed():
    broken = (
        "Sure! here is the plan: <OBJECT> 1 medium red circle at center <STYLE> plain backgrund <FOO> x "
        "<LIGHTING> <CAMERA> close-up shot"
    )
    result = repair_plan(broken, V.TOY_PLAN_SPEC)
    plan = result.plan
    assert plan.style == "plain background"  # closest vocabulary entry
    assert plan.lighting == "normal light"  # empty -> default
    assert plan.camera == "close-up shot"
    assert plan.objects == ("1 medium red circle at center",)
    assert plan.is_valid(V.TOY_PLAN_SPEC)
    joined = " | ".join(result.fixes)
    for expected in ["IMG_BEGIN", "IMG_END", "unknown tag <FOO>", "put fields in order", "empty LIGHTING"]:
        assert expected in joined


def test_repair_of_valid_plan_changes_nothing():
    result = repair_plan(CANONICAL, V.TOY_PLAN_SPEC)
    assert result.fixes == [] and result.plan.to_text() == CANONICAL


def test_repair_cuts_long_fields_and_drops_surplus_objects():
    spec = PlanSpec(required=("OBJECT",), max_field_tokens=3, max_objects=2)
    text = "<IMG_BEGIN> <STYLE> a b c d e <OBJECT> x <OBJECT> y <OBJECT> z <IMG_END>"
    result = repair_plan(text, spec)
    assert result.plan.style == "a b c"
    assert result.plan.objects == ("x", "y")


def test_repair_refuses_unrepairable():
    with pytest.raises(PlanError, match="OBJECT"):
        repair_plan("<IMG_BEGIN> <STYLE> plain background <IMG_END>", V.TOY_PLAN_SPEC)


def test_object_grammar():
    g = ObjectGrammar(
        names=frozenset({"circle", "tabby cat"}),
        colors=frozenset({"red"}),
        sizes=frozenset({"big"}),
        positions=frozenset({"left", "top left"}),
        max_count=3,
    )
    assert g.parse("2 big red tabby cat at left, top left") == PlanObject(
        "tabby cat", 2, "big", "red", None, ("left", "top left")
    )
    assert g.parse("1 circle") == PlanObject("circle")
    with pytest.raises(PlanError, match="places 1 instances but counts 2"):
        g.parse("2 circle at left")
    with pytest.raises(PlanError, match="in that order"):
        g.parse("1 red big circle")
    with pytest.raises(ValueError, match="unique"):
        ObjectGrammar(names=frozenset({"x"}), colors=frozenset({"big"}), sizes=frozenset({"big"}))
    for obj in [PlanObject("circle", 3, "big", "red", None, ("left", "left", "top left")), PlanObject("tabby cat")]:
        assert g.parse(obj.to_text()) == obj
