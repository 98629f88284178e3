"""Where a ShapesEval row's errors are: images whose prompt the shipped writer plans right, and the rest.

The writer's greedy plan of every prompt a run scored is compared with the prompt's plan in the metadata (used only
to score, as `scripts/eval_reviser.py` does: *right* by `planner.critic.says_the_same`). A move that
works on the image side (picking, refining or tuning the U-Net / connector under the writer's plan) can at best
make every plan-right image right; its ceiling is ``(plan-right images + right plan-wrong images) / images``.

    python scripts/error_split.py "best-of-4=runs/eval/bestof8/bridge_best-of-4" ... --out runs/error_split.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from planner.critic import says_the_same
from planner.planner import load_planner
from planner.schema import Plan
from safeio import atomic_write_json
from toyworld import vocab as V
from toyworld.eval.metadata import read_metadata
from toyworld.eval.runner import PACKAGE_METADATA
from toyworld.pretrained import pretrained_path


def writer_right(prompts: list[str], gold: list[str], writer_dir: str | None = None) -> list[bool]:
    """Whether the writer's greedy plan of each prompt says what the prompt's plan says (``writer_dir``: a planner
    folder, e.g. a planner-DPO run's ``final/writer``; None: the shipped writer)."""
    spec = V.TOY_PLAN_SPEC
    writer = load_planner(writer_dir or pretrained_path("planner_wide"), base=pretrained_path("planner"), spec=spec)
    plans = [r.plan for r in writer.plan(prompts)]
    return [says_the_same(Plan.parse(g, spec), p, V.OBJECT_GRAMMAR) for p, g in zip(plans, gold)]


def split_row(results: list[dict], right: dict[str, bool]) -> dict:
    n = len(results)
    pr = [r for r in results if right[r["prompt"]]]
    pw = [r for r in results if not right[r["prompt"]]]
    ok_pr, ok_pw = sum(r["correct"] for r in pr), sum(r["correct"] for r in pw)
    return {"images": n, "accuracy": (ok_pr + ok_pw) / n, "plan_right_images": len(pr), "plan_right_correct": ok_pr,
            "plan_wrong_images": len(pw), "plan_wrong_correct": ok_pw,
            "image_side_ceiling": (len(pr) + ok_pw) / n}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="label=run folder (results.jsonl of a ShapesEval run)")
    p.add_argument("--split", choices=sorted(PACKAGE_METADATA), default="heldout")
    p.add_argument("--metadata", default=None, help="a metadata.jsonl instead of --split's (prompts with plans)")
    p.add_argument(
        "--writer", default=None, help="a planner folder whose plans are checked (default: the shipped writer)"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    gold = {e["prompt"]: e["plan"] for e in read_metadata(args.metadata or PACKAGE_METADATA[args.split])}
    runs = {}
    for spec in args.rows:
        label, _, folder = spec.partition("=")
        with open(Path(folder) / "results.jsonl") as f:
            runs[label] = [json.loads(line) for line in f if line.strip()]
    prompts = sorted({r["prompt"] for rs in runs.values() for r in rs})
    missing = [q for q in prompts if q not in gold]
    if missing:
        raise SystemExit(f"error: {len(missing)} prompts are not in the metadata, e.g. {missing[0]!r}")
    right = dict(zip(prompts, writer_right(prompts, [gold[q] for q in prompts], args.writer)))
    out = {label: split_row(rs, right) for label, rs in runs.items()}
    print(f"writer's plan right on {sum(right.values())}/{len(right)} prompts")
    print("| row | accuracy | plan-right images right | plan-wrong images right | image-side ceiling |")
    print("|---|---|---|---|---|")
    for label, s in out.items():
        print(f"| {label} | {s['accuracy']:.3f} | {s['plan_right_correct']}/{s['plan_right_images']} | "
              f"{s['plan_wrong_correct']}/{s['plan_wrong_images']} | {s['image_side_ceiling']:.3f} |")  # fmt: skip
    atomic_write_json(args.out, {"writer_right_prompts": sum(right.values()), "prompts": len(right), "rows": out})


if __name__ == "__main__":
    main()
