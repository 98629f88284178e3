"""Run ShapesEval: score a GenEval-layout image folder, images from any generator, or the ground truth.

Images are laid out as GenEval does: ``DIR/<index>/samples/<k>.png`` with ``<index>`` the line number
(from 0) of the prompt in the metadata file. Everything is read and checked before anything is scored,
and outputs (``results.jsonl``, ``summary.json``, ``summary.md``) are written only when scoring is
complete, each atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from safeio import InputError, atomic_dir, atomic_write_json, atomic_write_text
from toyworld import vocab as V
from toyworld.eval.detector import detect
from toyworld.eval.metadata import ground_truth_spec
from toyworld.eval.scoring import evaluate_image, summarize, summary_table
from toyworld.render import degrade, render
from toyworld.scene import spec_to_scene

PACKAGE_METADATA = {
    "heldout": Path(__file__).parent / "data" / "shapes_eval_heldout.jsonl",
    "train": Path(__file__).parent / "data" / "shapes_eval_train.jsonl",
}

# A batch transform: (B, 64, 64, 3) uint8 -> (B, 64, 64, 3) uint8 (e.g. a VAE round trip).
ImageTransform = Callable[[np.ndarray], np.ndarray]
# A generator: (prompts, entries, seeds) -> (B, 64, 64, 3) uint8, one image per prompt.
ImageGenerator = Callable[[list[str], list[dict], list[int]], np.ndarray]


class EvalInputError(InputError):
    """Bad evaluation input (missing folder, unreadable or wrong-size image); names the file."""


def load_image(path: Path) -> np.ndarray:
    """Read one image as (64, 64, 3) uint8 RGB, or raise `EvalInputError` naming the file and the fault."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "P"):
                raise EvalInputError(f"{path}: unsupported image mode {im.mode}")
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, EvalInputError):
            raise
        raise EvalInputError(f"{path}: cannot read image ({err})") from None
    if arr.shape != (V.IMAGE_SIZE, V.IMAGE_SIZE, 3):
        raise EvalInputError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {V.IMAGE_SIZE}x{V.IMAGE_SIZE}")
    return arr


def collect_folder(images_dir: str | Path, n_prompts: int) -> list[tuple[int, int, Path]]:
    """List ``(prompt_index, sample, path)`` of a GenEval-layout folder, checking its structure."""
    root = Path(images_dir)
    if not root.is_dir():
        raise EvalInputError(f"image folder {root} does not exist")
    found = []
    for sub in sorted(root.iterdir()):
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        if not sub.name.isdigit():
            raise EvalInputError(f"{sub}: prompt folders must be named by the prompt's index (e.g. 00007)")
        index = int(sub.name)
        if index >= n_prompts:
            raise EvalInputError(f"{sub}: index {index} but the metadata has only {n_prompts} prompts")
        samples = sub / "samples"
        if not samples.is_dir():
            raise EvalInputError(f"{sub}: has no samples/ folder")
        pngs = sorted(p for p in samples.iterdir() if p.suffix.lower() == ".png")
        if not pngs:
            raise EvalInputError(f"{samples}: has no .png images")
        for k, p in enumerate(pngs):
            found.append((index, k, p))
    if not found:
        raise EvalInputError(f"image folder {root} has no <index>/samples/<k>.png images")
    return found


def read_folder(images_dir: str | Path, n_prompts: int) -> tuple[list[tuple[int, int, Path]], np.ndarray]:
    """`collect_folder`'s ``(prompt_index, sample, path)`` list and its images as one (N, H, W, 3) uint8 array."""
    items = collect_folder(images_dir, n_prompts)
    return items, np.stack([np.asarray(Image.open(path).convert("RGB")) for _, _, path in items])


def image_seed(seed: int, index: int, sample: int) -> int:
    """The seed of image ``sample`` of prompt ``index`` in a run with base seed ``seed`` (every generator and every
    row of a table uses these, so rows are paired image by image)."""
    return seed * 1_000_003 + index * 1000 + sample


