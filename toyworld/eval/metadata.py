"""ShapesEval prompts: GenEval-format ``evaluation_metadata.jsonl`` for the toy world.

Each line is a JSON object with GenEval's keys (``tag``, ``include``, ``exclude``, ``prompt``) plus ours:
``scene`` (plan-field requirements: ``style``, ``lighting``, ``camera`` (+ ``size``), ``material``),
``family`` (the template family of the prompt) and ``plan`` (its canonical plan, from which the
ground-truth scenes are drawn).

Tasks: GenEval's six (single_object, two_object, counting, colors, position, color_attr) and the four
plan-field tasks (style, lighting, camera, material).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from planner.schema import Plan, PlanError, PlanObject
from safeio import InputError, atomic_write_text, read_jsonl
from toyworld import vocab as V
from toyworld.grammar import families, render_prompt
from toyworld.scene import RELATIONS, SceneSpec, SpecDraw, default_slots

GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
FIELD_TASKS = ("style", "lighting", "camera", "material")
TASKS = GENEVAL_TASKS + FIELD_TASKS
DEFAULT_PER_TASK = {**{t: 100 for t in GENEVAL_TASKS}, **{t: 50 for t in FIELD_TASKS}}
POSITION_RELATIONS = tuple(RELATIONS)


class MetadataError(InputError):
    """A malformed metadata file or line; the message names the file and line."""


def _obj(shape: str, count: int, positions: tuple[str, ...], color: str | None = None) -> PlanObject:
    return PlanObject(shape, count, V.DEFAULT_SIZE, color or V.DEFAULT_COLOR[shape], None, positions)


def _two_shapes(rng: np.random.Generator) -> tuple[str, str]:
    a, b = rng.permutation(len(V.SHAPES))[:2]
    return V.SHAPES[a], V.SHAPES[b]


def _task_draw(task: str, rng: np.random.Generator) -> tuple[SpecDraw, dict, frozenset[str]]:
    """A spec for one prompt of ``task``, its metadata requirements, and what the prompt must mention."""
    shape = V.SHAPES[int(rng.integers(len(V.SHAPES)))]
    if task == "single_object":
        return (
            SpecDraw(SceneSpec((_obj(shape, 1, ("center",)),)), "single"),
            {"include": [{"class": shape, "count": 1}]},
            frozenset(),
        )
    if task == "two_object":
        a, b = _two_shapes(rng)
        spec = SceneSpec((_obj(a, 1, ("left",)), _obj(b, 1, ("right",))))
        return SpecDraw(spec, "pair"), {"include": [{"class": a, "count": 1}, {"class": b, "count": 1}]}, frozenset()
    if task == "counting":
        n = int(rng.integers(2, V.MAX_OBJECTS + 1))
        slots = default_slots(n)
        spec = SceneSpec((_obj(shape, n, slots),))
        meta = {"include": [{"class": shape, "count": n}], "exclude": [{"class": shape, "count": n + 1}]}
        return SpecDraw(spec, "count"), meta, frozenset()
    if task == "colors":
        color = list(V.COLORS)[int(rng.integers(len(V.COLORS)))]
        spec = SceneSpec((_obj(shape, 1, ("center",), color),))
        return (
            SpecDraw(spec, "single"),
            {"include": [{"class": shape, "count": 1, "color": color}]},
            frozenset({"color"}),
        )
    if task == "position":
        a, b = _two_shapes(rng)
        relation = POSITION_RELATIONS[int(rng.integers(len(POSITION_RELATIONS)))]
        pa, pb = RELATIONS[relation]
        spec = SceneSpec((_obj(a, 1, (pa,)), _obj(b, 1, (pb,))))
        meta = {"include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]}
        return SpecDraw(spec, "relation", relation), meta, frozenset()
    if task == "color_attr":
        a, b = _two_shapes(rng)
        ca, cb = (list(V.COLORS)[i] for i in rng.permutation(len(V.COLORS))[:2])
        spec = SceneSpec((_obj(a, 1, ("left",), ca), _obj(b, 1, ("right",), cb)))
        meta = {"include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]}
        return SpecDraw(spec, "pair"), meta, frozenset({"color"})
    if task in FIELD_TASKS:
        options = {
            "style": V.STYLES,
            "lighting": tuple(V.LIGHTING),
            "camera": tuple(V.CAMERA),
            "material": V.MATERIALS,
        }[task]
        value = options[int(rng.integers(len(options)))]
        spec = SceneSpec((_obj(shape, 1, ("center",)),), **{task: value})
        scene = {task: value, **({"size": V.DEFAULT_SIZE} if task == "camera" else {})}
        return SpecDraw(spec, "single"), {"include": [{"class": shape, "count": 1}], "scene": scene}, frozenset({task})
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def make_metadata(
    split: str = "heldout",
    seed: int = 0,
    per_task: dict[str, int] | None = None,
    p_optional: float = 0.25,
    wide: bool = False,
) -> list[dict]:
    """ShapesEval metadata entries: ``per_task`` prompts of each task, worded by ``split`` families.

    ``wide=True`` also draws from the widened grammar's families (training split only: more wordings of the same
    scenes, e.g. for mining preference pairs whose conditioning varies with the wording)."""
    if wide and split != "train":
        raise ValueError(f"wide families are all training families; split must be 'train', got {split!r}")
    per_task = per_task or DEFAULT_PER_TASK
    entries = []
    for t_index, task in enumerate(per_task):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
        rng = np.random.default_rng([seed, t_index])
        for _ in range(per_task[task]):
            draw, meta, force = _task_draw(task, rng)
            fams = families(split, draw.kind, draw.relation if draw.kind == "relation" else None, wide=wide)
            family = fams[int(rng.integers(len(fams)))]
            prompt = render_prompt(draw, family, rng, p_optional=p_optional, force=force)
            entry = {"tag": task, "include": meta["include"]}
            if "exclude" in meta:
                entry["exclude"] = meta["exclude"]
            if "scene" in meta:
                entry["scene"] = meta["scene"]
            entry.update(prompt=prompt, family=family.name, plan=draw.spec.to_plan().to_text())
            entries.append(entry)
    return entries


def write_metadata(entries: list[dict], path: str | Path) -> Path:
    """Write entries as JSONL atomically (temp file + rename)."""
    return atomic_write_text(Path(path), "".join(json.dumps(e) + "\n" for e in entries))


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise MetadataError(f"{where}: {msg}")


def validate_entry(entry: object, where: str = "entry") -> dict:
    """Check one metadata entry; raises `MetadataError` naming ``where`` and the fault."""
    _check(isinstance(entry, dict), where, f"must be a JSON object, got {type(entry).__name__}")
    assert isinstance(entry, dict)
    _check(isinstance(entry.get("tag"), str) and bool(entry.get("tag")), where, "needs a string 'tag'")
    _check(
        isinstance(entry.get("prompt"), str) and bool(str(entry.get("prompt")).strip()),
        where,
        "needs a non-empty string 'prompt'",
    )
    include = entry.get("include")
    _check(isinstance(include, list) and len(include) > 0, where, "needs a non-empty list 'include'")
    for key in ("include", "exclude"):
        items = entry.get(key, [])
        _check(isinstance(items, list), where, f"'{key}' must be a list")
        for i, req in enumerate(items):
            w = f"{where}: {key}[{i}]"
            _check(isinstance(req, dict), w, "must be an object")
            _check(req.get("class") in V.SHAPES, w, f"class {req.get('class')!r} is not one of {list(V.SHAPES)}")
            count = req.get("count", 1)
            _check(
                isinstance(count, int) and not isinstance(count, bool) and count >= 1,
                w,
                f"count {count!r} must be an integer >= 1",
            )
            if "color" in req:
                _check(req["color"] in V.COLORS, w, f"color {req['color']!r} is not one of {list(V.COLORS)}")
            if "material" in req:
                _check(req["material"] in V.MATERIALS, w, f"material {req['material']!r} is unknown")
            if "position" in req:
                pos = req["position"]
                ok = (
                    isinstance(pos, list)
                    and len(pos) == 2
                    and pos[0] in POSITION_RELATIONS
                    and isinstance(pos[1], int)
                    and 0 <= pos[1] < i
                )
                _check(
                    key == "include" and ok,
                    w,
                    f"position {pos!r} must be [relation, index of an earlier include], relations "
                    f"{list(POSITION_RELATIONS)}",
                )
    scene = entry.get("scene", {})
    _check(isinstance(scene, dict), where, "'scene' must be an object")
    allowed = {
        "style": V.STYLES,
        "lighting": tuple(V.LIGHTING),
        "camera": tuple(V.CAMERA),
        "material": V.MATERIALS,
        "size": tuple(V.SIZES),
    }
    for k, v in scene.items():
        _check(k in allowed, where, f"scene key {k!r} is not one of {list(allowed)}")
        _check(v in allowed[k], where, f"scene {k} {v!r} is not one of {list(allowed[k])}")
    if "plan" in entry:
        try:
            SceneSpec.from_plan(Plan.parse(entry["plan"]))
        except (PlanError, TypeError) as err:
            raise MetadataError(f"{where}: plan does not describe a toy scene: {err}") from None
    return entry


def read_metadata(path: str | Path) -> list[dict]:
    """Read and validate a metadata JSONL file; `MetadataError` names the file and line of any fault."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file {path} does not exist")
    entries = [validate_entry(entry, f"{path} line {n}") for n, entry in read_jsonl(path, MetadataError)]
    if not entries:
        raise MetadataError(f"metadata file {path} has no entries")
    return entries


