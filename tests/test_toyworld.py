"""Toy world: scene <-> plan exactness, renderer determinism, grammar split, data set build."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from prompt_reader import read_prompt

from planner.schema import Plan, PlanError, PlanObject
from toyworld import augment as A
from toyworld import vocab as V
from toyworld.data import build_dataset, images_array, load_dataset_dir, make_example, make_prompt_example, preview
from toyworld.eval.metadata import GENEVAL_TASKS, read_metadata
from toyworld.grammar import (
    BASE_PHRASES,
    FAMILIES,
    HELDOUT_PHRASES,
    WIDE_FAMILIES,
    WIDE_PHRASES,
    families,
    render_prompt,
)
from toyworld.render import render
from toyworld.scene import KINDS, Scene, SceneSpec, SpecDraw, sample_spec, sample_stacked, spec_to_scene


def test_spec_plan_scene_round_trips(rng):
    for _ in range(400):
        draw = sample_spec(rng)
        plan = draw.spec.to_plan()
        assert plan.is_valid(V.TOY_PLAN_SPEC)
        assert SceneSpec.from_plan(Plan.parse(plan.to_text(), V.TOY_PLAN_SPEC)) == draw.spec  # plan -> spec exact
        scene = spec_to_scene(draw.spec, rng)
        assert scene.to_spec() == draw.spec  # scene -> spec exact, jitter never changes a region
        assert Scene.from_json(json.loads(json.dumps(scene.to_json()))) == scene


def test_every_kind_samples_and_fits_the_canvas(rng):
    for kind in KINDS:
        for _ in range(50):
            scene = spec_to_scene(sample_spec(rng, kind).spec, rng)
            boxes = [
                (i.cx - i.extent / 2, i.cy - i.extent / 2, i.cx + i.extent / 2, i.cy + i.extent / 2)
                for i in scene.instances
            ]
            for x0, y0, x1, y1 in boxes:
                assert x0 >= 0 and y0 >= 0 and x1 <= V.IMAGE_SIZE and y1 <= V.IMAGE_SIZE
            for i, a in enumerate(boxes):  # objects never touch: a gap of >= 3 px on some axis
                for b in boxes[i + 1 :]:
                    gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                    assert gap >= 3 - 1e-6


@pytest.mark.parametrize(
    "objects, kwargs, words",
    [
        ((PlanObject("hexagon", 1, "medium", "red", None, ("center",)),), {}, "unknown shape"),
        ((PlanObject("circle", 2, "medium", "red", None, ("left",)),), {}, "one position per instance"),
        (
            (
                PlanObject("circle", 1, "large", "red", None, ("left",)),
                PlanObject("star", 1, "large", "red", None, ("right",)),
            ),
            {"camera": "close-up"},
            "do not fit",
        ),
        (
            (
                PlanObject("circle", 1, "medium", "red", None, ("left",)),
                PlanObject("circle", 1, "medium", "red", None, ("right",)),
            ),
            {},
            "merge",
        ),
    ],
)
def test_undrawable_specs_are_rejected(objects, kwargs, words):
    with pytest.raises(ValueError, match=words):
        SceneSpec(objects, **kwargs)


def test_plan_contradicting_itself_is_plan_error():
    plan = sample_spec(np.random.default_rng(0), "pair").spec.to_plan()
    bad = Plan.parse(plan.to_text().replace("side by side", "stacked"))
    with pytest.raises(PlanError, match="LAYOUT"):
        SceneSpec.from_plan(bad)


def test_renderer_is_deterministic_and_antialiased(rng):
    for _ in range(20):
        scene = spec_to_scene(sample_spec(rng).spec, rng)
        a, b = render(scene), render(Scene.from_json(scene.to_json()))
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
        assert a.tobytes() == b.tobytes()
    scene = spec_to_scene(sample_spec(np.random.default_rng(3), "single", default_fields=True).spec, rng)
    img = render(scene).astype(int)
    bg = img[0, 0]
    obj = np.asarray(V.COLORS[scene.instances[0].color]) * 255 * V.LIGHTING[scene.lighting]
    # anti-aliasing: pixels strictly between background and object color exist on the edge
    t = ((img - bg) * (obj - bg)).sum(-1) / ((obj - bg) ** 2).sum()
    assert ((t > 0.2) & (t < 0.8)).sum() > 10


def test_lighting_scales_the_whole_image():
    spec = SceneSpec((PlanObject("circle", 1, "medium", "red", None, ("center",)),), lighting="bright")
    scene = spec_to_scene(spec, np.random.default_rng(0))
    bright = render(scene).astype(float)
    dim = render(Scene.from_json({**scene.to_json(), "lighting": "dim"})).astype(float)
    ratio = dim[bright > 60].sum() / bright[bright > 60].sum()
    assert abs(ratio - V.LIGHTING["dim"] / V.LIGHTING["bright"]) < 0.01


def test_grammar_has_split_families_for_every_kind():
    assert len(FAMILIES) >= 30
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    train, held = families("train"), families("heldout")
    assert {f.name for f in train}.isdisjoint({f.name for f in held})
    assert {f.frame for f in held}.isdisjoint({f.frame for f in train})  # held-out frames are new sentences
    for kind in KINDS:
        assert families("train", kind) and families("heldout", kind), kind
    for rel in ("left of", "right of", "above", "below"):
        assert families("train", "relation", rel) and families("heldout", "relation", rel)
    # the widened grammar: training families only, new names and frames, every kind and relation widened
    wide = families("train", wide=True)
    assert families("heldout", wide=True) == held and families("train") == train  # wide=False: the old grammar
    assert all(f.split == "train" and f.wide for f in WIDE_FAMILIES)
    assert len({f.name for f in FAMILIES + WIDE_FAMILIES}) == len(FAMILIES) + len(WIDE_FAMILIES)
    assert {f.frame for f in held}.isdisjoint({f.frame for f in wide})
    for kind in (*KINDS, "stacked"):
        assert len([f for f in WIDE_FAMILIES if f.kind == kind]) >= 5, kind
    for rel in ("left of", "right of", "above", "below"):
        assert len(families("train", "relation", rel, wide=True)) >= len(families("train", "relation", rel)) + 5


def _says(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text.lower()) is not None


def test_training_wording_avoids_the_heldout_phrases():
    # every held-out frame has a distinctive phrase, so the list is what makes held-out sentences new
    for fam in families("heldout"):
        assert any(_says(fam.frame, p) for p in HELDOUT_PHRASES), fam.name
    training_texts = [f.frame for f in families("train", wide=True)]
    training_texts += [
        p for tables in (BASE_PHRASES, WIDE_PHRASES) for t in tables.values() for v in t.values() for p in v
    ]
    training_texts += A.POLITE_PREFIXES + A.POLITE_SUFFIXES + A.CHATTER_PREFIXES + A.CHATTER_SUFFIXES
    for text in training_texts:
        assert not [p for p in HELDOUT_PHRASES if _says(text, p)], text
    for i in range(2000):  # and so do rendered, augmented training rows
        prompt = make_prompt_example(5, i)["prompt"]
        assert not [p for p in HELDOUT_PHRASES if _says(prompt, p)], prompt


def _draw_for(family, rng):
    if family.kind == "stacked":
        return sample_stacked(rng)
    while True:
        draw = sample_spec(rng, family.kind)
        if family.kind != "relation" or draw.relation == family.relation:
            return draw


@pytest.mark.parametrize("family", FAMILIES + WIDE_FAMILIES, ids=lambda f: f.name)
def test_prompts_read_back_to_their_spec(family):
    rng = np.random.default_rng([7, len(family.name)])
    noisy = A.AugmentConfig(p_chatter=0.5, p_polite=0.5, p_typo=1.0, max_typos=3, p_case=0.5, p_punct=0.5)
    for i in range(24):
        draw = _draw_for(family, rng)
        prompt = render_prompt(draw, family, rng, p_optional=(0.0, 0.3, 1.0)[i % 3])
        assert read_prompt(prompt, family) == draw.spec, prompt
        if family.split == "train":  # augmentation is for training prompts only
            noisy_prompt = A.augment_prompt(prompt, rng, noisy)
            assert read_prompt(noisy_prompt, family) == draw.spec, noisy_prompt


def test_wide_rows_are_reproducible_and_their_plans_parse():
    rows = [make_prompt_example(3, i) for i in range(300)]
    assert rows == [make_prompt_example(3, i) for i in range(300)]
    assert [r["prompt"] for r in rows] != [make_prompt_example(4, i)["prompt"] for i in range(300)]
    assert {r["kind"] for r in rows} == {*KINDS, "stacked"}
    assert any(r["family"].startswith("wide_") for r in rows) and any(
        r["family"] in {f.name for f in FAMILIES} for r in rows
    )
    for r in rows:
        SceneSpec.from_plan(Plan.parse(r["plan"], V.TOY_PLAN_SPEC))
    assert make_prompt_example(3, 0, augment=None)["plan"] == rows[0]["plan"]


def test_augmentation_is_reproducible_from_the_seed():
    prompts = [make_prompt_example(9, i, augment=None)["prompt"] for i in range(200)]

    def run(seed):
        rng = np.random.default_rng(seed)
        return [A.augment_prompt(p, rng) for p in prompts]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) != prompts


def test_typos_never_touch_protected_words():
    rng = np.random.default_rng(0)
    cfg = A.AugmentConfig(p_chatter=0.0, p_polite=0.0, p_typo=1.0, max_typos=4, p_case=0.0, p_punct=0.0)
    changed = 0
    for i in range(1000):
        prompt = make_prompt_example(11, i, augment=None)["prompt"]
        out = A.augment_prompt(prompt, rng, cfg)
        pairs = list(zip(prompt.split(" "), out.split(" "), strict=True))  # typos neither add nor remove words
        assert all(a == b or not A.is_protected(a) for a, b in pairs), (prompt, out)
        assert all(a == b or not A.is_protected(b) for a, b in pairs), (prompt, out)  # nor spell a protected one
        changed += prompt != out
    assert changed > 300
    for w in ("red", "circles", "three", "3", "medium-sized", "left", "beneath", "outline", "and", "close-up"):
        assert A.is_protected(w), w
    assert not A.is_protected("draw") and not A.is_protected("please")


def _edit_kind(word: str, out: str) -> str:
    if len(out) == len(word) - 1 and any(word[:i] + word[i + 1 :] == out for i in range(len(word))):
        return "drop"
    if len(out) == len(word) + 1 and any(word[:i] + word[i] + word[i:] == out for i in range(len(word))):
        return "double"
    swaps = [word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(len(word) - 1)]
    return "swap" if out in swaps else "other"


def test_typo_is_one_swap_drop_or_double():
    kinds = Counter(_edit_kind("please", A.typo("please", np.random.default_rng(s))) for s in range(100))
    assert set(kinds) == {"swap", "drop", "double"}


def test_handwritten_prompts_are_canonical_and_cover_the_tasks():
    entries = read_metadata("toyworld/eval/data/handwritten.jsonl")
    assert 45 <= len(entries) <= 80
    assert {e["family"] for e in entries} == {"handwritten"}
    assert set(GENEVAL_TASKS) <= {e["tag"] for e in entries}
    assert len({e["prompt"] for e in entries}) == len(entries)
    for e in entries:
        spec = SceneSpec.from_plan(Plan.parse(e["plan"], V.TOY_PLAN_SPEC))
        assert spec.to_plan().to_text() == e["plan"]  # the canonical text of its plan
        assert Counter((r["class"], r.get("count", 1)) for r in e["include"]) == Counter(
            (o.name, o.count) for o in spec.objects
        ), e["prompt"]
        for r in e["include"]:
            if "color" in r:
                assert any(o.name == r["class"] and o.color == r["color"] for o in spec.objects), e["prompt"]
        for field, value in e.get("scene", {}).items():
            if field != "size":
                assert getattr(spec, field) == value, e["prompt"]


def test_heldout_prompts_are_never_training_prompts():
    def prompts(split, seed):
        rng = np.random.default_rng(seed)
        out = set()
        for _ in range(3000):
            draw = sample_spec(rng)
            fams = families(split, draw.kind, draw.relation if draw.kind == "relation" else None)
            out.add(render_prompt(draw, fams[int(rng.integers(len(fams)))], rng))
        return out

    assert prompts("heldout", 1).isdisjoint(prompts("train", 2))


def test_prompts_mention_every_non_default_attribute(rng):
    draw = SpecDraw(
        SceneSpec(
            (PlanObject("star", 1, "large", "purple", None, ("center",)),),
            style="vignette",
            lighting="dim",
            camera="wide",
            material="outlined",
        ),
        "single",
    )
    for fam in families(kind="single"):
        text = render_prompt(draw, fam, rng, p_optional=0.0)
        assert "purple" in text and "star" in text
        assert any(w in text for w in ("large", "big"))
        assert "vignette" in text
        assert any(w in text for w in ("dim", "low light"))
        assert any(w in text for w in ("wide", "far", "distance"))
        assert any(w in text for w in ("outline", "hollow"))


def test_render_prompt_rejects_mismatched_family(rng):
    draw = sample_spec(rng, "count")
    with pytest.raises(ValueError, match="says single content"):
        render_prompt(draw, families(kind="single")[0], rng)


def test_examples_are_deterministic_per_index():
    a, b = make_example(7, 11), make_example(7, 11)
    assert a["prompt"] == b["prompt"] and a["image"].tobytes() == b["image"].tobytes()
    assert make_example(7, 12)["prompt"] != a["prompt"] or make_example(7, 12)["plan"] != a["plan"]


def test_data_build_and_preview(tmp_path):
    out = tmp_path / "ds"
    stats = build_dataset(out, n=40, seed=3, workers=1, progress=False)
    assert stats["n"] == 40
    ds = load_dataset_dir(out)
    assert len(ds) == 40 and set(ds.column_names) >= {"image", "prompt", "plan", "scene", "family", "split"}
    imgs = images_array(ds)
    assert imgs.shape == (40, 64, 64, 3)
    row = ds[5]
    ref = make_example(3, 5)
    assert row["prompt"] == ref["prompt"] and np.array_equal(imgs[5], ref["image"])
    assert SceneSpec.from_plan(Plan.parse(row["plan"])) == Scene.from_json(row["scene"]).to_spec()
    grid = preview(tmp_path / "grid.png", data=out, n=6)
    assert grid.stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_dir(tmp_path / "missing")
