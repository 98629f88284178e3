"""Benchmark: renderer throughput (images/s) and `data build` time, on this machine's CPU cores.

    python scripts/bench_render.py --n 50000 --out runs/bench_render.json

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from safeio import atomic_write_json
from toyworld.data import build_dataset
from toyworld.render import render
from toyworld.scene import sample_spec, spec_to_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="images for the data build")
    parser.add_argument("--n-render", type=int, default=5_000, help="images for the single-core render timing")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="runs/bench_render.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    scenes = [spec_to_scene(sample_spec(rng).spec, rng) for _ in range(args.n_render)]
    t0 = time.perf_counter()
    for s in scenes:
        render(s)
    render_s = time.perf_counter() - t0

    tmp = tempfile.mkdtemp(prefix="bench_render_")
    try:
        stats = build_dataset(os.path.join(tmp, "ds"), n=args.n, seed=0, workers=args.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "render_one_core_images_per_s": args.n_render / render_s,
        "data_build": stats,
    }
    print("| measurement | value |\n|---|---|")
    print(f"| render, 1 core (scenes pre-sampled) | {result['render_one_core_images_per_s']:.0f} images/s |")
    print(f"| data build {args.n} images, {stats['workers']} workers: total | {stats['total_s']:.1f} s |")
    print(f"| data build throughput (sample + render + PNG + save) | {stats['images_per_s']:.0f} images/s |")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
