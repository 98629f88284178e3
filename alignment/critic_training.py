"""Train a critic: an image-text-to-text model (a tiny LLaVA for the toy world) that reads an image as its plan.

The targets are the plans the data set's images were made from (for the toy world: the scenes that were rendered),
never a detector's output. Since the critic reads *generated* images, training images are augmented: a share go
through the base model's VAE (encode + decode, the blur and colour shifts of the generator's decoder), a share
through the base U-Net too (SDEdit: the render's latents noised part of the way and denoised under its own caption
with guidance, which gives the generator's textures and edge artefacts while the scene, and so the label, stays),
and any image may be blurred or get Gaussian noise. The loss is the language-model loss on the plan tokens only.
The model is saved as a standard Hugging Face folder (``LlavaForConditionalGeneration`` + ``LlavaProcessor``),
so `planner.critic.PlanReader.from_pretrained` reads it like any other image-text-to-text model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import AddedToken
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from alignment.loop import EpochSampler, fit, warmup_cosine
from alignment.prepared import cached_split
from diffusion_backbone.models import load_backbone
from diffusion_backbone.pipeline import seeded_generators
from diffusion_backbone.sampling import decode_latents, encode_images, sample
from planner.critic import INSTRUCTION
from planner.schema import IMG_BEGIN
from safeio import atomic_dir

IMAGE_TOKEN = "<image>"


@dataclass
class CriticTrainConfig:
    data: str = "data/toy50k"  # a prepared data set (images + plans); its train split is used
    planner: str = "toyworld/pretrained/planner"  # where the tokenizer (the plan vocabulary) comes from
    base: str | None = "toyworld/pretrained/base"  # its VAE makes the round-trip augmentation (None: off)
    out: str = "runs/critic"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 3
    text_width: int = 128
    text_layers: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    max_steps: int = 3000
    warmup: int = 100
    max_examples: int | None = 20000  # first N training rows
    vae_fraction: float = 0.5  # share of rows also cached as VAE round trips (each draw picks one at random)
    unet_fraction: float = 0.0  # share of rows also cached as U-Net round trips (SDEdit under their caption)
    unet_strength: tuple[float, float] = (0.3, 0.6)  # SDEdit strength range (one per batch of 64), above it the
    # scene itself starts to change, and the label would be wrong
    unet_steps: int = 10  # DDIM steps of a full schedule (SDEdit runs strength x steps of them)
    unet_guidance: float = 7.5  # as generation uses: guidance changes the look the critic must read
    blur_prob: float = 0.3
    noise_std: float = 0.03  # max std of added Gaussian noise (on [-1, 1] pixels)
    bf16: bool = False
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    stop_at: int | None = None
    log_every: int = 25
    threads: int | None = None


def critic_prompt() -> str:
    """The toy critic's prompt (no chat template): the image, the instruction, then the plan."""
    return f"{IMAGE_TOKEN} {INSTRUCTION}"


