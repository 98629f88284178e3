"""Evaluate planners: exact match, per-field and object F1, parse rate with and without constraints,
latency at batch 1 and 16, and (optionally) 8-bit memory and agreement with fp32. Prints a table, writes JSON.

Prompt sets: fresh prompts of the grammar's ``--splits`` (held-out / training families; ``wide``: the widened
training grammar the shipped writer was trained on, without chatter or typos) and any ShapesEval
metadata files (``--metadata``, scored against each entry's ``plan``). Several ``--planner`` folders are scored
on the same prompts in one run (JSON: ``{"reports": [...]}``; one planner: its report as before).

    python scripts/eval_planner.py --planner toyworld/pretrained/planner --out runs/planner_eval.json --int8
    python scripts/eval_planner.py --planner toyworld/pretrained/planner runs/planner_wide/final \\
        --metadata toyworld/eval/data/handwritten.jsonl --no-latency --out runs/planner_eval_wide.json \\
        --md runs/planner_eval_wide.md
"""

import argparse
import json
import time
from pathlib import Path

import torch

from alignment.planner_sft import plan_metrics
from planner.planner import Planner, load_planner
from planner.schema import FIELDS
from safeio import atomic_write_json, atomic_write_text
from toyworld.data import fresh_examples, wide_rows
from toyworld.eval.metadata import metadata_prompts
from toyworld.vocab import TOY_PLAN_SPEC

DECODINGS = ("constrained", "unconstrained")


def latency_ms(planner: Planner, prompts: list[str], batch: int, repeats: int = 3, constrained: bool = True) -> float:
    planner.plan(prompts[:batch], batch_size=batch, constrained=constrained)  # warm-up
    t0 = time.perf_counter()
    for r in range(repeats):
        planner.plan(prompts[r * batch : (r + 1) * batch], batch_size=batch, constrained=constrained)
    return (time.perf_counter() - t0) / (repeats * batch) * 1000


def model_bytes(model) -> int:
    return model.get_memory_footprint()


def prompt_sets(args) -> dict[str, tuple[list[str], list[str], list[str] | None]]:
    """Name -> (prompts, gold plans, sentence frame of each prompt or None): the grammar splits, then each metadata
    file under its file stem (frames from its entries' ``family``, where every entry has one)."""
    sets = {}
    for split in args.splits:
        if split == "wide":
            rows = wide_rows(args.n, args.seed, augment=False)
            sets[split] = ([prompt for prompt, _ in rows], [plan for _, plan in rows], None)
        else:
            sets[split] = (*fresh_examples(split, args.n, args.seed), None)
    for path in args.metadata:
        sets[Path(path).stem] = metadata_prompts(path)
    return sets


def score(planner: Planner, sets: dict, decodings: list[str]) -> dict:
    """``{set}_{decoding}`` -> `plan_metrics` for every prompt set and decoding."""
    report = {}
    for name, (prompts, gold, families) in sets.items():
        for decoding in decodings:
            res = planner.plan(prompts, constrained=decoding == "constrained", batch_size=32)
            report[f"{name}_{decoding}"] = plan_metrics(res, gold, planner.spec, groups=families)
    return report


def latency_report(planner: Planner, seed: int) -> dict:
    prompts, _ = fresh_examples("heldout", 64, seed + 1)
    return {
        "batch_1": latency_ms(planner, prompts, 1),
        "batch_1_unconstrained": latency_ms(planner, prompts, 1, constrained=False),
        "batch_16": latency_ms(planner, prompts, 16),
    }


