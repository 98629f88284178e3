"""Strategy-A training throughput with and without the hidden-state cache (same config, a few steps each).
Prints a table, writes JSON.

    python scripts/bench_bridge_training.py --config configs/toy_A.yaml --steps 40
"""

import argparse
import json
import shutil
import tempfile
import time

from alignment.bridge_training import BridgeTrainer
from alignment.stages import load_config
from safeio import atomic_write_json

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/toy_A.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="runs/bench_bridge_training.json")
    args = p.parse_args()
    report = {}
    for cached in (True, False):
        tmp = tempfile.mkdtemp(prefix="bench_bridge_")
        try:
            cfg = load_config(
                args.config, {"out": tmp, "cache_hidden": cached, "checkpoint_every": 10**9, "log_every": 10**9}
            )
            cfg.stage_list()[0].steps = args.steps + 5
            trainer = BridgeTrainer(cfg, progress=False)
            stage = cfg.stage_list()[0]
            trainer.hidden_states(stage)  # build the cache outside the timing
            trainer._run_stage(0, stage, 0, 0, stop_at=5)  # warm-up
            t0 = time.perf_counter()
            trainer._run_stage(0, stage, 5, 0, stop_at=args.steps + 5)
            report["cached" if cached else "uncached"] = {
                "steps_per_s": args.steps / (time.perf_counter() - t0),
                "batch_size": stage.batch_size,
            }
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("| hidden states | steps/s |\n|---|---|")
    for k, v in report.items():
        print(f"| {k} | {v['steps_per_s']:.3f} |")
    atomic_write_json(args.out, report)
    print(json.dumps(report))
