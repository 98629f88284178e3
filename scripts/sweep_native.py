"""Sweep sampler x guidance for the native baseline on a ShapesEval subset; prints a table, writes JSON.

python scripts/sweep_native.py --limit-per-task 20 --n-per-prompt 2 --out runs/sweep_native.json
"""

import argparse
import json

from diffusion_backbone.models import load_backbone
from diffusion_backbone.pipeline import TextToImagePipeline
from safeio import atomic_write_json
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, score_generator
from toyworld.eval.scoring import summarize
from toyworld.pretrained import pretrained_path

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--samplers", nargs="+", default=["ddim", "euler-a", "dpm++2m"])
    p.add_argument("--guidance", nargs="+", type=float, default=[3.0, 5.0, 7.5])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--limit-per-task", type=int, default=20)
    p.add_argument("--n-per-prompt", type=int, default=2)
    p.add_argument("--out", default="runs/sweep_native.json")
    args = p.parse_args()
    pipe = TextToImagePipeline(load_backbone(args.model or pretrained_path("base")))
    entries = limit_per_task(read_metadata(PACKAGE_METADATA["heldout"]), args.limit_per_task)
    rows = []
    for sampler in args.samplers:
        for g in args.guidance:
            res, _ = score_generator(
                entries,
                pipe.as_generator(sampler=sampler, steps=args.steps, guidance_scale=g),
                n_per_prompt=args.n_per_prompt,
                progress=False,
            )
            s = summarize(res, n_boot=200)
            rows.append(
                {
                    "sampler": sampler,
                    "guidance": g,
                    "overall": s["overall"],
                    "ci95": s["overall_ci95"],
                    "tasks": {k: v["score"] for k, v in s["tasks"].items()},
                }
            )
            print(
                f"| {sampler} | {g} | {s['overall']:.3f} | {s['overall_ci95'][0]:.3f}-{s['overall_ci95'][1]:.3f} |",
                flush=True,
            )
    best = max(rows, key=lambda r: r["overall"])
    atomic_write_json(
        args.out,
        {
            "rows": rows,
            "best": best,
            "n_prompts": len(entries),
            "n_per_prompt": args.n_per_prompt,
            "steps": args.steps,
        },
    )
    print(json.dumps(best, indent=2))
