"""Copy a trained model folder into toyworld/pretrained/ with fp16 weights, and record it in MANIFEST.json.

    python scripts/ship.py base --src runs/unet/final --note "python scripts/train_base_unet.py ..."
    python scripts/ship.py planner --src runs/planner/final
    python scripts/ship.py bridge --src runs/bridge_ABC/stage-ABC
    python scripts/ship.py planner_wide --src runs/planner_wide_lora/final/adapter   (a LoRA adapter folder)

Every floating tensor of every .safetensors file is stored as fp16 (loaders compute in fp32); other files
(configs, tokenizers) are copied. The drift this causes is measured by scripts/check_fp16.py.
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safeio import atomic_dir, atomic_write_json
from toyworld.pretrained import PRETRAINED_DIR


def ship(name: str, src: Path, note: str, dtype: torch.dtype = torch.float16) -> dict:
    if not src.is_dir():
        raise SystemExit(f"error: {src} does not exist")
    dest = PRETRAINED_DIR / name
    n_params, n_bytes = 0, 0
    with atomic_dir(dest) as tmp:
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src)
            if f.is_dir() or any(part.startswith(".") for part in rel.parts):
                continue
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".safetensors":
                tensors = load_file(str(f))
                cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
                save_file(cast, str(out))
                n_params += sum(v.numel() for v in tensors.values() if v.is_floating_point())
            elif f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
                raise SystemExit(f"error: refusing to ship pickled file {f}")
            else:
                shutil.copy2(f, out)
    for f in dest.rglob("*"):
        if f.is_file():
            n_bytes += f.stat().st_size
    digest = hashlib.sha256()
    for f in sorted(dest.rglob("*.safetensors")):
        digest.update(f.read_bytes())
    entry = {
        "source": str(src),
        "note": note,
        "dtype": str(dtype).replace("torch.", ""),
        "parameters": n_params,
        "bytes": n_bytes,
        "sha256": digest.hexdigest()[:16],
    }
    manifest_path = PRETRAINED_DIR / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[name] = entry
    manifest["total_bytes"] = sum(v["bytes"] for k, v in manifest.items() if isinstance(v, dict))
    atomic_write_json(manifest_path, manifest)
    return entry


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name", choices=["base", "planner", "planner_wide", "bridge", "critic"])
    p.add_argument("--src", required=True)
    p.add_argument("--note", default="", help="how it was trained (command, time)")
    args = p.parse_args()
    print(json.dumps(ship(args.name, Path(args.src), args.note), indent=2))
