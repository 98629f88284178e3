"""Train the LLM bridge with a staged curriculum from a YAML config (resumes from OUT/checkpoint); the same
as `plan2img train`. Example:

    python scripts/train_bridge.py --config configs/toy_A.yaml --set out=runs/x connector=mlp
"""

import sys

from plan2img.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
