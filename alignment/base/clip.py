"""Train the toy CLIP (open_clip ``CustomTextCLIP``, config ``plan2img-toy-clip``) contrastively on captions.

The tokenizer is word-level (``tokenizers``), built from the data set's prompts, so the text tower stays
small (a few hundred embedding rows instead of CLIP's 49k BPE merges). Captions of the same plan are
paraphrases of the same picture, so the InfoNCE targets treat every pair with equal plans as positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alignment.loop import EpochSampler, fit, warmup_cosine
from alignment.prepared import cached_split, load_prepared
from diffusion_backbone.sampling import images_to_tensor
from diffusion_backbone.text_encoders import OpenCLIPTextEncoder
from diffusion_backbone.toy import toy_clip_config
from safeio import atomic_dir

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]  # ids 0, 1, 2 (pad_id / eos_id of the open_clip config)


def build_word_tokenizer(texts: list[str], max_length: int):
    """A lower-casing word-level `PreTrainedTokenizerFast` over ``texts``; appends ``[EOS]`` to every text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words: set[str] = set()
    pre = pre_tokenizers.Whitespace()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", model_max_length=max_length
    )


@dataclass
class CLIPTrainConfig:
    data: str = "data/toy50k"
    out: str = "runs/clip"
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    max_steps: int = 2500
    warmup: int = 150
    bf16: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    stop_at: int | None = None  # stop early at this step with a checkpoint (split a long run; resume later)
    log_every: int = 25
    threads: int | None = None


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: ``same[i, j]`` marks pairs showing the same plan."""
    logits = logit_scale * image_emb @ text_emb.t()
    targets = same.float() / same.float().sum(1, keepdim=True)
    loss_i = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(targets.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def make_encoder(data: str, seed: int) -> OpenCLIPTextEncoder:
    cfg = toy_clip_config()
    cfg.pop("custom_text", None)
    ds = load_prepared(data)
    tokenizer = build_word_tokenizer(list(ds["prompt"]), cfg["text_cfg"]["context_length"])
    if len(tokenizer) > cfg["text_cfg"]["vocab_size"]:
        raise ValueError(
            f"{len(tokenizer)} words do not fit the toy CLIP's vocab_size {cfg['text_cfg']['vocab_size']}"
        )
    if tokenizer.eos_token_id != cfg["text_cfg"]["eos_id"] or tokenizer.pad_token_id != cfg["text_cfg"]["pad_id"]:
        raise ValueError("tokenizer special ids do not match the open_clip config")
    torch.manual_seed(seed)
    return OpenCLIPTextEncoder.create(cfg, tokenizer)


def train_clip(cfg: CLIPTrainConfig, progress: bool = True) -> Path:
    """Train through the one loop (resuming from ``cfg.out/checkpoint``); returns the folder holding
    text_encoder/ and tokenizer/ (or the checkpoint when stopped early at ``cfg.stop_at``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    images, prompts, plans = cached_split(cfg.data, "train")
    enc = make_encoder(cfg.data, cfg.seed)
    model = enc.model
    ids_all = enc.tokenize(prompts)
    plan_ids = torch.as_tensor(np.unique(np.asarray(plans), return_inverse=True)[1])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    sched = warmup_cosine(opt, cfg.max_steps, cfg.warmup)
    sampler = EpochSampler(len(images), cfg.batch_size, cfg.seed)

    def losses(step: int, device: torch.device) -> dict[str, torch.Tensor]:
        idx = np.sort(sampler.batch(step).numpy())
        same = (plan_ids[idx][:, None] == plan_ids[idx][None, :]).to(device)
        img = F.normalize(model.encode_image(images_to_tensor(images[idx]).to(device)).float(), dim=-1)
        txt = F.normalize(enc.forward_text(ids_all[idx].to(device))[0].float(), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        with torch.no_grad():
            top1 = ((img @ txt.t()).argmax(1) == torch.arange(len(idx), device=device)).float().mean()
        with torch.autocast(device.type, enabled=False):  # the loss in fp32 (bf16 autocast covers the towers)
            loss = clip_loss(img, txt, scale, same)
        return {"loss": loss, "batch_top1": top1, "logit_scale": scale.detach()}

    if not fit("clip", cfg, model, opt, sched, losses, progress=progress):
        return out / "checkpoint"  # stopped early on purpose: resume to finish
    enc.to("cpu").freeze()
    with atomic_dir(out / "final") as tmp:
        enc.save(tmp)
    return out / "final"


@torch.no_grad()
def retrieval_accuracy(
    enc: OpenCLIPTextEncoder,
    images: np.ndarray,
    prompts: list[str],
    plans: list[str],
    n_candidates: int = 100,
    seed: int = 0,
) -> dict:
    """Image -> caption top-1 among ``n_candidates`` captions of distinct plans (chance = 1 / n)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    chosen, seen = [], set()
    for i in order:
        if plans[i] not in seen:
            seen.add(plans[i])
            chosen.append(int(i))
        if len(chosen) == n_candidates:
            break
    if len(chosen) < n_candidates:
        raise ValueError(f"only {len(chosen)} distinct plans available for {n_candidates} candidates")
    x = images_to_tensor(images[np.asarray(chosen)])
    img = F.normalize(enc.model.encode_image(x.to(enc.device, enc.dtype)).float(), dim=-1)
    txt = F.normalize(enc.forward_text(enc.tokenize([prompts[i] for i in chosen]))[0].float(), dim=-1)
    sims = img @ txt.t()
    top1 = (sims.argmax(1) == torch.arange(len(chosen))).float().mean().item()
    top5 = (sims.topk(5, dim=1).indices == torch.arange(len(chosen))[:, None]).any(1).float().mean().item()
    return {"top1": top1, "top5": top5, "n_candidates": n_candidates, "chance": 1 / n_candidates}
