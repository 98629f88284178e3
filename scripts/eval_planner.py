"""Evaluate a planner: exact match, per-field and object F1, parse rate with and without constraints,
latency at batch 1 and 16, and (optionally) 8-bit memory and agreement with fp32. Prints a table, writes JSON.

    python scripts/eval_planner.py --planner toyworld/pretrained/planner --out runs/planner_eval.json --int8
"""

import argparse
import json
import time

import torch

from alignment.planner_sft import eval_prompts, plan_metrics
from planner.planner import Planner
from safeio import atomic_write_json
from toyworld.vocab import TOY_PLAN_SPEC


def latency_ms(planner: Planner, prompts: list[str], batch: int, repeats: int = 3, constrained: bool = True) -> float:
    planner.plan(prompts[:batch], batch_size=batch, constrained=constrained)  # warm-up
    t0 = time.perf_counter()
    for r in range(repeats):
        planner.plan(prompts[r * batch : (r + 1) * batch], batch_size=batch, constrained=constrained)
    return (time.perf_counter() - t0) / (repeats * batch) * 1000


def model_bytes(model) -> int:
    return model.get_memory_footprint()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--planner", default="toyworld/pretrained/planner")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--int8", action="store_true", help="also load in 8-bit and compare with fp32 on 200 prompts")
    p.add_argument("--latency-only", action="store_true", help="only measure latency (e.g. idle machine)")
    p.add_argument("--out", default="runs/planner_eval.json")
    args = p.parse_args()
    planner = Planner.from_pretrained(args.planner, spec=TOY_PLAN_SPEC)
    report = {"planner": args.planner}
    for split in () if args.latency_only else ("heldout", "train"):
        prompts, gold = eval_prompts(split, args.n, args.seed)
        for constrained in (True, False):
            res = planner.plan(prompts, constrained=constrained, batch_size=32)
            report[f"{split}_{'constrained' if constrained else 'unconstrained'}"] = plan_metrics(
                res, gold, planner.spec
            )
    prompts, _ = eval_prompts("heldout", 64, args.seed + 1)
    report["latency_ms_per_plan"] = {
        "batch_1": latency_ms(planner, prompts, 1),
        "batch_1_unconstrained": latency_ms(planner, prompts, 1, constrained=False),
        "batch_16": latency_ms(planner, prompts, 16),
    }
    report["threads"] = torch.get_num_threads()
    if args.int8:
        fp32_bytes = model_bytes(planner.model)
        try:
            q = Planner.from_pretrained(args.planner, spec=TOY_PLAN_SPEC, load_in_8bit=True, device="cpu")
            prompts, _ = eval_prompts("heldout", 200, args.seed + 2)
            a = [r.text for r in planner.plan(prompts, batch_size=32)]
            b = [r.text for r in q.plan(prompts, batch_size=32)]
            report["int8"] = {
                "fp32_bytes": fp32_bytes,
                "int8_bytes": model_bytes(q.model),
                "plan_agreement": sum(x == y for x, y in zip(a, b)) / len(a),
                "n": len(a),
            }
        except Exception as err:  # report what does not work rather than hide it
            report["int8"] = {"error": f"{type(err).__name__}: {err}", "fp32_bytes": fp32_bytes}
    print(
        "| split | decoding | exact | parse | object F1 | "
        + " | ".join(f"F1 {f}" for f in ["STYLE", "LAYOUT", "OBJECT", "COLOR", "MATERIAL", "LIGHTING", "CAMERA"])
        + " |"
    )
    print("|---" * 12 + "|")
    for key, m in report.items():
        if isinstance(m, dict) and "exact_match" in m:
            split, dec = key.split("_", 1)
            f1 = " | ".join(f"{m['field_f1'][f]:.3f}" for f in m["field_f1"])
            print(
                f"| {split} | {dec} | {m['exact_match']:.3f} | {m['parse_rate']:.3f} | {m['object_f1']:.3f} | {f1} |"
            )
    print(json.dumps({k: v for k, v in report.items() if "latency" in k or "int8" in k}, indent=2))
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
