"""Bridge measurements beyond the main table: guidance sweep, and the drift of conditioning tensors and of
ShapesEval when the LLM runs in fp32 vs bf16 vs fp16. Prints tables, writes JSON.

    python scripts/eval_bridge_extras.py --bridge runs/bridge_A/stage-A --out runs/bridge_extras.json
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--planner", default=None)
    p.add_argument("--bridge", required=True)
    p.add_argument("--base", default=None)
    p.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 3.0, 5.0, 7.5])
    p.add_argument("--limit-per-task", type=int, default=20)
    p.add_argument("--n-per-prompt", type=int, default=2)
    p.add_argument("--plan-source", default="planner", choices=["planner", "oracle"])
    p.add_argument("--out", default="runs/bridge_extras.json")
    args = p.parse_args()
    planner_path = args.planner or pretrained_path("planner")
    base = args.base or pretrained_path("base")
    entries = limit_per_task(read_metadata(PACKAGE_METADATA["heldout"]), args.limit_per_task)
    report = {"n_prompts": len(entries), "n_per_prompt": args.n_per_prompt, "plan_source": args.plan_source}
    pipe32 = pipeline(planner_path, args.bridge, base, torch.float32)
    rows = []
    for g in args.guidance:
        res, _ = score_generator(
            entries,
            pipe32.as_generator(plan_source=args.plan_source, guidance_scale=g),
            n_per_prompt=args.n_per_prompt,
            progress=False,
        )
        s = summarize(res, n_boot=300)
        rows.append(
            {
                "guidance": g,
                "overall": s["overall"],
                "ci95": s["overall_ci95"],
                "tasks": {k: v["score"] for k, v in s["tasks"].items()},
            }
        )
        print(
            f"| guidance {g} | {s['overall']:.3f} | {s['overall_ci95'][0]:.3f}-{s['overall_ci95'][1]:.3f} |",
            flush=True,
        )
    report["guidance_sweep"] = rows
    # precision drift: same prompts and oracle plans through the LLM in each precision
    prompts = [e["prompt"] for e in entries]
    plans = [e["plan"] for e in entries]
    with torch.no_grad():
        ref_states, _ = pipe32.plan_states(prompts, plans)
        ref = pipe32.bridge.conditioning(ref_states).tokens
    drift = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        try:
            pipe = pipeline(planner_path, args.bridge, base, dtype)
            with torch.no_grad():
                states, _ = pipe.plan_states(prompts, plans)
                tok = pipe.bridge.conditioning(states).tokens
            diff = (tok - ref).abs()
            cos = torch.nn.functional.cosine_similarity(tok.flatten(1), ref.flatten(1)).mean().item()
            res, _ = score_generator(
                entries,
                pipe.as_generator(plan_source=args.plan_source),
                n_per_prompt=args.n_per_prompt,
                progress=False,
            )
            s = summarize(res, n_boot=300)
            drift[name] = {
                "max_abs": diff.max().item(),
                "mean_abs": diff.mean().item(),
                "relative": (diff.norm() / ref.norm()).item(),
                "cosine": cos,
                "overall": s["overall"],
                "ci95": s["overall_ci95"],
            }
        except Exception as err:  # e.g. an op without a CPU kernel in this precision: report it
            drift[name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, json.dumps(drift[name]), flush=True)
    fp32 = next(r for r in rows if r["guidance"] == 5.0) if any(r["guidance"] == 5.0 for r in rows) else rows[-1]
    drift["float32"] = {"overall": fp32["overall"], "ci95": fp32["ci95"]}
    report["precision_drift"] = drift
    atomic_write_json(args.out, report)
    print(json.dumps(report["precision_drift"], indent=2))
