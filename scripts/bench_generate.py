"""Benchmark generation on this machine: images/s at a batch size, cold command-to-PNG time, and the latency
breakdown of one bridge generation. Prints a table and writes JSON.

    python scripts/bench_generate.py --out runs/bench_generate.json [--skip-bridge]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from safeio import atomic_write_json


def images_per_s(pipe_call, batch: int, repeats: int) -> float:
    prompts = ["three red circles", "a blue square above a green star", "two small purple triangles"] * batch
    pipe_call(prompts[:batch], list(range(batch)))  # warm-up
    t0 = time.perf_counter()
    for r in range(repeats):
        pipe_call(prompts[r : r + batch], list(range(batch)))
    return batch * repeats / (time.perf_counter() - t0)


def cold(cmd: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(cmd + ["-o", os.path.join(tmp, "x.png")], check=True, capture_output=True)
        return time.perf_counter() - t0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-bridge", action="store_true")
    p.add_argument("--out", default="runs/bench_generate.json")
    args = p.parse_args()
    from diffusion_backbone.models import load_backbone
    from diffusion_backbone.pipeline import TextToImagePipeline
    from toyworld.pretrained import pretrained_path

    report = {
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps": args.steps,
        "sampler": "ddim",
        "guidance": 5.0,
    }
    native = TextToImagePipeline(load_backbone(pretrained_path("base")))
    report["native_images_per_s"] = images_per_s(
        lambda pr, s: native(pr, s, steps=args.steps, batch_size=args.batch), args.batch, args.repeats
    )
    plan2img = [sys.executable, "-m", "plan2img"]
    report["native_cold_s"] = cold(plan2img + ["generate", "--native", "three red circles"])
    if not args.skip_bridge:
        from llm_bridge.pipeline import Plan2ImgPipeline
        from toyworld.vocab import TOY_PLAN_SPEC

        bridge = Plan2ImgPipeline.from_pretrained(
            pretrained_path("planner"), pretrained_path("bridge"), pretrained_path("base"), spec=TOY_PLAN_SPEC
        )
        report["bridge_images_per_s"] = images_per_s(
            lambda pr, s: bridge(pr, s, steps=args.steps, batch_size=args.batch), args.batch, args.repeats
        )
        bridge.cache.clear()
        one = bridge(["two blue squares above a red star"], [0], steps=args.steps)
        report["bridge_latency_breakdown_s"] = one.timings
        report["bridge_cold_s"] = cold(plan2img + ["generate", "two blue squares above a red star"])
    print("| measurement | value |\n|---|---|")
    rate = report["native_images_per_s"]
    print(f"| native, batch {args.batch}, {args.steps} steps (ddim, CFG 5) | {rate:.2f} images/s |")
    print(f"| `plan2img generate --native` cold, command to PNG | {report['native_cold_s']:.2f} s |")
    if "bridge_images_per_s" in report:
        print(f"| bridge, batch {args.batch}, {args.steps} steps | {report['bridge_images_per_s']:.2f} images/s |")
        print(f"| `plan2img generate` (bridge) cold, command to PNG | {report['bridge_cold_s']:.2f} s |")
        for k, v in report["bridge_latency_breakdown_s"].items():
            print(f"| one bridge image: {k} | {v * 1000:.0f} ms |")
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
