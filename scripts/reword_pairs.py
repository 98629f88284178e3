"""Repeat mined preference pairs under other training wordings of their captions (no new images).

The chain's conditioning is the LLM's hidden states over prompt + plan, so two wordings of one scene condition the
U-Net differently even when the writer plans them the same. Pairs mined on one wording teach the U-Net LoRA that
wording only; repeating each pair under other wordings the writer plans identically (training families, the
widened grammar included; never held-out frames) shows it the variation, at no generation cost.

    python scripts/reword_pairs.py --pairs runs/pairs14_sl/pairs/best-of/images --per-caption 3 \
        --out runs/pairs14_sl_reworded

Each caption is planned by the writer; its plan's scene is said again with randomly drawn training families;
a rewording is kept only when the writer plans it to the same plan text (so the pair's preference, about the image
against that plan, still holds). The output is a `datasets` folder in the input's columns plus ``group`` (the
caption a row came from: DPO keeps a group on one side of its held-out split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alignment.preference import reword_pairs
from alignment.prepared import read_source
from planner.planner import load_planner
from planner.schema import PlanError
from safeio import atomic_dir
from toyworld import vocab as V
from toyworld.grammar import caption_draw, families, render_prompt
from toyworld.pretrained import pretrained_path


def candidate_wordings(plan: str, caption: str, tries: int, rng: np.random.Generator) -> list[str]:
    """Distinct training-family wordings of ``plan``'s scene other than ``caption`` (up to ``tries`` drawn)."""
    try:
        draw, _ = caption_draw(plan)
    except PlanError:
        return []
    fams = families("train", draw.kind, draw.relation, wide=True)
    drawn = (render_prompt(draw, fams[int(rng.integers(len(fams)))], rng, p_optional=0.25) for _ in range(tries))
    return [w for w in dict.fromkeys(drawn) if w != caption]


def plan_texts(writer, texts: list[str]) -> list[str | None]:
    """The writer's plan text of each text (None where it wrote no valid plan)."""
    return [r.plan.to_text() if r.plan is not None else None for r in writer.plan(texts)] if texts else []


def writer_rewordings(writer, captions: list[str], per_caption: int, tries: int, seed: int) -> list[list[str]]:
    """Per caption, up to ``per_caption`` wordings that the writer plans to the caption's own plan text."""
    plans = plan_texts(writer, captions)
    candidates = [
        candidate_wordings(p, c, tries, np.random.default_rng([seed, i])) if p is not None else []
        for i, (c, p) in enumerate(zip(captions, plans))
    ]
    flat = [w for ws in candidates for w in ws]
    flat_plans = plan_texts(writer, flat)
    out, start = [], 0
    for plan, ws in zip(plans, candidates):
        theirs = flat_plans[start : start + len(ws)]
        start += len(ws)
        out.append([w for w, p in zip(ws, theirs) if p == plan][:per_caption])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="mined pairs (a `datasets` folder or Parquet, Pick-a-Pic columns)")
    p.add_argument("--out", required=True, help="the reworded pairs' `datasets` folder")
    p.add_argument("--per-caption", type=int, default=3, help="rewordings kept per caption (at most)")
    p.add_argument("--tries", type=int, default=12, help="wordings drawn per caption before the writer's check")
    p.add_argument("--writer", default=None, help="a planner folder that writes the plans (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.per_caption < 1 or args.tries < 1:
        p.error("--per-caption and --tries must be >= 1")
    spec = V.TOY_PLAN_SPEC
    writer = load_planner(args.writer or pretrained_path("planner_wide"), base=pretrained_path("planner"), spec=spec)
    pairs = read_source(args.pairs)
    found: dict[str, int] = {}

    def reword(captions: list[str]) -> list[list[str]]:
        alts = writer_rewordings(writer, captions, args.per_caption, args.tries, args.seed)
        found.update({c: len(a) for c, a in zip(captions, alts)})
        return alts

    out = reword_pairs(pairs, reword)
    with atomic_dir(Path(args.out)) as tmp:
        out.save_to_disk(str(tmp))
    counts = np.array(list(found.values()))
    report = {"pairs_in": len(pairs), "pairs_out": len(out), "captions": len(found),
              "rewordings_per_caption": {"mean": float(counts.mean()), "none": int((counts == 0).sum())}}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
