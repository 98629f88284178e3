"""Losses, each citing what it implements.

- `diffusion_loss`: Ho et al. (2020) eq. 14, E||eps - eps_theta(z_t, t, C)||^2 (or the v-target of
  Salimans & Ho (2022) when the scheduler predicts v), optionally min-SNR-gamma weighted (Hang et al. 2023).
- `clip_alignment_loss`: the seed document's latent-space supervision: a head on pooled plan states predicts
  the frozen CLIP image embedding; ``l2`` ||E_pred - E_img||^2, ``cosine`` 1 - cos, ``infonce`` (symmetric
  InfoNCE over the batch, Radford et al. 2021).
- `diffusion_dpo_loss`: Diffusion-DPO (Wallace et al. 2023, eq. 14), written from the paper; see its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class DPOLoss:
    """What `diffusion_dpo_loss` returns: the scalar ``loss`` to back-propagate and, per pair (detached), the
    ``implicit_acc`` (1 where the policy prefers the winner more than the reference does, 0.5 on a tie) and the
    implicit ``reward_margin`` (the logit inside the sigmoid)."""

    loss: torch.Tensor
    implicit_acc: torch.Tensor
    reward_margin: torch.Tensor


def diffusion_dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    sft_weight: float = 0.0,
) -> DPOLoss:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14), with the constant T * omega(lambda_t) folded into ``beta``:

        L = -log sigmoid(-beta * [(e_w(theta) - e_w(ref)) - (e_l(theta) - e_l(ref))])

    where ``e_w(theta) = ||eps_w - eps_theta(x_t^w, t)||^2`` (here the per-pair mean over latent elements, so
    beta ~ 2000-5000 at SD scale) and the winner and loser share one noise draw and one t. Arguments are per-pair
    errors, shape (B,). ``sft_weight`` adds ``sft_weight * mean(e_w(theta))``, a diffusion loss on the winners.
    Everything is computed in float32, also under bf16/fp16 autocast (half-precision errors of a few 1e-3 times
    beta in the thousands lose the difference that carries the signal; TRL computes its loss in fp32 too).
    diffusers' example script uses ``-beta / 2`` for the same logit: its beta is twice ours."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {tuple(x.shape) for x in (policy_err_w, policy_err_l, ref_err_w, ref_err_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"DPO errors must be four (B,) tensors of one shape, got shapes {sorted(shapes)}")
    with torch.autocast(device_type=policy_err_w.device.type, enabled=False):
        pw, pl = policy_err_w.float(), policy_err_l.float()
        rw, rl = ref_err_w.float().detach(), ref_err_l.float().detach()
        margin = -beta * ((pw - rw) - (pl - rl))  # (B,): > 0 where the policy favours the winner more than ref
        loss = -F.logsigmoid(margin).mean()
        if sft_weight:
            loss = loss + sft_weight * pw.mean()
        acc = (margin > 0).float() + 0.5 * (margin == 0).float()
    return DPOLoss(loss, acc.detach(), margin.detach())
