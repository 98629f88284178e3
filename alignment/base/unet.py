"""Train the toy base U-Net: text-conditioned latent diffusion on the toy CLIP's token states.

Latents are encoded once by the trained VAE and text states computed once by the frozen CLIP (the cache
is saved as safetensors beside the run), so a step costs one U-Net forward and backward. Caption dropout
(the empty prompt's states) trains the unconditional branch that CFG needs; the loss is epsilon MSE with
min-SNR-gamma weighting (Hang et al. 2023), which speeds up convergence.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from alignment.loop import (
    EMA,
    EpochSampler,
    JsonlLogger,
    TrainState,
    check_finite,
    load_checkpoint,
    save_checkpoint,
    warmup_cosine,
)
from alignment.losses import min_snr_weight
from alignment.prepared import cached_split
from alignment.shards import ShardedTable, ShardWriter, is_finished
from diffusion_backbone.models import Backbone, save_backbone
from diffusion_backbone.sampling import encode_images
from diffusion_backbone.text_encoders import OpenCLIPTextEncoder
from diffusion_backbone.toy import toy_unet
from safeio import atomic_write_bytes, atomic_write_json

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
    """Train (resuming from ``cfg.out/checkpoint``); returns the exported base folder ``cfg.out/final``."""
    from diffusers import AutoencoderKL

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
    params = {n: p for n, p in unet.named_parameters()}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.max_steps, cfg.warmup)
    ema = EMA(params, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    sampler = EpochSampler(len(latents), cfg.batch_size, cfg.seed)
    logger = JsonlLogger(out / "log.jsonl")
    state = TrainState()
    if (out / "checkpoint").is_dir():
        state = load_checkpoint(out / "checkpoint", {"unet": unet}, opt, sched, ema, generators={"noise": gen})
        logger.truncate_after(state.step)
    atomic_write_json(out / "config.json", asdict(cfg))
    unet.train()
    t_last = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="unet", disable=not progress)
    for step in range(state.step, min(cfg.max_steps, cfg.stop_at or cfg.max_steps)):
        idx = sampler.batch(step)
        z0 = latents[idx]
        b = z0.shape[0]
        drop = torch.rand(b, generator=gen) < cfg.caption_dropout
        ctx = torch.where(drop[:, None, None], empty_tokens.expand(b, -1, -1), tokens[idx].float())
        ctx_mask = torch.where(drop[:, None], empty_mask.expand(b, -1), masks[idx])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = unet(zt, t, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask.float()).sample.float()
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(noise_sched, t, cfg.snr_gamma)).mean()
        check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update()
        bar.update(1)
        if (step + 1) % cfg.log_every == 0:
            now = time.perf_counter()
            logger.log(
                step=step + 1,
                loss=loss.item(),
                mse=per_sample.mean().item(),
                grad_norm=float(gnorm),
                lr=sched.get_last_lr()[0],
                sec_per_step=(now - t_last) / cfg.log_every,
            )
            t_last = now
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.max_steps, cfg.stop_at):
            save_checkpoint(
                out / "checkpoint", TrainState(step + 1), {"unet": unet}, opt, sched, ema, generators={"noise": gen}
            )
    bar.close()
    if cfg.stop_at is not None and cfg.stop_at < cfg.max_steps:
        return out / "checkpoint"  # stopped early on purpose: resume to finish
    ema.copy_to()  # export the EMA weights
    unet.eval()
    backbone = Backbone(unet, vae, dict(SCHEDULER_CONFIG), enc)
    return save_backbone(backbone, out / "final")
