"""Start-up and latency of the shipped chain (issue: a person's first hour). Measured in one run, medians of
``--repeats`` cold processes each:

- ``plan2img --help``;
- the bare import of torch, diffusers and transformers (the yardstick; ``import diffusers`` alone is lazy);
- the import of the modules a generation needs (the diffusers U-Net and VAE classes, our bridge and planner; the
  bitsandbytes hidden as the console script does): the floor of any cold generate, before it loads or runs a
  model;
- ``plan2img generate`` cold, from command to PNG (the console script: bitsandbytes hidden unless asked);
- the same through ``main([...])`` in a fresh interpreter, where bitsandbytes is not hidden (the behaviour before);
- warm generation: a library call in one process, batch 1, 25 steps, DPM-Solver++ 2M, CFG 7.5, per image.

Prints a table and writes JSON. Goals: --help under 1 s; cold generate at most 1.4x the bare import; warm
generation at most 1 s per image (on 2 idle cores: run nothing else meanwhile).

    python scripts/bench_startup.py --out runs/bench_startup.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safeio import atomic_write_json

PROMPT = "two blue squares and a red star"
NEEDED = (
    "import sys; sys.modules['bitsandbytes'] = None; "
    "import diffusion_backbone.models, llm_bridge.bridge, llm_bridge.pipeline, planner.planner, "
    "toyworld.grammar; from transformers import LlamaForCausalLM"
)


def wall(cmd: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def warm_generation(repeats: int) -> list[float]:
    from plan2img.cli import _load_bridge_pipeline, build_parser

    pipe = _load_bridge_pipeline(build_parser().parse_args(["generate", PROMPT]))
    plan = pipe.writer.plan([PROMPT])[0].plan.to_text()
    kwargs = dict(plans=[plan], sampler="dpm++2m", steps=25, guidance_scale=7.5)
    pipe([PROMPT], [0], **kwargs)  # warm-up
    out = []
    for k in range(repeats):
        t0 = time.perf_counter()
        pipe([PROMPT], [k + 1], **kwargs)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench_startup.json")
    args = p.parse_args()
    exe = Path(sys.executable).with_name("plan2img")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "plan2img"]
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "out.png")
        rows = {
            "plan2img --help": wall([*cli, "--help"], args.repeats),
            "import torch, diffusers, transformers": wall(
                [sys.executable, "-c", "import torch, diffusers, transformers"], args.repeats
            ),
            "import of what generate needs (no models loaded)": wall([sys.executable, "-c", NEEDED], args.repeats),
            "plan2img generate (cold)": wall([*cli, "generate", PROMPT, "-o", png], args.repeats),
            "generate via main([...]), bitsandbytes loaded (before)": wall(
                [
                    sys.executable,
                    "-c",
                    f"from plan2img.cli import main; main(['generate', {PROMPT!r}, '-o', {png!r}])",
                ],
                args.repeats,
            ),
        }
    rows["warm generation, per image"] = warm_generation(max(3, args.repeats))
    med = {k: statistics.median(v) for k, v in rows.items()}
    bare = med["import torch, diffusers, transformers"]
    ratio = med["plan2img generate (cold)"] / bare
    goals = {
        "help under 1 s": med["plan2img --help"] < 1.0,
        "cold generate <= 1.4x bare import": ratio <= 1.4,
        "warm generation <= 1 s per image": med["warm generation, per image"] <= 1.0,
    }
    print("| measurement | median s | runs |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    print(f"\ncold generate / bare import: {ratio:.2f}x")
    floor = med["import of what generate needs (no models loaded)"] / bare
    print(f"import of what generate needs / bare import: {floor:.2f}x (the floor before any model is loaded)")
    for goal, ok in goals.items():
        print(f"{goal}: {'met' if ok else 'NOT met'}")
    atomic_write_json(args.out, {"seconds": rows, "median": med, "ratio_cold_generate_to_bare_import": ratio,
                                 "goals": goals, "cpus": os.cpu_count(), "load_avg": os.getloadavg()})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