def build_toy_critic(cfg: CriticTrainConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A tiny random LLaVA (CLIP vision tower + Llama) over the planner's tokenizer plus an image token."""
    tok = AutoTokenizer.from_pretrained(cfg.planner, local_files_only=True)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    vision = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_width,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=4,
        intermediate_size=2 * cfg.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=2 * cfg.text_width,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # patch features, the CLS token dropped
        vision_feature_layer=-1,
        image_seq_length=n_patches,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(
        do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, size={"height": cfg.image_size, "width": cfg.image_size},
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token the strategy drops
    )
    return model, processor


def pixels(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]: the toy critic processor's normalisation."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def vae_round_trips(base: str, images: np.ndarray, batch: int = 256, progress: bool = True) -> np.ndarray:
    """Each image encoded and decoded by the base model's VAE (what the generator's decoder does to images)."""
    vae = load_backbone(base, text_encoder=False).vae
    out = [
        decode_latents(vae, encode_images(vae, images[s : s + batch]))
        for s in tqdm(range(0, len(images), batch), desc="VAE round trips", disable=not progress)
    ]
    return np.concatenate(out)


@torch.no_grad()
def unet_round_trips(base: str, images: np.ndarray, captions: list[str], strength: tuple[float, float] = (0.3, 0.6),
                     steps: int = 10, guidance: float = 7.5, seed: int = 0, batch: int = 64,
                     progress: bool = True) -> np.ndarray:  # fmt: skip
    """Each image through the base model as SDEdit: VAE-encoded, noised to a strength drawn from ``strength`` (one
    per batch), denoised with DDIM under its caption's native text conditioning and classifier-free guidance,
    decoded. Image i depends only on ``seed`` and i."""
    backbone = load_backbone(base)
    scheduler = backbone.scheduler("ddim")
    uncond = backbone.text_encoder.encode_negative([""])
    rng = np.random.default_rng(seed)
    out = []
    for s in tqdm(range(0, len(images), batch), desc="U-Net round trips", disable=not progress):
        z = encode_images(backbone.vae, images[s : s + batch])
        cond = backbone.text_encoder.encode(list(captions[s : s + batch]))
        z = sample(backbone.unet, scheduler, cond, uncond, num_inference_steps=steps, guidance_scale=guidance,
                   generator=seeded_generators([seed * 1_000_003 + i for i in range(s, s + len(z))]), progress=False,
                   init_latents=z, strength=float(rng.uniform(*strength)))  # fmt: skip
        out.append(decode_latents(backbone.vae, z))
    return np.concatenate(out)


def augment(x: torch.Tensor, gen: torch.Generator, blur_prob: float, noise_std: float) -> torch.Tensor:
    """Random Gaussian blur (3x3, sigma ~ U(0.5, 1.2)) and additive noise (std ~ U(0, noise_std)) per image."""
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < blur_prob
    if blur.any():
        sigma = 0.5 + 0.7 * torch.rand(int(blur.sum()), generator=gen)
        k = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0])[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)
        kernel = (k[:, :, None] * k[:, None, :])[:, None].repeat_interleave(3, 0)  # (n*3, 1, 3, 3)
        sel = x[blur].reshape(1, -1, *x.shape[2:])
        x = x.clone()
        x[blur] = F.conv2d(F.pad(sel, (1, 1, 1, 1), mode="replicate"), kernel, groups=sel.shape[1]).reshape(
            -1, *x.shape[1:]
        )
    std = noise_std * torch.rand(b, 1, 1, 1, generator=gen)
    return (x + std * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


class CriticBatches:
    """Token ids, labels (plan tokens only) and augmented pixels for a batch of rows."""

    def __init__(self, processor: LlavaProcessor, plans: list[str], cfg: CriticTrainConfig):
        tok = processor.tokenizer
        probe = processor(images=[np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)],
                          text=[critic_prompt() + " " + IMG_BEGIN], return_tensors="pt")  # fmt: skip
        self.prefix = probe["input_ids"][0].tolist()  # image tokens expanded, ending with <IMG_BEGIN>
        self.targets = []
        for plan in plans:
            body = plan.split(IMG_BEGIN, 1)[1]
            self.targets.append(tok(body, add_special_tokens=False).input_ids + [tok.eos_token_id])
        self.pad_id = tok.pad_token_id

    def tokens(self, rows: list[int]) -> dict[str, torch.Tensor]:
        seqs = [self.prefix + self.targets[i] for i in rows]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for b, (s, i) in enumerate(zip(seqs, rows)):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
            labels[b, len(self.prefix) : len(s)] = torch.tensor(self.targets[i])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_critic(cfg: CriticTrainConfig, progress: bool = True) -> Path:
    """Train the toy critic through the one loop (resumable); returns the exported folder ``cfg.out/final``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    images, prompts, plans = cached_split(cfg.data, "train")
    n = len(plans) if cfg.max_examples is None else min(cfg.max_examples, len(plans))
    images, plans = images[:n], plans[:n]
    n_vae = int(round(cfg.vae_fraction * n)) if cfg.base else 0
    round_trips = _cached(out / "cache" / f"vae_round_trips_{n_vae}.npy", images[:n_vae],
                          lambda: vae_round_trips(cfg.base, images[:n_vae], progress=progress))  # fmt: skip
    n_unet = int(round(cfg.unet_fraction * n)) if cfg.base else 0
    lo, hi = cfg.unet_strength
    unet_trips = _cached(
        out / "cache" / f"unet_round_trips_{n_unet}_{lo}_{hi}_{cfg.unet_steps}_{cfg.unet_guidance}.npy",
        images[n - n_unet : n],
        lambda: unet_round_trips(cfg.base, images[n - n_unet : n], prompts[n - n_unet : n], cfg.unet_strength,
                                 cfg.unet_steps, cfg.unet_guidance, cfg.seed, progress=progress),
    )  # fmt: skip
    model, processor = build_toy_critic(cfg)
    batches = CriticBatches(processor, plans, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.max_steps, cfg.warmup)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    sampler = EpochSampler(n, cfg.batch_size, cfg.seed)

    def losses(step: int, device: torch.device) -> dict[str, torch.Tensor]:
        rows = sampler.batch(step).tolist()
        use_vae = torch.rand(len(rows), generator=gen) < 0.5
        picked = np.stack([_pick(i, u, images, round_trips, unet_trips, n) for i, u in zip(rows, use_vae.tolist())])
        x = augment(pixels(picked), gen, cfg.blur_prob, cfg.noise_std)
        batch = {k: v.to(device) for k, v in batches.tokens(rows).items()}
        return {"loss": model(pixel_values=x.to(device), **batch).loss}

    if not fit("critic", cfg, model, opt, sched, losses, generators={"augment": gen}, progress=progress):
        return out / "checkpoint"
    return save_critic(model.cpu(), processor, out / "final")


def _pick(i: int, use: bool, images, vae_trips, unet_trips, n: int) -> np.ndarray:
    """Row ``i``'s training image: with ``use``, its U-Net round trip (the last rows) or else its VAE round trip
    (the first rows) where it has one; the render otherwise."""
    j = i - (n - len(unet_trips))
    if use and j >= 0:
        return unet_trips[j]
    if use and i < len(vae_trips):
        return vae_trips[i]
    return images[i]


def _cached(path: Path, images: np.ndarray, compute) -> np.ndarray:
    """``compute()`` of a non-empty image set, saved once at ``path`` (atomically) and read back memory-mapped."""
    if len(images) == 0:
        return images
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, compute())
        tmp.replace(path)
    return np.load(path, mmap_mode="r")


def save_critic(model, processor, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """The critic as a Hugging Face folder (safetensors + processor), atomically; ``dtype`` casts a copy."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {})  # the LM head is the input embedding
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        processor.save_pretrained(str(tmp))
    return Path(folder)
