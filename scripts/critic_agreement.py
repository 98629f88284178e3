"""How often the critic's reading of a scene field agrees with the ShapesEval detector's, on a run's saved images:
a measurement of the labeller behind critic-ranked DPO pairs (the detector judges the critic here; it never labels
pairs). A field the critic misreads makes noisy preference pairs for that field.

    python scripts/critic_agreement.py runs/eval14/chain --out runs/critic_agreement.json

Prints, per field (STYLE, LIGHTING), the confusion of detector value (rows) against critic reading (columns), and
the agreement rate per detector value.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from planner.critic import PlanReader
from safeio import atomic_write_json
from toyworld import vocab as V
from toyworld.eval.runner import read_folder
from toyworld.pretrained import pretrained_path

# plan field: (the detector's scene key, the plan's words -> the scene's value)
FIELDS = {
    "STYLE": ("style", {text: value for value, text in V.STYLE_TEXT.items()}),
    "LIGHTING": ("lighting", {text: value for value, text in V.LIGHTING_TEXT.items()}),
}


def confusions(results: list[dict], readings: list) -> dict[str, Counter]:
    """Per field, counts of (detector's value, critic's value; None where the critic wrote no valid plan)."""
    out = {field: Counter() for field in FIELDS}
    for r, plan in zip(results, readings):
        for field, (key, words) in FIELDS.items():
            got = None if plan is None else words.get(plan.get(field))
            out[field][(r["scene"][key], got)] += 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a `plan2img eval --save-images` folder")
    p.add_argument("--critic", default=None, help="critic folder (default: the shipped one)")
    p.add_argument("--out", required=True, help="JSON file written")
    args = p.parse_args()
    run = Path(args.run)
    lines = (run / "results.jsonl").read_text().splitlines()
    results = {(r["prompt_index"], r["sample"]): r for r in map(json.loads, lines)}
    items, images = read_folder(run / "images", max(i for i, _ in results) + 1)
    critic = PlanReader.from_pretrained(args.critic or pretrained_path("critic"), spec=V.TOY_PLAN_SPEC)
    readings = critic.read(images)
    table = confusions([results[(i, k)] for i, k, _ in items], [r.plan for r in readings])
    report = {}
    for field, counts in table.items():
        print(f"{field}: detector value -> critic reading (count); agreement per detector value")
        per_value = {}
        for value in sorted({d for d, _ in counts}):
            row = {str(c): n for (d, c), n in counts.items() if d == value}
            per_value[value] = {"critic": row, "agreement": row.get(value, 0) / sum(row.values())}
            print(f"  {value}: {row}  agreement {per_value[value]['agreement']:.2f}")
        report[field] = per_value
    atomic_write_json(args.out, {"run": str(run), "images": len(items), "fields": report})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
