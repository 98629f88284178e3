"""Losses, each citing what it implements.

- `diffusion_loss`: Ho et al. (2020) eq. 14, E||eps - eps_theta(z_t, t, C)||^2 (or the v-target of
  Salimans & Ho (2022) when the scheduler predicts v), optionally min-SNR-gamma weighted (Hang et al. 2023).
- `clip_alignment_loss`: the seed document's latent-space supervision: a head on pooled plan states predicts
  the frozen CLIP image embedding; ``l2`` ||E_pred - E_img||^2, ``cosine`` 1 - cos, ``infonce`` (symmetric
  InfoNCE over the batch, Radford et al. 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn


def diffusion_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def min_snr_weight(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-gamma weight (Hang et al. 2023) on diffusers' `compute_snr`: ``min(SNR, gamma) / SNR``
    for epsilon targets, ``min(SNR, gamma) / (SNR + 1)`` for v targets; ones when ``gamma`` is 0."""
    if gamma <= 0:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    snr = compute_snr(scheduler, t).float()
    if scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None, scheduler=None, snr_gamma: float = 0.0
) -> torch.Tensor:
    """Mean squared error per sample, optionally min-SNR-gamma weighted, averaged over the batch."""
    per_sample = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(scheduler, t, snr_gamma)
    return per_sample.mean()


class ClipAlignmentHead(nn.Module):
    """Pooled plan states (masked mean) -> predicted CLIP image embedding."""

    def __init__(self, d_llm: int, clip_dim: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(d_llm)
        self.mlp = nn.Sequential(nn.Linear(d_llm, hidden), nn.GELU(), nn.Linear(hidden, clip_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(states)
        m = mask[..., None].to(h.dtype)
        return self.mlp((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def clip_alignment_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine", logit_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Distance between predicted and frozen CLIP image embeddings (see the module docstring)."""
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return ((pred - target) ** 2).sum(-1).mean()
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    if kind == "infonce":
        p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        scale = logit_scale.exp().clamp(max=100) if logit_scale is not None else 1 / 0.07
        logits = scale * p @ t.t()
        labels = torch.arange(len(p), device=p.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    raise ValueError(f"unknown CLIP alignment loss {kind!r}; use l2, cosine or infonce")