def score_image(entry: dict, index: int, sample: int, image: np.ndarray, filename: str | None = None) -> dict:
    """The detector's verdict on one image for ``entry``: one line of ``results.jsonl``."""
    det = detect(image)
    correct, reason = evaluate_image(det, entry)
    return {
        "prompt_index": index,
        "sample": sample,
        "tag": entry["tag"],
        "prompt": entry["prompt"],
        "filename": filename,
        "correct": bool(correct),
        "reason": reason,
        "detections": [
            {
                "class": o.shape,
                "color": o.color,
                "bbox": list(o.bbox),
                "material": o.material,
                "extent": round(o.extent, 2),
            }
            for o in det.objects
        ],
        "scene": {
            "style": det.style,
            "lighting": det.lighting,
            "brightness": round(det.brightness, 4),
            "scale": None if det.scale is None else round(det.scale, 2),
        },
    }


def score_folder(entries: list[dict], images_dir: str | Path, progress: bool = True) -> list[dict]:
    """Score every image of a GenEval-layout folder against ``entries`` (all images are read first)."""
    items = collect_folder(images_dir, len(entries))
    images = [load_image(p) for _, _, p in items]  # fail on any bad image before scoring
    results = []
    for (index, k, path), image in tqdm(list(zip(items, images)), desc="scoring", disable=not progress):
        results.append(score_image(entries[index], index, k, image, str(path)))
    return results


def _batches(entries: list[dict], n_per_prompt: int, batch_size: int) -> Iterable[list[tuple[int, int]]]:
    jobs = [(i, k) for i in range(len(entries)) for k in range(n_per_prompt)]
    for start in range(0, len(jobs), batch_size):
        yield jobs[start : start + batch_size]


def ground_truth_generator(degradation: str = "none", transform: ImageTransform | None = None) -> ImageGenerator:
    """A generator that renders each entry's own scene (seeded), then degrades and/or transforms it."""

    def generate(prompts: list[str], batch: list[dict], seeds: list[int]) -> np.ndarray:
        images = []
        for entry, seed in zip(batch, seeds):
            rng = np.random.default_rng(seed)
            scene = spec_to_scene(ground_truth_spec(entry), rng)
            images.append(degrade(render(scene), degradation, rng))
        out = np.stack(images)
        return transform(out) if transform is not None else out

    return generate


def score_generator(
    entries: list[dict],
    generate: ImageGenerator,
    n_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    keep_images: bool = False,
) -> tuple[list[dict], dict[tuple[int, int], np.ndarray]]:
    """Generate ``n_per_prompt`` images per entry (seeds from `image_seed`) and score them."""
    results, kept = [], {}
    total = len(entries) * n_per_prompt
    bar = tqdm(total=total, desc="generating + scoring", disable=not progress)
    for jobs in _batches(entries, n_per_prompt, batch_size):
        batch = [entries[i] for i, _ in jobs]
        seeds = [image_seed(seed, i, k) for i, k in jobs]
        images = np.asarray(generate([e["prompt"] for e in batch], batch, seeds))
        if images.shape != (len(jobs), V.IMAGE_SIZE, V.IMAGE_SIZE, 3) or images.dtype != np.uint8:
            raise EvalInputError(
                f"generator returned {images.shape} {images.dtype}, expected "
                f"({len(jobs)}, {V.IMAGE_SIZE}, {V.IMAGE_SIZE}, 3) uint8"
            )
        for (i, k), image in zip(jobs, images):
            results.append(score_image(entries[i], i, k, image, None))
            if keep_images:
                kept[(i, k)] = image
        bar.update(len(jobs))
    bar.close()
    return results, kept


def judge_candidates(entry: dict, candidates: np.ndarray) -> int:
    """The first candidate image the detector judges correct for ``entry`` (else 0): best-of-K picked by the
    judge itself, an oracle upper bound that no result may use."""
    for j, image in enumerate(candidates):
        if evaluate_image(detect(image), entry)[0]:
            return j
    return 0


def write_report(
    out_dir: str | Path,
    entries: list[dict],
    results: list[dict],
    title: str,
    images: dict[tuple[int, int], np.ndarray] | None = None,
    extra: dict | None = None,
) -> dict:
    """Summarize and write ``results.jsonl``, ``summary.json``, ``summary.md`` (and images) into ``out_dir``."""
    summary = summarize(results)
    summary["title"] = title
    if extra:
        summary.update(extra)
    out = Path(out_dir)
    if images:
        with atomic_dir(out / "images") as tmp:
            for (i, k), image in images.items():
                folder = tmp / f"{i:05d}" / "samples"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{k:04d}.png")
                meta = folder.parent / "metadata.jsonl"
                if not meta.exists():
                    meta.write_text(json.dumps(entries[i]) + "\n")
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_table(summary, title) + "\n")
    return summary