def limit_per_task(entries: list[dict], n: int | None) -> list[dict]:
    """The first ``n`` entries of each task (all entries when ``n`` is None), in file order."""
    if n is None:
        return list(entries)
    counts: dict[str, int] = {}
    out = []
    for e in entries:
        counts[e["tag"]] = counts.get(e["tag"], 0) + 1
        if counts[e["tag"]] <= n:
            out.append(e)
    return out


def ground_truth_spec(entry: dict) -> SceneSpec:
    """The spec a metadata entry was made from (its ``plan``)."""
    if "plan" not in entry:
        raise MetadataError(f"entry for prompt {entry.get('prompt')!r} has no 'plan': cannot render ground truth")
    return SceneSpec.from_plan(Plan.parse(entry["plan"]))


def metadata_prompts(path: str | Path) -> tuple[list[str], list[str], list[str] | None]:
    """Prompts, canonical plans and sentence frames (each entry's ``family``; None unless every entry has one) of a
    ShapesEval metadata file (every entry needs a ``plan``)."""
    entries = read_metadata(path)
    missing = [i for i, e in enumerate(entries) if "plan" not in e]
    if missing:
        raise ValueError(f"metadata {path}: entries {missing[:5]} have no 'plan' to score a planner against")
    families = [e.get("family") for e in entries]
    return [e["prompt"] for e in entries], [e["plan"] for e in entries], None if None in families else families
