"""Build toy-world data sets (Hugging Face `datasets` on disk) and previews a person can look at.

Row ``i`` of a data set built with seed ``s`` depends only on ``(s, i)``: the same command gives the same
data set with any number of worker processes.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from safeio import InputError, atomic_dir, atomic_write_bytes
from toyworld.augment import DEFAULT_AUGMENT, AugmentConfig, augment_prompt
from toyworld.grammar import families, render_prompt
from toyworld.render import render
from toyworld.scene import SpecDraw, sample_spec, sample_stacked, spec_to_scene

COLUMNS = ("image", "prompt", "plan", "scene", "family", "kind", "split")
# Kinds of widened-grammar planner rows: relations and pairs (what the planner misread most) a bit more often.
WIDE_KIND_WEIGHTS = {
    "single": 0.15,
    "region": 0.1,
    "pair": 0.18,
    "relation": 0.22,
    "count": 0.15,
    "mixed": 0.12,
    "stacked": 0.08,
}


def make_example(seed: int, index: int, heldout_fraction: float = 0.1) -> dict:
    """One data set row (image as a uint8 array) for ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    split = "heldout" if rng.uniform() < heldout_fraction else "train"
    draw = sample_spec(rng)
    fams = families(split, draw.kind, draw.relation if draw.kind == "relation" else None)
    family = fams[int(rng.integers(len(fams)))]
    prompt = render_prompt(draw, family, rng)
    scene = spec_to_scene(draw.spec, rng)
    return {
        "image": render(scene),
        "prompt": prompt,
        "plan": draw.spec.to_plan().to_text(),
        "scene": json.dumps(scene.to_json()),
        "family": family.name,
        "kind": draw.kind,
        "split": split,
    }


def sample_wide_draw(rng: np.random.Generator) -> SpecDraw:
    """A spec of a kind drawn with `WIDE_KIND_WEIGHTS` (``stacked`` included)."""
    kinds = list(WIDE_KIND_WEIGHTS)
    kind = kinds[int(rng.choice(len(kinds), p=list(WIDE_KIND_WEIGHTS.values())))]
    return sample_stacked(rng) if kind == "stacked" else sample_spec(rng, kind)


def make_prompt_example(seed: int, index: int, augment: AugmentConfig | None = DEFAULT_AUGMENT) -> dict:
    """One planner row of the widened training grammar for ``(seed, index)``: prompt and plan, no image.

    The family is drawn from the original and the wide training families of the spec's kind; ``augment``
    (None: none) adds seeded chatter, politeness, typos and casing (`toyworld.augment`).
    """
    rng = np.random.default_rng([seed, index])
    draw = sample_wide_draw(rng)
    fams = families("train", draw.kind, draw.relation, wide=True)
    family = fams[int(rng.integers(len(fams)))]
    prompt = render_prompt(draw, family, rng)
    if augment is not None:
        prompt = augment_prompt(prompt, rng, augment)
    return {"prompt": prompt, "plan": draw.spec.to_plan().to_text(), "family": family.name, "kind": draw.kind}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _make_chunk(args: tuple[int, int, int, float]) -> list[dict]:
    seed, start, stop, heldout_fraction = args
    rows = []
    for i in range(start, stop):
        row = make_example(seed, i, heldout_fraction)
        row["image"] = {"bytes": _png(row["image"]), "path": None}
        rows.append(row)
    return rows


