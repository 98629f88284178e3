"""Markdown table of ShapesEval runs side by side, with each row's paired difference against a baseline row.

    python scripts/results_table.py "native=runs/eval_native_heldout" "bridge A=runs/eval_bridge_A" \\
        --baseline native --out runs/table.md

Every run folder is one `plan2img eval --out DIR` (summary.json + results.jsonl); rows compared against the
baseline must score the same prompts (same metadata and --limit-per-task).
"""

import argparse
import json
from pathlib import Path

from safeio import atomic_write_text
from toyworld.eval.scoring import paired_difference, summarize


def read_run(folder: Path, samples: int | None = None) -> tuple[dict, list[dict]]:
    """A run's summary and per-image results; with ``samples``, only images 0..samples-1 of each prompt (the
    same seeds in every run) and a summary recomputed from them."""
    summary = json.loads((folder / "summary.json").read_text())
    with open(folder / "results.jsonl") as f:
        results = [json.loads(line) for line in f if line.strip()]
    if samples is not None:
        results = [r for r in results if int(r["sample"]) < samples]
        if not results:
            raise SystemExit(f"error: {folder} has no images with sample index < {samples}")
        summary = summarize(results)
    return summary, results


def table(rows: dict[str, Path], baseline: str | None, n_boot: int = 1000, samples: int | None = None) -> str:
    runs = {label: read_run(folder, samples) for label, folder in rows.items()}
    tasks = sorted({t for s, _ in runs.values() for t in s["tasks"]})
    head = ["run", "overall", "95% CI"] + tasks + ([f"Δ vs {baseline} (95% CI)"] if baseline else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, (summary, results) in runs.items():
        lo, hi = summary["overall_ci95"]
        cells = [label, f"{summary['overall']:.3f}", f"{lo:.3f}–{hi:.3f}"]
        cells += [f"{summary['tasks'][t]['score']:.3f}" if t in summary["tasks"] else "–" for t in tasks]
        if baseline:
            if label == baseline:
                cells.append("–")
            else:
                d = paired_difference(runs[baseline][1], results, n_boot=n_boot)
                cells.append(f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f}…{d['ci95'][1]:+.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    n = {label: s["n_images"] for label, (s, _) in runs.items()}
    lines.append("")
    lines.append("Images per row: " + ", ".join(f"{k}: {v}" for k, v in n.items()) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("rows", nargs="+", help="LABEL=RUN_DIR")
    p.add_argument("--baseline", default=None, help="label of the row the others are compared with")
    p.add_argument(
        "--samples", type=int, default=None, help="only the first N images of each prompt, every row (same seeds)"
    )
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args()
    rows = {}
    for item in args.rows:
        if "=" not in item:
            raise SystemExit(f"error: expected LABEL=RUN_DIR, got {item!r}")
        label, folder = item.split("=", 1)
        if not (Path(folder) / "summary.json").is_file():
            raise SystemExit(f"error: {folder} has no summary.json (run `plan2img eval ... --out {folder}` first)")
        rows[label] = Path(folder)
    if args.baseline and args.baseline not in rows:
        raise SystemExit(f"error: baseline {args.baseline!r} is not one of the rows {list(rows)}")
    md = table(rows, args.baseline, samples=args.samples)
    print(md)
    if args.out:
        atomic_write_text(args.out, md)
