"""Bridge measurements beyond the main table: a guidance sweep, and the drift of the conditioning tensors and of
ShapesEval when the LLM runs in fp32 vs bf16 vs fp16. Same held-out subset, seeds, sampler and steps for every row.
Prints tables, writes JSON.

    python scripts/eval_bridge_extras.py --bridge runs/bridge_ABC/stage-A --out runs/bridge_extras.json
"""

import argparse
import json

import torch

from diffusion_backbone.models import load_backbone
from llm_bridge.bridge import LLMBridge
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.planner import Planner
from safeio import atomic_write_json
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, score_generator
from toyworld.eval.scoring import summarize
from toyworld.pretrained import pretrained_path
from toyworld.vocab import TOY_PLAN_SPEC


def pipeline(planner_path, bridge_path, base, dtype):
    planner = Planner.from_pretrained(planner_path, spec=TOY_PLAN_SPEC, dtype=dtype)
    return Plan2ImgPipeline(planner, LLMBridge.from_pretrained(bridge_path), load_backbone(base))


def score(pipe, entries, args, guidance):
    """ShapesEval summary of ``pipe`` on ``entries`` at ``guidance`` (sampler, steps, plan source from args)."""
    gen = pipe.as_generator(
        plan_source=args.plan_source, sampler=args.sampler, steps=args.steps, guidance_scale=guidance
    )
    res, _ = score_generator(entries, gen, n_per_prompt=args.n_per_prompt, progress=False)
    return summarize(res, n_boot=300)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--planner", default=None)
    p.add_argument("--bridge", required=True)
    p.add_argument("--base", default=None)
    p.add_argument("--guidance", nargs="+", type=float, default=[2.0, 3.0, 5.0, 7.5, 10.0])
    p.add_argument("--drift-guidance", type=float, default=7.5, help="guidance of the precision-drift rows")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--limit-per-task", type=int, default=20)
    p.add_argument("--n-per-prompt", type=int, default=2)
    p.add_argument("--plan-source", default="planner", choices=["planner", "oracle"])
    p.add_argument("--out", default="runs/bridge_extras.json")
    args = p.parse_args()
    planner_path = args.planner or pretrained_path("planner")
    base = args.base or pretrained_path("base")
    entries = limit_per_task(read_metadata(PACKAGE_METADATA["heldout"]), args.limit_per_task)
    report = {
        "bridge": args.bridge,
        "n_prompts": len(entries),
        "n_per_prompt": args.n_per_prompt,
        "plan_source": args.plan_source,
        "sampler": args.sampler,
        "steps": args.steps,
        "drift_guidance": args.drift_guidance,
    }
    pipe32 = pipeline(planner_path, args.bridge, base, torch.float32)
    rows = []
    for g in args.guidance:
        s = score(pipe32, entries, args, g)
        rows.append(
            {
                "guidance": g,
                "overall": s["overall"],
                "ci95": s["overall_ci95"],
                "tasks": {k: v["score"] for k, v in s["tasks"].items()},
            }
        )
        lo, hi = s["overall_ci95"]
        print(f"| guidance {g} | {s['overall']:.3f} | {lo:.3f}-{hi:.3f} |", flush=True)
    report["guidance_sweep"] = rows
    # precision drift: the same prompts and canonical plans through the LLM in each precision
    prompts = [e["prompt"] for e in entries]
    plans = [e["plan"] for e in entries]
    with torch.no_grad():
        ref_states, ref_native = pipe32.plan_states(prompts, plans)
        ref = pipe32.bridge.conditioning(ref_states, ref_native).tokens
    same = [r for r in rows if r["guidance"] == args.drift_guidance]
    if same:
        drift = {"float32": {"overall": same[0]["overall"], "ci95": same[0]["ci95"]}}
    else:
        s = score(pipe32, entries, args, args.drift_guidance)
        drift = {"float32": {"overall": s["overall"], "ci95": s["overall_ci95"]}}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        try:
            pipe = pipeline(planner_path, args.bridge, base, dtype)
            with torch.no_grad():
                states, native = pipe.plan_states(prompts, plans)
                tok = pipe.bridge.conditioning(states, native).tokens.float()
            diff = (tok - ref).abs()
            cos = torch.nn.functional.cosine_similarity(tok.flatten(1), ref.flatten(1)).mean().item()
            s = score(pipe, entries, args, args.drift_guidance)
            drift[name] = {
                "max_abs": diff.max().item(),
                "mean_abs": diff.mean().item(),
                "relative": (diff.norm() / ref.norm()).item(),
                "cosine": cos,
                "overall": s["overall"],
                "ci95": s["overall_ci95"],
            }
        except Exception as err:  # e.g. an op without a CPU kernel in this precision: report it, go on
            drift[name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, json.dumps(drift[name]), flush=True)
    report["precision_drift"] = drift
    atomic_write_json(args.out, report)
    print(json.dumps(report["precision_drift"], indent=2))
