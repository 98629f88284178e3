"""Preference pairs mined from critic rankings (best-of-K candidates, refine trajectories), written as `datasets`
folders in the formats the preference trainers read:

- images in Pick-a-Pic's columns: ``caption``, ``jpg_0``, ``jpg_1`` (PNG bytes), ``label_0``, ``label_1`` (the
  preferred image gets 1), plus ``are_different`` and the critic scores ``score_0`` / ``score_1``;
- plans in TRL's preference columns: ``prompt``, ``chosen``, ``rejected``.

The labels come from the critic, never from the ShapesEval detector. A candidate set whose best and worst
critic scores are equal gives no pair (a tie); by default a set gives one pair, its best against its
worst, and ``PairWriter(all_pairs=True)`` every pair whose scores differ.

`load_preference_pairs` reads such pairs back, or Pick-a-Pic's own files (a local Parquet file or `datasets`
folder), into the form the preference trainers use: ``caption``, ``group``, ``image_w``, ``image_l``;
`reword_pairs` repeats pairs under other wordings of their captions; `self_play_plan_pairs` makes plan pairs from
a data set's own (prompt, plan) rows, the data's plan against the planner's differing plans (self-play, as SPIN);
`contrast_plan_pairs` makes minimal pairs from the same rows, the plan against a copy with its objects moved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from alignment.prepared import DataPrepError, decode_image, read_source, square_image
from planner.planner import Planner
from planner.schema import Plan, PlanError, PlanObject, PlanSpec, replace_fields
from safeio import atomic_dir

logger = logging.getLogger(__name__)

IMAGE_PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
PLAN_PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GROUP_COLUMN = "group"  # pairs that must stay on one side of a held-out split (one candidate set, its rewordings)


def reword_pairs(pairs: datasets.Dataset, reword: Callable[[list[str]], list[list[str]]],
                 caption_column: str = "caption") -> datasets.Dataset:  # fmt: skip
    """Pairs in Pick-a-Pic's columns, each kept and repeated under other wordings of its caption: ``reword(captions)``
    gives, per distinct caption, the alternative captions that ask for the same image (the caller's check: for the
    chain, the writer plans each the same). The images and labels are copied; a ``group`` column holds the caption
    a row came from, so a row and its rewordings stay on one side of a held-out split. The preference transfers
    because it is about the image against the plan, which the rewording keeps."""
    if caption_column not in pairs.column_names:
        raise DataPrepError(f"preference pairs have no column {caption_column!r} (columns: {pairs.column_names})")
    captions = list(dict.fromkeys(pairs[caption_column]))
    alternatives = reword(captions)
    if len(alternatives) != len(captions):
        raise ValueError(f"reword gave {len(alternatives)} lists for {len(captions)} captions")
    by_caption = dict(zip(captions, alternatives))
    groups = pairs[GROUP_COLUMN] if GROUP_COLUMN in pairs.column_names else pairs[caption_column]
    rows = []
    for row, group in zip(pairs, groups):
        rows.append({**row, GROUP_COLUMN: group})
        rows += [{**row, caption_column: alt, GROUP_COLUMN: group} for alt in by_caption[row[caption_column]]]
    features = pairs.features.copy()
    features[GROUP_COLUMN] = datasets.Value("string")
    return datasets.Dataset.from_list(rows, features=features)


class PairWriter:
    """Collects pairs; `save` writes ``<folder>/images`` and ``<folder>/plans`` (each only when it has rows).

    ``all_pairs=False`` keeps one pair per ranked candidate set (its best against its worst); ``all_pairs=True``
    keeps every pair of candidates whose critic scores differ (up to K(K-1)/2 per set, as Pick-a-Pic holds several
    pairs per prompt), each ordered by score."""

    def __init__(self, all_pairs: bool = False):
        self.all_pairs = all_pairs
        self.image_rows: list[dict] = []
        self.plan_rows: list[dict] = []

    def add_ranked(self, caption: str, images, scores: list[float]) -> bool:
        """Pairs from candidates ranked by critic score (see the class); False (no pair) when all scores tie."""
        scores = [float(s) for s in scores]
        if len(images) != len(scores):
            raise ValueError(f"{len(images)} images but {len(scores)} scores")
        if len(scores) < 2 or max(scores) == min(scores):
            return False
        if self.all_pairs:
            order = [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] > scores[j]]
        else:
            order = [(int(np.argmax(scores)), int(np.argmin(scores)))]
        for w, lo in order:
            self.image_rows.append(
                {"caption": caption, "jpg_0": _png(images[w]), "jpg_1": _png(images[lo]), "label_0": 1.0,
                 "label_1": 0.0, "are_different": True, "score_0": scores[w], "score_1": scores[lo]}
            )  # fmt: skip
        return True

    def add_plans(self, prompt: str, chosen: str, rejected: str) -> None:
        if chosen != rejected:
            self.plan_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})

    def save(self, folder: str | Path) -> dict[str, int]:
        """Write the pairs (atomically per folder); returns the row counts."""
        folder = Path(folder)
        counts = {"images": len(self.image_rows), "plans": len(self.plan_rows)}
        if self.image_rows:
            features = datasets.Features(
                {"caption": datasets.Value("string"), "jpg_0": datasets.Value("binary"),
                 "jpg_1": datasets.Value("binary"), "label_0": datasets.Value("float32"),
                 "label_1": datasets.Value("float32"), "are_different": datasets.Value("bool"),
                 "score_0": datasets.Value("float32"), "score_1": datasets.Value("float32")}
            )  # fmt: skip
            _save(datasets.Dataset.from_list(self.image_rows, features=features), folder / "images")
        if self.plan_rows:
            _save(datasets.Dataset.from_list(self.plan_rows), folder / "plans")
        return counts


def self_play_plan_pairs(
    planner: Planner,
    rows: Sequence[tuple[str, str]],
    same: Callable[[Plan, Plan | None], bool],
    *,
    samples: int = 3,
    temperature: float = 1.0,
    seed: int = 0,
    spec: PlanSpec | None = None,
    batch_size: int = 64,
) -> tuple[PairWriter, dict[str, int]]:
    """Plan pairs by self-play (SPIN, Chen et al. 2024): for each ``(prompt, plan)`` row of a training set, the
    planner's greedy plan and ``samples`` sampled plans (``temperature``, a generator seeded by ``seed``); every
    distinct one that ``same(data plan, plan)`` calls different is the rejected side of a pair whose chosen side
    is the row's own plan. The preference comes from the data the planner was trained on, never from a judge of
    images. Returns a `PairWriter` holding the pairs and a report: rows, greedy plans right, rows with a pair,
    pairs."""
    if samples < 0 or temperature <= 0:
        raise ValueError(f"samples must be >= 0 and temperature > 0, got {samples} and {temperature}")
    if not rows:
        raise DataPrepError("self-play plan pairs: no rows")
    writer = PairWriter()
    prompts, gold = [prompt for prompt, _ in rows], _data_plans(rows, spec, "self-play plan pairs")
    generator = torch.Generator().manual_seed(seed)
    runs = []
    for k in tqdm(range(samples + 1), desc="writing plans (greedy, then sampled)"):
        runs.append(planner.plan(prompts, batch_size=batch_size, do_sample=k > 0, temperature=temperature,
                                 generator=generator if k > 0 else None))  # fmt: skip
    report = {"rows": len(rows), "greedy_right": 0, "rows_with_pair": 0, "pairs": 0}
    for i, (prompt, want) in enumerate(zip(prompts, gold)):
        plans = [r[i].plan for r in runs]  # greedy first
        right = [bool(same(want, plan)) for plan in plans]
        report["greedy_right"] += right[0]
        wrong = {plan.to_text() for plan, ok in zip(plans, right) if plan is not None and not ok}
        for text in sorted(wrong):
            writer.add_plans(prompt, want.to_text(), text)
        report["rows_with_pair"] += bool(wrong)
        report["pairs"] += len(wrong)
    return writer, report


# Hard negatives of `contrast_plan_pairs`: each two-slot region mirrored, or moved to the other arrangement.
MIRRORED = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
REARRANGED = {"left": "top", "right": "bottom", "top": "left", "bottom": "right"}
CONTRASTS = ("mirror", "rearrange", "color", "extra", "copy", "shape")
DEFAULT_CONTRASTS = ("mirror", "rearrange", "color")  # the two-slot kinds (the first contrast pairs' set)


def contrast_plan_pairs(
    rows: Sequence[tuple[str, str]], spec: PlanSpec, kinds: Sequence[str] = DEFAULT_CONTRASTS
) -> tuple[PairWriter, dict[str, int]]:
    """Minimal-pair plan pairs: for each ``(prompt, plan)`` row the row's plan is chosen against copies of it that
    change one thing. Where the objects sit in two-slot regions (side by side or stacked):

    - ``mirror``: every region mirrored (left <-> right, top <-> bottom): the objects trade places;
    - ``rearrange``: side by side becomes stacked and back (left -> top, right -> bottom);
    - ``color``: the COLOR field repeats the first object's color for every object (only where colors differ).

    Where the plan holds one object, once (``1 ...``, wherever it is placed):

    - ``extra``: a second object the prompt never asked for (another shape and color) beside it, side by side;
    - ``copy``: the same, with the second object the same shape in another color;
    - ``shape``: the object drawn as another shape.

    The other shape and color are drawn from the grammar by a generator seeded with the plan's text (reproducible).

    LAYOUT and COLOR of a moved plan are derived again (``spec.derive``), so a rejected plan is a coherent
    scene that says something else, except under ``color``, whose COLOR contradicts its objects. A mirror that
    leaves the scene the same (two like objects) gives no pair. The preference comes from the data's own plans:
    no planner runs, no image is judged. Returns a `PairWriter` and a report (rows, rows with a pair, pairs per
    kind)."""
    unknown = sorted(set(kinds) - set(CONTRASTS))
    if unknown or not kinds:
        raise ValueError(f"contrast kinds must be some of {CONTRASTS}, got {list(kinds)}")
    if spec.object_grammar is None or spec.derive is None:
        raise ValueError("contrast_plan_pairs needs a plan spec with an object grammar and derive")
    if not rows:
        raise DataPrepError("contrast plan pairs: no rows")
    writer = PairWriter()
    report = {"rows": len(rows), "rows_with_pair": 0, **{k: 0 for k in kinds}}
    for (prompt, _), plan in zip(rows, _data_plans(rows, spec, "contrast plan pairs")):
        negatives = _contrasts(plan, spec, kinds)
        for kind, rejected in negatives.items():
            writer.add_plans(prompt, plan.to_text(), rejected.to_text())
            report[kind] += 1
        report["rows_with_pair"] += bool(negatives)
    report["pairs"] = sum(report[k] for k in kinds)
    return writer, report


def _contrasts(plan: Plan, spec: PlanSpec, kinds: Sequence[str]) -> dict[str, Plan]:
    """The hard negatives of one plan by kind (`contrast_plan_pairs`): the two-slot kinds where every object is
    placed in a two-slot region, the one-object kinds where the plan holds one object once."""
    objects = plan.structured_objects(spec.object_grammar)
    if not objects:
        return {}
    if all(o.positions and not set(o.positions) - set(MIRRORED) for o in objects):
        return _two_slot_contrasts(plan, objects, spec, kinds)
    if len(objects) == 1 and objects[0].count == 1:
        return _one_object_contrasts(plan, objects[0], spec, kinds)
    return {}


def _two_slot_contrasts(plan: Plan, objects: list[PlanObject], spec: PlanSpec, kinds) -> dict[str, Plan]:
    out: dict[str, Plan] = {}
    for kind, table in (("mirror", MIRRORED), ("rearrange", REARRANGED)):
        if kind not in kinds:
            continue
        moved = [dataclasses.replace(o, positions=tuple(table[p] for p in o.positions)) for o in objects]
        if _placements(moved) != _placements(objects):
            out[kind] = _with_objects(plan, moved, spec)
    colors = [o.color for o in objects]
    if "color" in kinds and None not in colors and len(set(colors)) > 1:
        out["color"] = replace_fields(plan, color=", ".join([colors[0]] * len(colors)))
    return out


def _one_object_contrasts(plan: Plan, obj: PlanObject, spec: PlanSpec, kinds) -> dict[str, Plan]:
    grammar = spec.object_grammar
    rng = random.Random(plan.to_text())  # str seeds are hashed by sha512: the same draw in every process
    shape = rng.choice(sorted(grammar.names - {obj.name}))
    out: dict[str, Plan] = {}
    for kind, name in (("extra", shape), ("copy", obj.name)):
        if kind not in kinds or not grammar.colors or not {"left", "right"} <= grammar.positions:
            continue
        other = dataclasses.replace(obj, name=name, color=rng.choice(sorted(grammar.colors - {obj.color})))
        sides = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
        pair = [dataclasses.replace(obj, positions=(sides[0],)), dataclasses.replace(other, positions=(sides[1],))]
        out[kind] = _with_objects(plan, sorted(pair, key=lambda o: o.positions != ("left",)), spec)
    if "shape" in kinds:
        out["shape"] = _with_objects(plan, [dataclasses.replace(obj, name=shape)], spec)
    return out


def _with_objects(plan: Plan, objects: Sequence[PlanObject], spec: PlanSpec) -> Plan:
    """``plan`` with these OBJECT entries and its LAYOUT and COLOR derived again from them."""
    texts = tuple(o.to_text() for o in objects)
    derived = spec.derive([(n, t) for n, t in plan.fields() if n != "OBJECT"] + [("OBJECT", t) for t in texts])
    return replace_fields(plan, objects=texts, **_lower(derived))


def _data_plans(rows: Sequence[tuple[str, str]], spec: PlanSpec | None, what: str) -> list[Plan]:
    """The parsed plan of each ``(prompt, plan)`` row; one that does not parse is a `DataPrepError` naming the row."""
    plans = []
    for i, (prompt, text) in enumerate(rows):
        try:
            plans.append(Plan.parse(text, spec))
        except PlanError as err:
            raise DataPrepError(f"{what}, row {i} ({prompt!r}): its plan does not parse: {err}") from None
    return plans


def _placements(objects: Sequence[PlanObject]) -> list[tuple[str, str]]:
    """What sits where: (the object without its regions, region) per instance, sorted."""
    return sorted((dataclasses.replace(o, positions=()).to_text(), p) for o in objects for p in o.positions)


def _lower(fields: dict[str, str]) -> dict[str, str]:
    return {name.lower(): text for name, text in fields.items()}


def _save(ds: datasets.Dataset, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        ds.save_to_disk(str(tmp))


def _score_gaps(ds, columns: tuple[str, str], path) -> list[float]:
    """``|score_0 - score_1|`` per row; a missing or non-finite score is a `DataPrepError` naming row and column."""
    gaps = []
    for i, pair in enumerate(zip(ds[columns[0]], ds[columns[1]])):
        for column, value in zip(columns, pair):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataPrepError(f"preference data {path}, row {i}: {column} is {value!r}, not a finite number")
        gaps.append(abs(float(pair[0]) - float(pair[1])))
    return gaps


def load_preference_pairs(
    path: str | Path | Sequence[str | Path],
    *,
    resolution: int = 512,
    center_crop: bool = True,
    caption_column: str = "caption",
    image_columns: tuple[str, str] = ("jpg_0", "jpg_1"),
    label_column: str = "label_0",
    seed: int = 0,
    min_score_gap: float = 0.0,
    score_columns: tuple[str, str] = ("score_0", "score_1"),
    with_report: bool = False,
):
    """Image preference pairs in Pick-a-Pic's format, as a `datasets.Dataset` with ``caption``, ``image_w`` (the
    preferred image) and ``image_l``, both decoded and resized to ``resolution`` (shorter side, then a square
    crop: centred, or seeded random with ``center_crop=False``; 512 is SD1.5's, pass the base model's), and
    ``group``: the source's ``group`` column where it has one (`reword_pairs` writes it: the caption a reworded
    pair came from), else the caption; trainers keep a group's pairs on one side of a held-out split.

    ``path``: a local Parquet file or `datasets` folder with ``caption``, ``jpg_0``, ``jpg_1`` (image bytes) and
    ``label_0`` (1: ``jpg_0`` preferred, 0: ``jpg_1`` preferred, 0.5: a tie). Dropped, and counted in the report
    (logged; returned too with ``with_report=True``): ties, rows with ``are_different == False``, and rows with an
    empty caption. A missing column, a label outside [0, 1] or an unreadable image is a `DataPrepError` naming
    the file, row and column.

    ``min_score_gap > 0`` keeps only pairs whose labeller scores (``score_columns``, as AI-feedback miners such as
    ``PairWriter`` write them) differ by at least that much; the rest are counted as ``small_gap``. Pick-a-Pic has
    no scores: asking for a gap there is an error naming the missing column.

    ``path`` may also be a list of such sources (pairs mined in several runs): each is read with the same options,
    the kept pairs are concatenated in order, and the report sums the counts."""
    if resolution < 8:
        raise DataPrepError(f"resolution must be >= 8, got {resolution}")
    if isinstance(path, (list, tuple)):
        return _load_several(list(path), with_report=with_report, resolution=resolution, center_crop=center_crop,
                             caption_column=caption_column, image_columns=image_columns, label_column=label_column,
                             seed=seed, min_score_gap=min_score_gap, score_columns=score_columns)  # fmt: skip
    ds = read_source(path)
    needed = (caption_column, *image_columns, label_column, *(score_columns if min_score_gap > 0 else ()))
    for column in needed:
        if column not in ds.column_names:
            raise DataPrepError(f"preference data {path} has no column {column!r} (columns: {ds.column_names})")
    kept, report = _kept_rows(ds, path, caption_column, label_column, min_score_gap, score_columns)
    logger.info("preference pairs from %s: %s", path, report)
    first, second = image_columns

    def to_pair(row: dict, i: int) -> dict:
        win, lose = (first, second) if float(row[label_column]) > 0.5 else (second, first)
        rng = np.random.default_rng([seed, i])
        images = {}
        for key, column in (("image_w", win), ("image_l", lose)):
            image = decode_image(row[column], f"preference data {path}, row {i}, column {column!r}")
            images[key] = Image.fromarray(square_image(image, resolution, center_crop, rng))
        caption = " ".join(row[caption_column].split())
        return {"caption": caption, GROUP_COLUMN: row.get(GROUP_COLUMN) or caption, **images}

    features = datasets.Features(
        {"caption": datasets.Value("string"), GROUP_COLUMN: datasets.Value("string"), "image_w": datasets.Image(),
         "image_l": datasets.Image()}
    )  # fmt: skip
    index = np.asarray(kept, dtype=np.int64)
    options = (resolution, center_crop, caption_column, image_columns, label_column, seed, min_score_gap)
    pairs = ds.select(index).map(
        lambda row, j: to_pair(row, int(index[j])), with_indices=True, remove_columns=ds.column_names,
        features=features, desc="decoding preference pairs", load_from_cache_file=False,
        cache_file_name=_decoded_cache_file(ds, index, options),
    )  # fmt: skip
    return (pairs, report) if with_report else pairs


def _decoded_cache_file(ds, index: np.ndarray, options: tuple) -> str | None:
    """Where `load_preference_pairs` writes the decoded pairs of a file-backed source (a `datasets` folder, an image
    folder): the `datasets` cache, named by the source files, the kept rows and the options, not the source folder,
    which `Dataset.map` would otherwise fill with ``cache-*.arrow`` files. None (in memory) for an in-memory source."""
    if not ds.cache_files:
        return None
    kept = hashlib.sha256(index.tobytes()).hexdigest()
    key = repr(([str(Path(f["filename"]).resolve()) for f in ds.cache_files], kept, options))
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "plan2img_preference_pairs"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"pairs-{name}.arrow")


def _kept_rows(ds, path, caption_column: str, label_column: str, min_score_gap: float,
               score_columns: tuple[str, str]) -> tuple[list[int], dict[str, int]]:  # fmt: skip
    """The rows `load_preference_pairs` keeps, and the report counting the dropped ones by reason."""
    labels = ds[label_column]
    different = ds["are_different"] if "are_different" in ds.column_names else [True] * len(ds)
    gaps = _score_gaps(ds, score_columns, path) if min_score_gap > 0 else [np.inf] * len(ds)
    report = {"rows": len(ds), "ties": 0, "not_different": 0, "empty_caption": 0, "small_gap": 0}
    kept = []
    for i, (label, diff, caption, gap) in enumerate(zip(labels, different, ds[caption_column], gaps)):
        if label is None or float(label) not in (0.0, 0.5, 1.0):
            raise DataPrepError(f"preference data {path}, row {i}: {label_column} is {label!r}, not 0, 1 or 0.5")
        if diff is False:
            report["not_different"] += 1
        elif float(label) == 0.5:
            report["ties"] += 1
        elif not (caption or "").strip():
            report["empty_caption"] += 1
        elif gap < min_score_gap:
            report["small_gap"] += 1
        else:
            kept.append(i)
    report["kept"] = len(kept)
    return kept, report


def _load_several(paths: list, with_report: bool, **options):
    """`load_preference_pairs` over several sources: kept pairs concatenated, reports summed."""
    if not paths:
        raise DataPrepError("preference data: an empty list of sources")
    loaded = [load_preference_pairs(p, with_report=True, **options) for p in paths]
    pairs = datasets.concatenate_datasets([ds for ds, _ in loaded])
    report = {key: sum(r[key] for _, r in loaded) for key in loaded[0][1]}
    return (pairs, report) if with_report else pairs
