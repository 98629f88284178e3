"""Toy world: scene <-> plan exactness, renderer determinism, grammar split, data set build."""

import json

import numpy as np
import pytest

from planner.schema import Plan, PlanError, PlanObject
from toyworld import vocab as V
from toyworld.data import build_dataset, images_array, load_dataset_dir, make_example, preview
from toyworld.grammar import FAMILIES, families, render_prompt
from toyworld.render import render
from toyworld.scene import KINDS, Scene, SceneSpec, SpecDraw, sample_spec, spec_to_scene


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
