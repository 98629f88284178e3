"""Train the LLM bridge with a staged curriculum from a YAML config (resumes from OUT/checkpoint). Example:

python scripts/train_bridge.py --config configs/toy_A.yaml [--set out=runs/x connector=mlp]
"""

import argparse

import yaml

from alignment.bridge_training import train_bridge
from alignment.stages import load_config

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", default=[], help="top-level overrides KEY=VALUE (YAML values)")
    args = p.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    for folder in train_bridge(load_config(args.config, overrides)):
        print(folder)
