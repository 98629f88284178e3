"""Spatial-injection settings at inference on one trained bridge (training-free on a bridge trained without
regions): each variant is scored on the same ShapesEval prompts and seeds; prints a table, writes JSON.

    python scripts/eval_spatial.py --bridge toyworld/pretrained/bridge --limit-per-task 10 --n-per-prompt 1 \\
        --variants off "levels 1" "levels 1 strength 0.5" --out runs/spatial_free
    python scripts/eval_spatial.py --plan-source oracle --reads plan --limit-per-task 20 --n-per-prompt 1 \\
        --variants "levels all" off "strength 0.5" --out runs/spatial_oracle

A variant is ``off`` or words ``strength S``, ``levels L [L ...]`` (or ``levels all``), ``tokens span|shared``,
``queries N``; every variant switches regions on. Resumable: a variant whose summary exists is not rerun.
"""

import argparse
import json
from pathlib import Path

import torch

from diffusion_backbone.models import load_backbone
from llm_bridge.bridge import LLMBridge
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.planner import Planner, load_planner
from safeio import atomic_write_json, atomic_write_text
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, score_generator, write_report
from toyworld.eval.scoring import summarize
from toyworld.grammar import plan_caption, reading_order_plan
from toyworld.pretrained import pretrained_path
from toyworld.vocab import TOY_PLAN_SPEC


def parse_variant(text: str) -> dict:
    """``"levels 1 strength 0.5"`` -> set_spatial settings."""
    if text == "off":
        return {"spatial": False}
    words, out = text.split(), {"spatial": True}
    i = 0
    while i < len(words):
        key = words[i]
        args = []
        i += 1
        while i < len(words) and words[i] not in ("strength", "levels", "tokens", "queries"):
            args.append(words[i])
            i += 1
        if key == "strength":
            out["region_strength"] = float(args[0])
        elif key == "levels":
            out["region_levels"] = None if args == ["all"] else [int(a) for a in args]
        elif key == "tokens":
            out["object_tokens"] = args[0]
        elif key == "queries":
            out["object_queries"] = int(args[0])
        else:
            raise SystemExit(f"error: unknown word {key!r} in variant {text!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bridge", default=str(pretrained_path("bridge")))
    ap.add_argument("--planner", default=str(pretrained_path("planner")))
    ap.add_argument("--base", default=str(pretrained_path("base")))
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--plan-source", choices=["planner", "oracle"], default="planner")
    ap.add_argument("--writer", default=None, help="planner folder or LoRA adapter over --planner that writes plans")
    ap.add_argument("--reads", choices=["plan", "prompt"], default="plan", help="as plan2img eval --reads")
    ap.add_argument("--split", choices=["heldout", "train"], default="heldout")
    ap.add_argument("--limit-per-task", type=int, default=10)
    ap.add_argument("--n-per-prompt", type=int, default=1)
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    entries = limit_per_task(read_metadata(PACKAGE_METADATA[args.split]), args.limit_per_task)
    planner = Planner.from_pretrained(args.planner, spec=TOY_PLAN_SPEC)
    writer = None
    if args.writer:
        writer = load_planner(args.writer, base=args.planner, spec=TOY_PLAN_SPEC)
    reading = {"caption": plan_caption, "normalize_plan": reading_order_plan} if args.reads == "plan" else {}
    bridge = LLMBridge.from_pretrained(args.bridge)
    pipe = Plan2ImgPipeline(planner, bridge, load_backbone(args.base), writer=writer, **reading)
    trained = {k: getattr(pipe.bridge.config, k) for k in ("spatial", "region_strength", "region_levels",
                                                            "object_tokens", "object_queries")}  # fmt: skip
    report = {}
    for text in args.variants:
        folder = out / text.replace(" ", "_")
        if not (folder / "summary.json").is_file():
            pipe.set_spatial(**{**trained, **parse_variant(text)})
            generate = pipe.as_generator(plan_source=args.plan_source, sampler=args.sampler, steps=args.steps,
                                         guidance_scale=args.guidance)  # fmt: skip
            results, _ = score_generator(entries, generate, n_per_prompt=args.n_per_prompt, batch_size=args.batch_size)
            write_report(folder, entries, results, f"spatial: {text}", extra={"variant": parse_variant(text)})
        with open(folder / "results.jsonl") as f:
            report[text] = summarize([json.loads(line) for line in f if line.strip()])
    tasks = sorted({t for s in report.values() for t in s["tasks"]})
    lines = ["| variant | overall | 95% CI | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 3)]
    for text, s in report.items():
        lo, hi = s["overall_ci95"]
        cells = [f"{s['tasks'][t]['score']:.2f}" for t in tasks]
        lines.append(f"| {text} | {s['overall']:.3f} | {lo:.3f}–{hi:.3f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_json(out / "spatial.json", report)


if __name__ == "__main__":
    main()
