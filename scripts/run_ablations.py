"""Strategy-A ablations at one budget: train each variant (config overrides on a base YAML), evaluate it on a
ShapesEval subset with the same seeds, sampler and steps, and print/write a table. Resumable: a variant whose
summary exists is not run again.

    python scripts/run_ablations.py --config configs/toy_A.yaml --steps 1200 --out runs/ablations
"""

import argparse
import json
from pathlib import Path

from alignment.bridge_training import train_bridge
from alignment.stages import load_config
from llm_bridge.bridge import LLMBridge
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.planner import Planner
from safeio import atomic_write_json, atomic_write_text
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, score_generator
from toyworld.eval.scoring import summarize
from toyworld.vocab import TOY_PLAN_SPEC

VARIANTS = {
    "resampler+mean (reference)": {},
    "layers: last": {"layers": "last", "cache_hidden": False},  # uncached: a 300-step run is not worth a new cache
    "layers: learned": {"layers": "learned"},
    "connector: linear": {"connector": "linear"},
    "connector: mlp": {"connector": "mlp"},
    "connector: resampler, timestep-aware": {"connector": "resampler-64q-t"},
    "clip alignment lambda 0": {"stage": {"clip_align_weight": 0.0}},
    "hierarchical injection (fixed)": {"hierarchical": "fixed"},
    "mode: concat": {"mode": "concat"},
}


def evaluate(planner_path, bridge_dir, base, entries, n_per_prompt, guidance, steps, plan_source, sampler):
    planner = Planner.from_pretrained(planner_path, spec=TOY_PLAN_SPEC)
    from diffusion_backbone.models import load_backbone

    pipe = Plan2ImgPipeline(planner, LLMBridge.from_pretrained(bridge_dir), load_backbone(base))
    gen = pipe.as_generator(plan_source=plan_source, sampler=sampler, steps=steps, guidance_scale=guidance)
    res, _ = score_generator(entries, gen, n_per_prompt=n_per_prompt, progress=False)
    return summarize(res, n_boot=300)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/toy_A.yaml")
    p.add_argument("--steps", type=int, default=1200, help="training steps of every variant")
    p.add_argument("--batch-size", type=int, default=None, help="training batch of every variant (default: config)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--limit-per-task", type=int, default=20)
    p.add_argument("--n-per-prompt", type=int, default=2)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plan-source", default="planner", choices=["planner", "oracle"])
    p.add_argument(
        "--reference",
        nargs="*",
        default=[],
        help="LABEL=BRIDGE_DIR: already-trained bridges scored on the same subset (no training), e.g. a longer run",
    )
    p.add_argument("--out", default="runs/ablations")
    args = p.parse_args()
    out = Path(args.out)
    entries = limit_per_task(read_metadata(PACKAGE_METADATA["heldout"]), args.limit_per_task)
    rows = {}
    references = dict(r.split("=", 1) for r in args.reference)
    for name in args.variants + list(references):
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        run = out / slug
        summary_file = run / "summary.json"
        if not summary_file.is_file():
            if name in references:
                cfg, bridge_dir = load_config(args.config, {}), references[name]
            else:
                change = dict(VARIANTS[name])
                stage_change = change.pop("stage", {})
                cfg = load_config(args.config, {"out": str(run), "threads": args.threads, **change})
                stage = cfg.stage_list()[0]
                stage.steps = args.steps
                if args.batch_size:
                    stage.batch_size = args.batch_size
                for k, v in stage_change.items():
                    setattr(stage, k, v)
                bridge_dir = train_bridge(cfg)[-1]
            s = evaluate(
                cfg.planner,
                bridge_dir,
                cfg.base,
                entries,
                args.n_per_prompt,
                args.guidance,
                args.eval_steps,
                args.plan_source,
                args.sampler,
            )
            atomic_write_json(summary_file, s)
        rows[name] = json.loads(summary_file.read_text())
        s = rows[name]
        print(f"| {name} | {s['overall']:.3f} | {s['overall_ci95'][0]:.3f}-{s['overall_ci95'][1]:.3f} |", flush=True)
    tasks = sorted(next(iter(rows.values()))["tasks"])
    lines = ["| variant | overall | 95% CI | " + " | ".join(tasks) + " |", "|---" * (3 + len(tasks)) + "|"]
    for name, s in rows.items():
        lo, hi = s["overall_ci95"]
        lines.append(
            f"| {name} | {s['overall']:.3f} | {lo:.3f}–{hi:.3f} | "
            + " | ".join(f"{s['tasks'][t]['score']:.2f}" for t in tasks)
            + " |"
        )
    table = "\n".join(lines)
    print(table)
    atomic_write_text(out / "ablations.md", table + "\n")
    atomic_write_json(
        out / "ablations.json",
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "rows": rows,
            "n_prompts": len(entries),
            "n_per_prompt": args.n_per_prompt,
            "plan_source": args.plan_source,
            "sampler": args.sampler,
            "eval_steps": args.eval_steps,
            "guidance": args.guidance,
        },
    )
