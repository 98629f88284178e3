"""Train the toy base U-Net: text-conditioned latent diffusion on the toy CLIP's token states.

Latents are encoded once by the trained VAE and text states computed once by the frozen CLIP (the cache
is saved as safetensors beside the run), so a step costs one U-Net forward and backward. Caption dropout
(the empty prompt's states) trains the unconditional branch that CFG needs; the loss is epsilon MSE with
min-SNR-gamma weighting (Hang et al. 2023), which speeds up convergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from alignment.loop import EpochSampler, fit, warmup_cosine
from alignment.losses import min_snr_weight
from alignment.prepared import cached_split
from alignment.shards import ShardedTable, ShardWriter, is_finished
from diffusion_backbone.models import Backbone, save_backbone
from diffusion_backbone.sampling import encode_images
from diffusion_backbone.text_encoders import OpenCLIPTextEncoder
from diffusion_backbone.toy import toy_unet
from safeio import atomic_write_bytes

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",  # Stable Diffusion's schedule
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


@dataclass
class UNetTrainConfig:
    data: str = "data/toy50k"
    vae: str = "runs/vae_f4/final"  # folder with vae/
    clip: str = "runs/clip/final"  # folder with text_encoder/ and tokenizer/
    out: str = "runs/unet"
    block_out_channels: tuple[int, ...] = (64, 128, 192)
    attention_head_dim: int = 32
    batch_size: int = 64
    lr: float = 3e-4
    max_steps: int = 6000
    warmup: int = 300
    caption_dropout: float = 0.15  # share of captions replaced by the empty prompt (trains CFG's branch)
    snr_gamma: float = 5.0  # min-SNR weighting; 0 disables
    ema_decay: float = 0.999
    bf16: bool = False  # bf16 autocast made this U-Net slower on CPU (2.2 vs 1.6 s/step), so fp32
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    stop_at: int | None = None  # stop early at this step with a checkpoint (split a long run; resume later)
    log_every: int = 25
    threads: int | None = None


@torch.no_grad()
def build_cache(cfg: UNetTrainConfig, vae, enc: OpenCLIPTextEncoder, shard_rows: int = 1000) -> dict:
    """Latents (N, 4, h, w), text states (N, T, d) and masks (N, T) as memory-mapped shard columns
    (`alignment.shards`, under ``cfg.out/cache``), and the empty prompt's states as tensors."""
    folder = Path(cfg.out) / "cache"
    if not is_finished(folder):
        images, prompts, _ = cached_split(cfg.data, "train")
        folder.mkdir(parents=True, exist_ok=True)
        empty = enc.encode([""])
        atomic_write_bytes(
            folder / "empty.safetensors",
            safetensors_bytes({"empty_tokens": empty.tokens.float().contiguous(), "empty_mask": empty.mask}),
        )
        writer = ShardWriter(folder)
        for start in tqdm(range(0, len(images), shard_rows), desc="encoding latents + text"):
            stop = min(len(images), start + shard_rows)
            c = enc.encode(prompts[start:stop])
            writer.add({"latents": encode_images(vae, images[start:stop]).float(), "tokens": c.tokens.half(),
                        "masks": c.mask})  # fmt: skip
        writer.finish()
    table = ShardedTable(folder)
    return {name: table[name] for name in ("latents", "tokens", "masks")} | load_file(
        str(folder / "empty.safetensors")
    )


def train_unet(cfg: UNetTrainConfig, progress: bool = True) -> Path:
    """Train through the one loop (resuming from ``cfg.out/checkpoint``); returns the exported base folder
    ``cfg.out/final`` (or the checkpoint when stopped early at ``cfg.stop_at``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    vae = AutoencoderKL.from_pretrained(str(Path(cfg.vae) / "vae"), use_safetensors=True).eval()
    enc = OpenCLIPTextEncoder.from_folder(Path(cfg.clip)).freeze()
    cache = build_cache(cfg, vae, enc)
    latents, tokens, masks = cache["latents"], cache["tokens"], cache["masks"]
    empty_tokens, empty_mask = cache["empty_tokens"], cache["empty_mask"]
    torch.manual_seed(cfg.seed)
    unet = toy_unet(enc.dim, latents.shape[-1], tuple(cfg.block_out_channels), cfg.attention_head_dim)
    noise_sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.max_steps, cfg.warmup)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    sampler = EpochSampler(len(latents), cfg.batch_size, cfg.seed)

    def losses(step: int, device: torch.device) -> dict[str, torch.Tensor]:
        idx = sampler.batch(step)
        z0 = latents[idx]
        b = z0.shape[0]
        drop = torch.rand(b, generator=gen) < cfg.caption_dropout  # CPU draws: the same run on any device
        ctx = torch.where(drop[:, None, None], empty_tokens.expand(b, -1, -1), tokens[idx].float())
        ctx_mask = torch.where(drop[:, None], empty_mask.expand(b, -1), masks[idx])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        ctx, ctx_mask, zt, t, noise = (v.to(device) for v in (ctx, ctx_mask, zt, t, noise))
        pred = unet(zt, t, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask.float()).sample.float()
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(noise_sched, t, cfg.snr_gamma)).mean()
        return {"loss": loss, "mse": per_sample.mean()}

    finished = fit(
        "unet", cfg, unet, opt, sched, losses, ema_decay=cfg.ema_decay, generators={"noise": gen}, progress=progress
    )
    if not finished:
        return out / "checkpoint"  # stopped early on purpose: resume to finish
    backbone = Backbone(unet.cpu(), vae, dict(SCHEDULER_CONFIG), enc)  # the EMA weights (fit copied them in)
    return save_backbone(backbone, out / "final")
