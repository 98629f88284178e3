"""Preference pairs mined from critic rankings (best-of-K candidates, refine trajectories), written as `datasets`
folders in the formats the preference trainers read:

- images in Pick-a-Pic's columns: ``caption``, ``jpg_0``, ``jpg_1`` (PNG bytes), ``label_0``, ``label_1`` (the
  preferred image gets 1), plus ``are_different`` and the critic scores ``score_0`` / ``score_1``;
- plans in TRL's preference columns: ``prompt``, ``chosen``, ``rejected``.

The labels come from the critic, never from the ShapesEval detector. A candidate set whose best and worst
critic scores are equal gives no pair (a tie).
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from safeio import atomic_dir

IMAGE_PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
PLAN_PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class PairWriter:
    """Collects pairs; `save` writes ``<folder>/images`` and ``<folder>/plans`` (each only when it has rows)."""

    def __init__(self):
        self.image_rows: list[dict] = []
        self.plan_rows: list[dict] = []

    def add_ranked(self, caption: str, images, scores: list[float]) -> bool:
        """The best against the worst of candidates ranked by critic score; False (no pair) on a tie."""
        scores = [float(s) for s in scores]
        if len(images) != len(scores):
            raise ValueError(f"{len(images)} images but {len(scores)} scores")
        if len(scores) < 2 or max(scores) == min(scores):
            return False
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        self.image_rows.append(
            {"caption": caption, "jpg_0": _png(images[best]), "jpg_1": _png(images[worst]), "label_0": 1.0,
             "label_1": 0.0, "are_different": True, "score_0": scores[best], "score_1": scores[worst]}
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


def _save(ds: datasets.Dataset, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        ds.save_to_disk(str(tmp))
