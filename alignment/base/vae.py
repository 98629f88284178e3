"""Train the toy VAE (`AutoencoderKL`) on rendered images: weighted MSE + a tiny KL, bf16 autocast on CPU.

Objects are a small share of the pixels, so the squared error is weighted up on saturated (object)
pixels; colors are what a small VAE learns last, and the ShapesEval ceiling needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alignment.loop import EpochSampler, fit, warmup_cosine
from alignment.prepared import cached_split
from diffusion_backbone.sampling import images_to_tensor
from diffusion_backbone.toy import toy_vae
from safeio import atomic_dir


@dataclass
class VAETrainConfig:
    data: str = "data/toy50k"  # a `plan2img data build` folder; its "train" split is used
    out: str = "runs/vae"  # checkpoint/, log.jsonl, final/ (the trained VAE folder)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # 3 blocks: f=4 (16x16x4 latents); 4 blocks: f=8
    latent_channels: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    max_steps: int = 7000
    warmup: int = 200
    kl_weight: float = 1e-6  # as in Stable Diffusion's VAE: keep latents near a Gaussian, barely
    fg_weight: float = 4.0  # extra weight of the squared error on saturated (object) pixels
    bf16: bool = True  # autocast on CPU; ~1.7x faster on AVX512-BF16 machines
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    stop_at: int | None = None  # stop early at this step with a checkpoint (split a long run; resume later)
    log_every: int = 25
    threads: int | None = None
    scale_samples: int = 2000  # training images used to set the latent scaling factor (1 / std)
    extra: dict = field(default_factory=dict)


def object_weight(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Per-pixel weight (B, 1, H, W) = 1 + fg_weight * saturation ramp; ``x`` in [-1, 1]."""
    x01 = (x + 1) / 2
    mx, mn = x01.max(1, keepdim=True).values, x01.min(1, keepdim=True).values
    sat = (mx - mn) / mx.clamp_min(1e-3)
    return 1 + fg_weight * ((sat - 0.2) / 0.4).clamp(0, 1)


def train_vae(cfg: VAETrainConfig, progress: bool = True) -> Path:
    """Train through the one loop (resuming from ``cfg.out/checkpoint`` if present); returns the final VAE
    folder (or the checkpoint when stopped early at ``cfg.stop_at``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    images, _, _ = cached_split(cfg.data, "train")
    torch.manual_seed(cfg.seed)
    vae = toy_vae(tuple(cfg.block_out_channels), cfg.latent_channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.max_steps, cfg.warmup)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    sampler = EpochSampler(len(images), cfg.batch_size, cfg.seed)

    def losses(step: int, device: torch.device) -> dict[str, torch.Tensor]:
        x = images_to_tensor(images[np.sort(sampler.batch(step).numpy())]).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(gen)).sample.float()
        w = object_weight(x, cfg.fg_weight)
        mse = ((rec - x) ** 2 * w).mean() / w.mean()
        kl = post.kl().float().mean()
        return {"loss": mse + cfg.kl_weight * kl, "mse": mse, "kl": kl}

    if not fit("vae", cfg, vae, opt, sched, losses, generators={"sample": gen}, progress=progress):
        return out / "checkpoint"  # stopped early on purpose: resume to finish
    return export_vae(vae.cpu(), images, cfg, out / "final")


@torch.no_grad()
def export_vae(vae, images: np.ndarray, cfg: VAETrainConfig, folder: Path) -> Path:
    """Set ``scaling_factor`` to 1 / std of training latents and save the VAE folder (safetensors)."""
    vae.eval()
    n = min(cfg.scale_samples, len(images))
    latents = []
    for start in range(0, n, 100):
        x = images_to_tensor(images[start : min(n, start + 100)])
        latents.append(vae.encode(x).latent_dist.mode())
    std = torch.cat(latents).float().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    with atomic_dir(folder) as tmp:
        vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
    print(f"latent std {std:.4f}; scaling_factor {1.0 / std:.4f}; saved {folder / 'vae'}", flush=True)
    return folder
