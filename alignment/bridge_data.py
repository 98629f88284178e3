"""What bridge training reads, computed once and cached beside the data set as shards of safetensors, read
memory-mapped (`alignment.shards`), so a data set larger than RAM trains.

- base cache (per base model): VAE latents of every training image, the frozen CLIP image embeddings (the
  alignment targets: the base's own image tower, as the toy CLIP has, or a separate HF CLIP folder; none
  when neither exists), the native text encoder's token states (for ``concat`` mode; on SDXL also its pooled
  vector) and its unconditional states (the learned null's initial value, with SDXL's time ids);
- hidden-state cache (per LLM and layer selection): the plan-span states while the LLM is frozen (with each
  token's plan field and OBJECT entry).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from alignment.prepared import DataPrepError, cached_split, folder_fingerprint
from alignment.shards import ShardedColumn, ShardedTable, ShardWriter, is_finished
from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.models import Backbone
from diffusion_backbone.sampling import encode_images, images_to_tensor
from diffusion_backbone.sdxl import uses_text_time
from llm_bridge.encoder import PlanEncoder, PlanStates
from safeio import atomic_write_bytes, atomic_write_json


@dataclass
class BridgeData:
    prompts: list[str]
    plans: list[str]
    latents: ShardedColumn  # (N, C, h, w) scaled VAE latents
    clip_image: ShardedColumn | None  # (N, clip_dim) frozen CLIP image embeddings; None: no image tower
    native_tokens: ShardedColumn  # (N, T, d) native text states (fp16)
    native_mask: ShardedColumn  # (N, T) bool
    native_null: Conditioning  # (1, T, d): the native encoder's negative for "" (SDXL: with pooled, time ids)
    native_pooled: ShardedColumn | None = None  # (N, d_pooled) SDXL's pooled text vector

    def __len__(self) -> int:
        return len(self.prompts)

    def native(self, idx: torch.Tensor) -> Conditioning:
        pooled = None if self.native_pooled is None else self.native_pooled[idx].float()
        time_ids = None
        if self.native_null.time_ids is not None:
            time_ids = self.native_null.time_ids.expand(len(idx), -1)
        return Conditioning(self.native_tokens[idx].float(), self.native_mask[idx], pooled, time_ids=time_ids)


class ShardedPlanStates:
    """Cached plan states read row by row from a `ShardedTable`; `index` pads a batch to the cache's longest plan
    (as one in-memory `PlanStates.cat` of all rows would)."""

    NAMES = ("states", "mask", "field_ids", "object_ids")

    def __init__(self, table: ShardedTable):
        self.table = table
        self.length = int(json.loads((table.folder / "plan_states.json").read_text())["max_tokens"])

    def __len__(self) -> int:
        return len(self.table)

    def index(self, idx) -> PlanStates:
        rows = {name: self.table.rows(name, idx) for name in self.NAMES}

        def padded(row: torch.Tensor, t_dim: int, value=0) -> torch.Tensor:
            extra = self.length - row.shape[t_dim]
            pad = [0, 0] * (-t_dim - 1) + [0, extra]
            return F.pad(row, pad, value=value)

        return PlanStates(
            torch.stack([padded(r, -2) for r in rows["states"]]),
            torch.stack([padded(r, -1, False) for r in rows["mask"]]),
            torch.stack([padded(r, -1) for r in rows["field_ids"]]),
            torch.stack([padded(r, -1) for r in rows["object_ids"]]),
        )


def _ones_mask(c: Conditioning) -> torch.Tensor:
    return c.mask if c.mask is not None else torch.ones(c.tokens.shape[:2], dtype=torch.bool)


ImageEmbedder = Callable[[np.ndarray], torch.Tensor]  # (B, H, W, 3) uint8 -> (B, d) CLIP image embeddings


def image_embedder(backbone: Backbone, clip_image_model: str | Path | None = None) -> ImageEmbedder | None:
    """The CLIP image embeddings the alignment loss targets: from ``clip_image_model`` (a local HF CLIP folder:
    ``CLIPModel`` or ``CLIPVisionModelWithProjection`` with its image processor) when given, else the base's own
    image tower (the toy open_clip model has one; SD/SDXL folders have none: None)."""
    if clip_image_model is None:
        enc = backbone.text_encoder
        if not hasattr(enc, "encode_image"):
            return None
        return lambda images: enc.encode_image(images_to_tensor(images)).float()
    folder = Path(clip_image_model)
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise DataPrepError(f"clip_image_model: could not load a CLIP image tower from {folder}: {err}") from None
    model.requires_grad_(False).eval().to(backbone.device)

    def embed(images: np.ndarray) -> torch.Tensor:
        pixels = processor(images=[np.array(im) for im in images], return_tensors="pt").pixel_values  # writable copies
        return model(pixel_values=pixels.to(model.device, model.dtype)).image_embeds.float()

    return embed


@torch.no_grad()
def _build_base_cache(folder: Path, backbone: Backbone, images, prompts: list[str], shard_rows: int,
                      progress: bool, embed: ImageEmbedder | None) -> None:  # fmt: skip
    enc = backbone.text_encoder
    null = enc.encode_negative([""])
    null_state = {"tokens": null.tokens.float().contiguous(), "mask": _ones_mask(null)}
    sdxl = uses_text_time(backbone.unet)
    if sdxl:
        null_state.update(pooled=null.pooled.float().contiguous(), time_ids=null.time_ids.float().contiguous())
    atomic_write_bytes(folder / "null.safetensors", safetensors_bytes(null_state))
    writer = ShardWriter(folder)
    for start in tqdm(range(0, len(prompts), shard_rows), desc="caching latents / CLIP / text", disable=not progress):
        stop = min(len(prompts), start + shard_rows)
        c = enc.encode(prompts[start:stop])
        row = {
            "latents": encode_images(backbone.vae, images[start:stop]).float(),
            "native_tokens": c.tokens.half(),
            "native_mask": _ones_mask(c),
        }
        if embed is not None:
            row["clip_image"] = embed(images[start:stop])
        if sdxl:
            row["native_pooled"] = c.pooled.half()
        writer.add(row)
    writer.finish()


def load_bridge_data(data: str | Path, backbone: Backbone, max_examples: int | None = None,
                     progress: bool = True, min_rows: int = 1, shard_rows: int = 1000,
                     clip_image_model: str | Path | None = None) -> BridgeData:  # fmt: skip
    """Training rows of ``data`` (a prepared data set, `alignment.prepared`) with their base-model caches: shards
    of ``shard_rows`` rows under ``<data>/cache/bridge-base-<model fingerprint>/`` (and the CLIP folder's, when
    ``clip_image_model`` is given), built on first use and read memory-mapped. Fewer than ``min_rows`` rows (one
    batch) is an error, raised before any cache is built."""
    images, prompts, plans = cached_split(data, "train")
    n = len(prompts) if max_examples is None else min(max_examples, len(prompts))
    if n < min_rows:
        raise DataPrepError(f"data set {data} has {n} training rows, fewer than one batch ({min_rows})")
    name = f"bridge-base-{folder_fingerprint(backbone.path)}"
    if clip_image_model is not None:
        name += f"-clip-{folder_fingerprint(clip_image_model)}"
    folder = Path(data) / "cache" / name
    if not is_finished(folder):
        embed = image_embedder(backbone, clip_image_model)
        folder.mkdir(parents=True, exist_ok=True)
        _build_base_cache(folder, backbone, images, prompts, shard_rows, progress, embed)
    table = ShardedTable(folder)
    null = load_file(str(folder / "null.safetensors"))

    def column(key: str) -> ShardedColumn | None:
        return table[key].head(n) if key in table.names else None

    return BridgeData(
        prompts=prompts[:n],
        plans=plans[:n],
        latents=table["latents"].head(n),
        clip_image=column("clip_image"),
        native_tokens=table["native_tokens"].head(n),
        native_mask=table["native_mask"].head(n),
        native_null=Conditioning(null["tokens"], null["mask"], null.get("pooled"), time_ids=null.get("time_ids")),
        native_pooled=column("native_pooled"),
    )


@torch.no_grad()
def hidden_state_cache(encoder: PlanEncoder, data: BridgeData, planner_path: str | Path, use_planner: bool,
                       cache_dir: str | Path, batch_size: int = 64,
                       progress: bool = True) -> ShardedPlanStates:  # fmt: skip
    """Plan-span states of every row under the encoder's layer selection (fp16), cached on disk as one shard
    per batch and read memory-mapped."""
    key = hashlib.sha1(f"{folder_fingerprint(planner_path)}|{encoder.layers}|{use_planner}|{len(data)}|v3".encode())
    folder = Path(cache_dir) / f"hidden-{key.hexdigest()[:12]}"
    if not is_finished(folder):
        folder.mkdir(parents=True, exist_ok=True)
        writer, longest = ShardWriter(folder), 0
        for start in tqdm(range(0, len(data), batch_size), desc="caching LLM states", disable=not progress):
            stop = min(len(data), start + batch_size)
            plans = data.plans[start:stop] if use_planner else None
            s = encoder.encode(data.prompts[start:stop], plans)
            writer.add(
                {"states": s.states.half(), "mask": s.mask, "field_ids": s.field_ids, "object_ids": s.object_ids}
            )
            longest = max(longest, s.mask.shape[1])
        atomic_write_json(folder / "plan_states.json", {"max_tokens": longest})
        writer.finish()
    return ShardedPlanStates(ShardedTable(folder))
