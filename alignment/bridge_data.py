"""What bridge training reads, computed once and cached as safetensors beside the data set.

- base cache (per base model): VAE latents of every training image, the frozen CLIP image embeddings (the
  alignment targets), the native text encoder's token states (for ``concat`` mode) and its unconditional
  states (the learned null's initial value);
- hidden-state cache (per LLM and layer selection): the plan-span states while the LLM is frozen (with each
  token's plan field and OBJECT entry).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from alignment.prepared import DataPrepError, cached_split, folder_fingerprint
from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.models import Backbone
from diffusion_backbone.sampling import encode_images, images_to_tensor
from llm_bridge.encoder import PlanEncoder, PlanStates
from safeio import atomic_write_bytes


@dataclass
class BridgeData:
    prompts: list[str]
    plans: list[str]
    latents: torch.Tensor  # (N, C, h, w) scaled VAE latents
    clip_image: torch.Tensor  # (N, clip_dim) frozen CLIP image embeddings
    native_tokens: torch.Tensor  # (N, T, d) native text states (fp16)
    native_mask: torch.Tensor  # (N, T) bool
    native_null: Conditioning  # (1, T, d): the native encoder on ""

    def __len__(self) -> int:
        return len(self.prompts)

    def native(self, idx: torch.Tensor) -> Conditioning:
        return Conditioning(self.native_tokens[idx].float(), self.native_mask[idx])


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}))


@torch.no_grad()
def load_bridge_data(data: str | Path, backbone: Backbone, max_examples: int | None = None,
                     progress: bool = True, min_rows: int = 1) -> BridgeData:  # fmt: skip
    """Training rows of ``data`` (a prepared data set, `alignment.prepared`) with their base-model caches (built
    on first use); fewer than ``min_rows`` rows (one batch) is an error, raised before any cache is built."""
    images, prompts, plans = cached_split(data, "train")
    n = len(prompts) if max_examples is None else min(max_examples, len(prompts))
    if n < min_rows:
        raise DataPrepError(f"data set {data} has {n} training rows, fewer than one batch ({min_rows})")
    path = Path(data) / "cache" / f"bridge-base-{folder_fingerprint(backbone.path)}.safetensors"
    if path.is_file():
        cache = load_file(str(path))
    else:
        enc = backbone.text_encoder
        latents, clip_image, tokens, masks = [], [], [], []
        for start in tqdm(range(0, len(prompts), 250), desc="caching latents / CLIP / text", disable=not progress):
            stop = min(len(prompts), start + 250)
            latents.append(encode_images(backbone.vae, images[start:stop]).float())
            clip_image.append(enc.encode_image(images_to_tensor(images[start:stop])).float())
            c = enc.encode(prompts[start:stop])
            tokens.append(c.tokens.half())
            masks.append(c.mask if c.mask is not None else torch.ones(c.tokens.shape[:2], dtype=torch.bool))
        null = enc.encode([""])
        cache = {
            "latents": torch.cat(latents),
            "clip_image": torch.cat(clip_image),
            "native_tokens": torch.cat(tokens),
            "native_mask": torch.cat(masks),
            "null_tokens": null.tokens.float(),
            "null_mask": null.mask if null.mask is not None else torch.ones(null.tokens.shape[:2], dtype=torch.bool),
        }
        _save(path, cache)
    return BridgeData(
        prompts=prompts[:n],
        plans=plans[:n],
        latents=cache["latents"][:n],
        clip_image=cache["clip_image"][:n],
        native_tokens=cache["native_tokens"][:n],
        native_mask=cache["native_mask"][:n],
        native_null=Conditioning(cache["null_tokens"], cache["null_mask"]),
    )


@torch.no_grad()
def hidden_state_cache(encoder: PlanEncoder, data: BridgeData, planner_path: str | Path, use_planner: bool,
                       cache_dir: str | Path, batch_size: int = 64, progress: bool = True) -> PlanStates:  # fmt: skip
    """Plan-span states of every row under the encoder's layer selection (fp16), cached on disk."""
    key = hashlib.sha1(f"{folder_fingerprint(planner_path)}|{encoder.layers}|{use_planner}|{len(data)}|v2".encode())
    path = Path(cache_dir) / f"hidden-{key.hexdigest()[:12]}.safetensors"
    if path.is_file():
        c = load_file(str(path))
        return PlanStates(c["states"], c["mask"], c["field_ids"], c["object_ids"])
    parts = []
    for start in tqdm(range(0, len(data), batch_size), desc="caching LLM states", disable=not progress):
        stop = min(len(data), start + batch_size)
        plans = data.plans[start:stop] if use_planner else None
        s = encoder.encode(data.prompts[start:stop], plans)
        parts.append(PlanStates(s.states.half(), s.mask, s.field_ids, s.object_ids))
    states = PlanStates.cat(parts)
    _save(
        path,
        {"states": states.states, "mask": states.mask, "field_ids": states.field_ids, "object_ids": states.object_ids},
    )
    return states
