"""Where the shipped toy models live: ``toyworld/pretrained/<name>/`` (safetensors + config.json)."""

from __future__ import annotations

from pathlib import Path

PRETRAINED_DIR = Path(__file__).parent

HOW_TO_TRAIN = {
    "base": "python scripts/train_vae.py, scripts/train_clip.py, scripts/train_base_unet.py, then "
    "scripts/ship.py base (see README, 'The frozen base')",
    "planner": "python scripts/train_planner.py, then scripts/ship.py planner (see README, 'The planner')",
    "bridge": "plan2img train --config configs/toy_ABC.yaml, then scripts/ship.py bridge (see README)",
    "critic": "python scripts/train_critic.py, then scripts/ship.py critic (see README, 'Critique and refine')",
}


def pretrained_path(name: str) -> Path:
    """Folder of a shipped model; `FileNotFoundError` saying how to make it when it is missing."""
    path = PRETRAINED_DIR / name
    if not path.is_dir():
        how = HOW_TO_TRAIN.get(name, "see the README")
        raise FileNotFoundError(f"shipped model {name!r} is missing at {path}; train it with {how}")
    return path
