"""ShapesEval ceiling of a VAE folder alone (ground-truth renders round-tripped through it) and its
reconstruction MSE; for comparing VAE candidates (f=4 vs f=8) before a base model exists. Prints, writes JSON.

    python scripts/eval_vae.py --vae runs/vae_f8/final/vae --out runs/vae_f8/ceiling.json
"""

import argparse
import json

import numpy as np
from diffusers import AutoencoderKL

from diffusion_backbone.sampling import decode_latents, encode_images
from safeio import atomic_write_json
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, ground_truth_generator, score_generator
from toyworld.eval.scoring import summarize, summary_table

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vae", required=True, help="folder with config.json + diffusion_pytorch_model.safetensors")
    p.add_argument("--limit-per-task", type=int, default=None)
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True, local_files_only=True).eval()
    errors = []

    def round_trip(images):
        out = decode_latents(vae, encode_images(vae, images))
        errors.append(float((((out.astype(np.float32) - images.astype(np.float32)) / 255.0) ** 2).mean()))
        return out

    entries = limit_per_task(read_metadata(PACKAGE_METADATA["heldout"]), args.limit_per_task)
    results, _ = score_generator(entries, ground_truth_generator("none", round_trip), n_per_prompt=args.n_per_prompt)
    summary = summarize(results)
    summary["reconstruction_mse"] = float(np.mean(errors))
    summary["latent_shape"] = list(encode_images(vae, np.zeros((1, 64, 64, 3), np.uint8)).shape[1:])
    print(summary_table(summary, f"ShapesEval ceiling of {args.vae}"))
    print(json.dumps({k: summary[k] for k in ("reconstruction_mse", "latent_shape")}))
    atomic_write_json(args.out, summary)
