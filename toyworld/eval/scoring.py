"""ShapesEval scoring: GenEval's per-image rule on our detections, task means and bootstrap intervals.

The rule follows GenEval's ``evaluate_images.py``: for each ``include`` entry the top-``count`` detections
of that class (by score) must exist, have the required color, and stand in the required relation to
every detection matched for the referenced entry; an ``exclude`` entry fails the image when ``count`` or
more detections of the class exist. Plan-field tasks add a ``scene`` requirement (style, lighting,
camera, material) checked against the detector's scene properties.
"""

from __future__ import annotations

import numpy as np

from toyworld import vocab as V
from toyworld.eval.detector import DetectedObject, Detection, classify_camera

POSITION_THRESHOLD = 0.1  # GenEval: boxes must be apart by more than 10% of their summed size


def relative_position(a: DetectedObject, b: DetectedObject) -> set[str]:
    """Relations of ``a`` to ``b`` (``left of``, ``right of``, ``above``, ``below``), GenEval's rule."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    center_a = np.array([(ax0 + ax1) / 2, (ay0 + ay1) / 2])
    center_b = np.array([(bx0 + bx1) / 2, (by0 + by1) / 2])
    dims = np.array([ax1 - ax0 + bx1 - bx0, ay1 - ay0 + by1 - by0], dtype=float)
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def evaluate_image(detection: Detection, meta: dict) -> tuple[bool, str]:
    """Is one image correct for one metadata entry? Returns (correct, reason for failure or '')."""
    by_class = detection.by_class()
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[DetectedObject] | None] = []
    for req in meta.get("include", []):
        name = req["class"]
        count = int(req.get("count", 1))
        found = by_class.get(name, [])[:count]  # the top-`count` by score, as GenEval does
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [o.color for o in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colors}")
            if "material" in req and matched:
                mats = [o.material for o in found]
                if mats.count(req["material"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {req['material']} {name}, found {mats}")
            if "position" in req and matched:
                relation, target = req["position"]
                targets = matched_groups[target] if target < len(matched_groups) else None
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for tgt in targets:
                            rels = relative_position(obj, tgt)
                            if relation not in rels:
                                correct = matched = False
                                reasons.append(f"expected {name} {relation} target, found {sorted(rels) or 'none'}")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        name = req["class"]
        n = len(by_class.get(name, []))
        if n >= int(req["count"]):
            correct = False
            reasons.append(f"expected {name}<{req['count']}, found {n}")
    scene = meta.get("scene", {})
    if "style" in scene and detection.style != scene["style"]:
        correct = False
        reasons.append(f"expected style {scene['style']}, found {detection.style}")
    if "lighting" in scene and detection.lighting != scene["lighting"]:
        correct = False
        reasons.append(f"expected lighting {scene['lighting']}, found {detection.lighting}")
    if "camera" in scene:
        size = scene.get("size", V.DEFAULT_SIZE)
        got = None if detection.scale is None else classify_camera(detection.scale, size)
        if got != scene["camera"]:
            correct = False
            reasons.append(f"expected camera {scene['camera']}, found {got} (scale {detection.scale})")
    if "material" in scene:
        mats = [o.material for o in detection.objects]
        if not mats or any(m != scene["material"] for m in mats):
            correct = False
            reasons.append(f"expected all {scene['material']}, found {mats}")
    return correct, "; ".join(reasons)


def summarize(results: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-task accuracy with bootstrap 95% intervals, and overall = mean over tasks.

    ``results`` are per-image dicts with ``tag``, ``correct`` and ``prompt_index``. The bootstrap resamples
    prompts (with their images) within each task, so images of one prompt stay together.
    """
    rng = np.random.default_rng(seed)
    tasks: dict[str, dict[int, list[bool]]] = {}
    for r in results:
        tasks.setdefault(r["tag"], {}).setdefault(int(r["prompt_index"]), []).append(bool(r["correct"]))
    per_task = {}
    boot_means = []
    for tag in sorted(tasks):
        prompts = list(tasks[tag].values())
        sums = np.array([sum(p) for p in prompts], float)
        counts = np.array([len(p) for p in prompts], float)
        score = float(sums.sum() / counts.sum())
        idx = rng.integers(0, len(prompts), size=(n_boot, len(prompts)))
        boot = sums[idx].sum(1) / counts[idx].sum(1)
        boot_means.append(boot)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        per_task[tag] = {
            "score": score,
            "ci95": [float(lo), float(hi)],
            "n_images": int(counts.sum()),
            "n_prompts": len(prompts),
        }
    if not per_task:
        raise ValueError("no results to summarize")
    overall_boot = np.mean(boot_means, axis=0)
    lo, hi = np.percentile(overall_boot, [2.5, 97.5])
    overall = float(np.mean([t["score"] for t in per_task.values()]))
    return {"overall": overall, "overall_ci95": [float(lo), float(hi)], "tasks": per_task, "n_images": len(results)}


def paired_difference(results_a: list[dict], results_b: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Overall score of ``b`` minus ``a`` on the same prompts, with a paired bootstrap 95% interval.

    Both result lists must cover the same prompts (``prompt_index`` per ``tag``); the bootstrap draws one set
    of prompts per task and scores both systems on it, so prompt difficulty cancels out of the interval.
    """
    per: dict[str, dict[int, list[list[bool]]]] = {}
    for which, results in enumerate((results_a, results_b)):
        for r in results:
            cell = per.setdefault(r["tag"], {}).setdefault(int(r["prompt_index"]), [[], []])
            cell[which].append(bool(r["correct"]))
    if not per:
        raise ValueError("no results to compare")
    rng = np.random.default_rng(seed)
    diffs, boots = [], []
    for tag in sorted(per):
        cells = list(per[tag].values())
        if any(not a or not b for a, b in cells):
            raise ValueError(f"task {tag!r}: the two result sets do not cover the same prompts")
        stats = np.array([[sum(a), len(a), sum(b), len(b)] for a, b in cells], float)
        diffs.append(stats[:, 2].sum() / stats[:, 3].sum() - stats[:, 0].sum() / stats[:, 1].sum())
        s = stats[rng.integers(0, len(cells), size=(n_boot, len(cells)))].sum(1)
        boots.append(s[:, 2] / s[:, 3] - s[:, 0] / s[:, 1])
    lo, hi = np.percentile(np.mean(boots, axis=0), [2.5, 97.5])
    return {"difference": float(np.mean(diffs)), "ci95": [float(lo), float(hi)], "tasks": len(per)}


def summary_table(summary: dict, title: str | None = None) -> str:
    """Markdown table of a summary."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | score | 95% CI | images |", "|---|---|---|---|"]
    for tag, t in summary["tasks"].items():
        lines.append(f"| {tag} | {t['score']:.3f} | {t['ci95'][0]:.3f}–{t['ci95'][1]:.3f} | {t['n_images']} |")
    lo, hi = summary["overall_ci95"]
    lines.append(f"| **overall** | **{summary['overall']:.3f}** | {lo:.3f}–{hi:.3f} | {summary['n_images']} |")
    return "\n".join(lines)