def int8_report(planner: Planner, path: str, seed: int) -> dict:
    """Memory of an 8-bit copy and how often it writes the same plan as fp32 (200 held-out prompts)."""
    fp32_bytes = model_bytes(planner.model)
    try:
        q = Planner.from_pretrained(path, spec=TOY_PLAN_SPEC, load_in_8bit=True, device="cpu")
        prompts, _ = fresh_examples("heldout", 200, seed + 2)
        a = [r.text for r in planner.plan(prompts, batch_size=32)]
        b = [r.text for r in q.plan(prompts, batch_size=32)]
        return {
            "fp32_bytes": fp32_bytes,
            "int8_bytes": model_bytes(q.model),
            "plan_agreement": sum(x == y for x, y in zip(a, b)) / len(a),
            "n": len(a),
        }
    except Exception as err:  # report what does not work rather than hide it
        return {"error": f"{type(err).__name__}: {err}", "fp32_bytes": fp32_bytes}


def table(reports: list[dict]) -> str:
    """Markdown: one row per planner, prompt set and decoding."""
    head = ["planner", "prompts", "n", "decoding", "exact", "parse", "object F1", *(f"F1 {f}" for f in FIELDS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for report in reports:
        for key, m in report.items():
            if isinstance(m, dict) and "exact_match" in m:
                name, decoding = key.rsplit("_", 1)
                f1 = " | ".join(f"{m['field_f1'][f]:.3f}" for f in FIELDS)
                lines.append(
                    f"| {report['planner']} | {name} | {m['n']} | {decoding} | {m['exact_match']:.3f} | "
                    f"{m['parse_rate']:.3f} | {m['object_f1']:.3f} | {f1} |"
                )
    return "\n".join(lines) + "\n"


def family_table(reports: list[dict]) -> str:
    """Markdown: exact match per sentence frame (metadata sets with families), one column per planner."""
    keys = [k for k, m in reports[0].items() if isinstance(m, dict) and "exact_by_group" in m]
    lines = []
    for key in keys:
        head = ["frame", "n", *(str(r["planner"]) for r in reports)]
        lines += [f"{key}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for family, cell in reports[0][key]["exact_by_group"].items():
            cells = [f"{r[key]['exact_by_group'][family]['exact']:.3f}" for r in reports]
            lines.append(f"| {family} | {cell['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--planner",
        nargs="+",
        default=["toyworld/pretrained/planner"],
        help="planner or LoRA adapter folder(s)",
    )
    p.add_argument("--base-planner", default="toyworld/pretrained/planner", help="the planner adapters are trained on")
    p.add_argument("--n", type=int, default=500, help="prompts per grammar split")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--splits", nargs="*", default=["heldout", "train"], choices=["heldout", "train", "wide"])
    p.add_argument("--metadata", nargs="*", default=[], help="ShapesEval metadata JSONL files with 'plan' fields")
    p.add_argument("--decoding", nargs="+", default=list(DECODINGS), choices=DECODINGS)
    p.add_argument("--int8", action="store_true", help="also load in 8-bit and compare with fp32 on 200 prompts")
    p.add_argument("--latency-only", action="store_true", help="only measure latency (e.g. idle machine)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement (e.g. busy machine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/planner_eval.json")
    p.add_argument("--md", default=None, help="also write the table as markdown to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = {} if args.latency_only else prompt_sets(args)
    reports = []
    for path in args.planner:
        planner = load_planner(path, base=args.base_planner, spec=TOY_PLAN_SPEC)
        report = {"planner": path, **score(planner, sets, args.decoding)}
        if not args.no_latency:
            report["latency_ms_per_plan"] = latency_report(planner, args.seed)
        report["threads"] = torch.get_num_threads()
        if args.int8:
            report["int8"] = int8_report(planner, path, args.seed)
        reports.append(report)
        print(json.dumps({k: v for k, v in report.items() if "latency" in k or "int8" in k}, indent=2))
    text = table(reports) + "\n" + family_table(reports)
    print(text)
    atomic_write_json(args.out, reports[0] if len(reports) == 1 else {"reports": reports})
    print(f"wrote {args.out}")
    if args.md:
        atomic_write_text(Path(args.md), text)
        print(f"wrote {args.md}")