def build_dataset(
    out: str | Path,
    n: int,
    seed: int = 0,
    workers: int | None = None,
    heldout_fraction: float = 0.1,
    progress: bool = True,
) -> dict:
    """Render ``n`` examples and save a `datasets.Dataset` to ``out`` (atomically). Returns timing stats."""
    import datasets

    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise InputError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    workers = workers or min(mp.cpu_count(), 8)
    chunk = 500
    jobs = [(seed, s, min(n, s + chunk), heldout_fraction) for s in range(0, n, chunk)]
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tqdm(total=n, desc="rendering", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            with mp.get_context("fork").Pool(workers) as pool:
                for part in pool.imap(_make_chunk, jobs):
                    rows.extend(part)
                    bar.update(len(part))
        else:
            for job in jobs:
                part = _make_chunk(job)
                rows.extend(part)
                bar.update(len(part))
    t_render = time.perf_counter() - t0
    features = datasets.Features(
        {
            "image": datasets.Image(),
            **{c: datasets.Value("string") for c in COLUMNS if c != "image"},
        }
    )
    columns = {c: [r[c] for r in rows] for c in COLUMNS}
    ds = datasets.Dataset.from_dict(columns, features=features)
    with atomic_dir(out) as tmp:
        ds.save_to_disk(str(tmp))
    total = time.perf_counter() - t0
    return {"n": n, "workers": workers, "render_and_encode_s": t_render, "total_s": total, "images_per_s": n / total}


def load_dataset_dir(path: str | Path):
    """Load a data set written by `build_dataset`, with a clear error if it is not one."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"data set folder {path} does not exist (build one with `plan2img data build`)")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"{path} is not a data set saved by `plan2img data build`: {err}") from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise InputError(f"data set {path} lacks columns {missing}")
    return ds


def images_array(ds, indices=None) -> np.ndarray:
    """Decode the image column to one (N, 64, 64, 3) uint8 array."""
    sub = ds if indices is None else ds.select(indices)
    sub = sub.with_format("numpy", columns=["image"])
    return np.stack([np.asarray(x) for x in sub["image"]])


def fresh_examples(split: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` fresh prompts of ``split`` (``heldout`` / ``train``) families with their canonical plans (not rows of a
    built data set): the planner's evaluation prompts."""
    prompts, plans = [], []
    i = 0
    while len(prompts) < n:
        row = make_example(seed, i, heldout_fraction=1.0 if split == "heldout" else 0.0)
        prompts.append(row["prompt"])
        plans.append(row["plan"])
        i += 1
    return prompts, plans


def wide_rows(n: int, seed: int = 1, augment: bool = True) -> list[tuple[str, str]]:
    """``n`` (prompt, plan) rows of the widened training grammar, with `augment_prompt` noise unless ``augment``
    is off; row ``i`` depends only on ``(seed, i)``."""
    config = AugmentConfig() if augment else None
    rows = [make_prompt_example(seed, i, config) for i in range(n)]
    return [(r["prompt"], r["plan"]) for r in rows]


def preview_grid(
    images: list[np.ndarray], captions: list[str], columns: int = 4, scale: int = 3, max_lines: int = 6
) -> Image.Image:
    """A captioned grid: each image enlarged ``scale`` times with its caption wrapped underneath (at most
    ``max_lines`` lines)."""
    if len(images) != len(captions) or not images:
        raise ValueError("preview_grid needs as many captions as images (and at least one)")
    cell = images[0].shape[0] * scale
    font = ImageFont.load_default()
    wrap = max(10, cell // 6)
    lines = [textwrap.wrap(c, wrap)[:max_lines] for c in captions]
    text_h = 12 * max(len(x) for x in lines) + 6
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, text) in enumerate(zip(images, lines)):
        r, c = divmod(k, columns)
        x, y = 8 + c * (cell + 8), 8 + r * (cell + text_h + 8)
        grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(text):
            draw.text((x, y + cell + 3 + 12 * j), line, fill="black", font=font)
    return grid


def preview(out: str | Path, data: str | Path | None = None, n: int = 16, seed: int = 0, columns: int = 4) -> Path:
    """Write a captioned preview grid of ``n`` rows of a data set (or of freshly sampled rows if None)."""
    if data is not None:
        ds = load_dataset_dir(data)
        idx = list(range(min(n, len(ds))))
        images = list(images_array(ds, idx))
        captions = ds.select(idx)["prompt"]
    else:
        rows = [make_example(seed, i) for i in range(n)]
        images, captions = [r["image"] for r in rows], [r["prompt"] for r in rows]
    grid = preview_grid(images, list(captions), columns=columns)
    out = Path(out)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return atomic_write_bytes(out, buf.getvalue())
