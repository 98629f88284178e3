"""Train the toy CLIP from scratch (resumes from OUT/checkpoint) and report retrieval accuracy. Example:

python scripts/train_clip.py --data data/toy50k --out runs/clip --max-steps 2500
"""

import json

from alignment.args import parse_config
from alignment.base.clip import CLIPTrainConfig, retrieval_accuracy, train_clip
from alignment.prepared import cached_split
from diffusion_backbone.text_encoders import OpenCLIPTextEncoder
from safeio import atomic_write_json

if __name__ == "__main__":
    cfg = parse_config(CLIPTrainConfig, description=__doc__)
    final = train_clip(cfg)
    enc = OpenCLIPTextEncoder.from_folder(final)
    report = {}
    for split in ("heldout", "train"):
        images, prompts, plans = cached_split(cfg.data, split)
        report[split] = retrieval_accuracy(enc, images, prompts, plans, n_candidates=100)
    atomic_write_json(f"{cfg.out}/retrieval.json", report)
    print(json.dumps(report, indent=2))
