"""Diffusion-DPO on image pairs (Wallace et al. 2023): the pieces a DPO step is made of.

- `add_unet_lora`: LoRA on the U-Net's attention projections through peft (B = 0 at the start, so the policy
  starts equal to the reference and the loss at log 2);
- `adapters_disabled`: the reference is the same U-Net with its LoRA switched off, so no second U-Net is held in
  memory (diffusers' DPO example and TRL's peft path do the same);
- `pair_errors`: the per-pair squared errors of winner and loser latents under one noise draw and one timestep,
  in one U-Net call of batch 2B;
- `dpo_step_losses`: policy errors (with gradients) and reference errors (without) into `diffusion_dpo_loss`;
- `train_dpo`: stage D on the one training loop (`alignment.loop.fit`) for a U-Net LoRA, the connector (against
  a frozen copy of it), or both: pairs in Pick-a-Pic's columns, a held-out split for implicit accuracy and drift,
  the LoRA exported as a low-rank U-Net delta (``unet_dpo.safetensors``, merged by `load_unet_dpo`) and the
  connector as a bridge folder (``bridge/``).

The loss itself is `alignment.losses.diffusion_dpo_loss`. The conditioning of a caption comes from the caller's
``source``: fixed (`FixedConditioning`: the native text encoder for plain SD DPO, or the frozen chain, plan -> LLM
-> connector, so the U-Net is tuned under the conditioning it sees at inference) or trainable
(`ConnectorConditioning`: the connector over cached LLM states, with a frozen copy as the reference).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alignment.loop import EpochSampler, fit, make_optimizer, warmup_cosine
from alignment.lora import lora_factors
from alignment.losses import DPOLoss, diffusion_dpo_loss, diffusion_target
from alignment.preference import GROUP_COLUMN, load_preference_pairs
from alignment.stages import build_config, check_positive, read_yaml_mapping
from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.sampling import encode_images, unet_forward
from llm_bridge.bridge import LOW_RANK_DOWN, LOW_RANK_UP, apply_delta
from llm_bridge.encoder import PlanStates
from safeio import InputError, atomic_dir

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention, as diffusers' DPO example
DPO_ADAPTER = "dpo"


def add_unet_lora(unet: torch.nn.Module, rank: int = 8, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter named ``dpo`` into the U-Net's attention projections (peft; B initialised to 0) and
    freeze everything else. Returns the trainable LoRA parameters."""
    if rank < 1:
        raise InputError(f"LoRA rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(UNET_LORA_TARGETS))
    inject_adapter_in_model(config, unet, adapter_name=DPO_ADAPTER)
    params = [p for n, p in unet.named_parameters() if f".{DPO_ADAPTER}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"no attention projections {UNET_LORA_TARGETS} found for LoRA in {type(unet).__name__}")
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Every peft adapter layer of ``model`` off inside the block (the DPO reference), back on after, with each
    parameter's ``requires_grad`` as it was (peft's switch would otherwise change it)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = {p: p.requires_grad for m in layers for p in m.parameters()}
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def pair_errors(unet, scheduler, cond: Conditioning, latents_w: torch.Tensor, latents_l: torch.Tensor,
                noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-pair mean squared error of the U-Net's prediction for the winner and the loser latents (B, C, h, w),
    both noised with the same ``noise`` at the same ``t`` (B,), under the pair's conditioning (batch B).
    Returns two (B,) tensors."""
    if latents_w.shape != latents_l.shape or noise.shape != latents_w.shape:
        raise ValueError(f"winner {tuple(latents_w.shape)}, loser {tuple(latents_l.shape)} and noise "
                         f"{tuple(noise.shape)} latents must have one shape")  # fmt: skip
    z0 = torch.cat([latents_w, latents_l])  # (2B, C, h, w)
    eps = torch.cat([noise, noise])
    tt = torch.cat([t, t])
    noisy = scheduler.add_noise(z0, eps, tt)
    pred = unet_forward(unet, noisy, tt, Conditioning.cat([cond, cond]))
    err = ((pred.float() - diffusion_target(scheduler, z0, eps, tt).float()) ** 2).mean(dim=(1, 2, 3))  # (2B,)
    return err.chunk(2)


def policy_and_reference_errors(
    unet, scheduler, cond: Conditioning, ref_cond: Conditioning, latents_w, latents_l, noise, t, reference=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy winner, policy loser, reference winner, reference loser) errors under one noise draw and t: the
    reference with the adapters disabled, under ``ref_cond`` and inside ``reference`` (a context that puts the
    reference's own parts into the U-Net, e.g. a frozen connector's time modulation), without gradient."""
    with torch.no_grad(), adapters_disabled(unet), reference or contextlib.nullcontext():
        ref_w, ref_l = pair_errors(unet, scheduler, ref_cond, latents_w, latents_l, noise, t)
    pol_w, pol_l = pair_errors(unet, scheduler, cond, latents_w, latents_l, noise, t)
    return pol_w, pol_l, ref_w, ref_l


def dpo_step_losses(
    unet,
    scheduler,
    cond: Conditioning,
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    beta: float,
    generator: torch.Generator,
    sft_weight: float = 0.0,
    ref_cond: Conditioning | None = None,
    reference=None,
    timesteps: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """One DPO micro-batch: a shared noise draw and timestep per pair (from ``generator``; uniform over the
    scheduler's training timesteps, or over ``timesteps = (low, high)``, high exclusive), the reference errors
    with the adapters disabled and under ``ref_cond`` (default ``cond``; a frozen connector's output in connector
    DPO), without gradient, the policy errors with them. Returns the loss (key ``loss``), the mean implicit
    accuracy and reward margin, and the policy's mean diffusion loss on winners and losers."""
    b = latents_w.shape[0]
    device = latents_w.device
    noise = torch.randn(latents_w.shape, generator=generator, device=generator.device).to(device, latents_w.dtype)
    low, high = timesteps or (0, scheduler.config.num_train_timesteps)
    t = torch.randint(low, high, (b,), generator=generator, device=generator.device).to(device)
    pol_w, pol_l, ref_w, ref_l = policy_and_reference_errors(
        unet, scheduler, cond, cond if ref_cond is None else ref_cond, latents_w, latents_l, noise, t, reference
    )
    out: DPOLoss = diffusion_dpo_loss(pol_w, pol_l, ref_w, ref_l, beta, sft_weight)
    return {
        "loss": out.loss,
        "implicit_acc": out.implicit_acc.mean(),
        "reward_margin": out.reward_margin.mean(),
        "diffusion_loss_w": pol_w.detach().mean(),
        "diffusion_loss_l": pol_l.detach().mean(),
    }


# ---------------------------------------------------------------------------------------------- stage D
DPO_WEIGHTS = "unet_dpo.safetensors"


@dataclass
class DPOTrainConfig:
    # image pairs in Pick-a-Pic's columns (folder or Parquet); several sources comma-separated ("a,b"), concatenated
    pairs: str = "runs/pairs_train/pairs/best-of/images"
    out: str = "runs/dpo"
    target: str = "unet_lora"  # unet_lora | connector (against a frozen copy) | both
    # the models `plan2img dpo` builds the conditioning from (the trainer itself takes models)
    base: str = "toyworld/pretrained/base"
    bridge: str | None = "toyworld/pretrained/bridge"  # None: the base's native text encoder (plain SD DPO)
    planner: str = "toyworld/pretrained/planner"  # the LLM that reads the plans (the bridge's)
    writer: str | None = "toyworld/pretrained/planner_wide"  # writes the plans: a planner or a LoRA over planner
    beta: float = 2500.0  # Wallace et al.: 2000-5000 at SD scale; our errors are per-element means, as theirs
    sft_weight: float = 0.0  # + this x the diffusion loss on the winners
    lora_rank: int = 8  # diffusers' DPO example: 4-8
    lr: float = 1e-4
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes; CUDA)
    batch_size: int = 8  # pairs per step (the paper: 2,048 at SD scale)
    max_steps: int = 300
    warmup: int = 20
    heldout_fraction: float = 0.1  # pairs kept out for implicit accuracy and the drift of the diffusion loss
    min_score_gap: float = 0.0  # > 0: only pairs whose labeller scores (score_0/score_1) differ by this much
    # training timesteps drawn from [min_timestep, max_timestep) (None: the scheduler's last); the held-out metrics
    # keep the full range. High-noise steps decide a sample's layout and global look (e.g. a gradient's direction)
    min_timestep: int = 0
    max_timestep: int | None = None
    bf16: bool = False
    grad_clip: float | None = 1.0
    seed: int = 0
    log_every: int = 25  # held-out metrics are computed at every log step
    checkpoint_every: int = 100
    stop_at: int | None = None

    def __post_init__(self) -> None:
        if self.target not in ("unet_lora", "connector", "both"):
            raise InputError(f"target must be unet_lora, connector or both, got {self.target!r}")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise InputError(f"optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise InputError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not self.min_score_gap >= 0.0:
            raise InputError(f"min_score_gap must be >= 0 (in the labeller's score units), got {self.min_score_gap}")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep <= self.min_timestep):
            raise InputError(f"timesteps must satisfy 0 <= min_timestep < max_timestep, got {self.min_timestep} and "
                             f"{self.max_timestep}")  # fmt: skip
        check_positive("DPO config", beta=self.beta, lr=self.lr, batch_size=self.batch_size,
                       max_steps=self.max_steps, lora_rank=self.lora_rank, log_every=self.log_every)  # fmt: skip


def load_dpo_config(path: str | Path, overrides: dict | None = None) -> DPOTrainConfig:
    """A `DPOTrainConfig` from YAML (top-level ``overrides`` applied); errors name the file and the key."""
    return build_config(DPOTrainConfig, read_yaml_mapping(path, overrides), str(path))


class FixedConditioning:
    """U-Net DPO: each caption's conditioning computed once, the same for the policy and the reference."""

    def __init__(self, cond: Conditioning):
        self.cond = cond

    def as_reference(self, unet) -> contextlib.AbstractContextManager:
        """Nothing to swap: the reference differs from the policy only by the U-Net's adapters."""
        return contextlib.nullcontext()

    @classmethod
    @torch.no_grad()
    def of(cls, condition: Callable[[list[str]], Conditioning], captions: list[str], batch: int = 64):
        return cls(Conditioning.cat([condition(captions[s : s + batch]) for s in range(0, len(captions), batch)]))

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def rows(self, idx, device) -> tuple[Conditioning, Conditioning]:
        cond = self.cond.index(idx).to(device)
        return cond, cond


class ConnectorConditioning:
    """Connector DPO: the bridge's connector, trainable, over each caption's LLM states (and native tokens and
    region masks), computed once; the reference is a frozen copy of the bridge (a few MB, unlike a U-Net)."""

    def __init__(self, bridge, states: PlanStates, native: Conditioning | None, masks: torch.Tensor | None):
        self.bridge, self.states, self.native, self.masks = bridge, states, native, masks
        self.reference = copy.deepcopy(bridge).requires_grad_(False).eval()

    @contextlib.contextmanager
    def as_reference(self, unet) -> Iterator[None]:
        """The frozen copy's time modulation in the U-Net inside the block (the connector's pooled vector acts
        through the U-Net's class embedding, which the policy's training changes), the policy's after."""
        frozen = self.reference.connector.time_modulation
        if frozen is None:
            yield
            return
        live = unet.class_embedding
        unet.class_embedding = frozen.to(next(unet.parameters()).device)
        try:
            yield
        finally:
            unet.class_embedding = live

    @classmethod
    @torch.no_grad()
    def of(cls, pipe, captions: list[str], plans: list[str], batch: int = 64):
        """What ``pipe`` (a `Plan2ImgPipeline`) would read for each caption with its plan."""
        read, plan_texts = pipe.read_texts(captions, plans)
        parts = [pipe.plan_states(read[s : s + batch], plan_texts[s : s + batch]) for s in range(0, len(read), batch)]
        native = None if parts[0][1] is None else Conditioning.cat([n for _, n in parts])
        return cls(pipe.bridge, PlanStates.cat([st for st, _ in parts]), native, pipe.region_masks(plan_texts))

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.bridge.connector.parameters())

    def rows(self, idx, device) -> tuple[Conditioning, Conditioning]:
        states = self.states.index(idx).to(device)
        native = None if self.native is None else self.native.index(idx).to(device)
        masks = None if self.masks is None else self.masks[idx].to(device)
        with torch.no_grad():
            ref = self.reference.to(device).conditioning(states, native, region_masks=masks)
        return self.bridge.conditioning(states, native, region_masks=masks), ref


@dataclass
class PairTensors:
    """Pairs ready for DPO: winner and loser latents (N, C, h, w) and where their conditioning comes from."""

    latents_w: torch.Tensor
    latents_l: torch.Tensor
    source: FixedConditioning | ConnectorConditioning

    def rows(self, idx, device) -> tuple[Conditioning, Conditioning, torch.Tensor, torch.Tensor]:
        cond, ref = self.source.rows(idx, device)
        return cond, ref, self.latents_w[idx].to(device), self.latents_l[idx].to(device)


@torch.no_grad()
def pair_latents(pairs, vae, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair data set's images (``image_w``, ``image_l``) as VAE latents, in batches."""
    zw, zl = [], []
    for s in range(0, len(pairs), batch):
        rows = pairs[s : s + batch]
        zw.append(encode_images(vae, np.stack([np.asarray(x) for x in rows["image_w"]])))
        zl.append(encode_images(vae, np.stack([np.asarray(x) for x in rows["image_l"]])))
    return torch.cat(zw), torch.cat(zl)


def image_resolution(unet, vae) -> int:
    """The image side a (square) U-Net + VAE pair works at: latent side x the VAE's downsampling."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def split_pairs(captions: list[str], heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training and held-out pairs, split by caption (or by any group key, such as the ``group``
    column `load_preference_pairs` returns): every pair of a caption lands on the same side, so pairs mined from one
    candidate set (``PairWriter(all_pairs=True)``), or reworded from one caption, never straddle the split. With one
    pair per caption this is a plain random split of the rows."""
    groups = list(dict.fromkeys(captions))
    perm = np.random.default_rng(seed).permutation(len(groups))
    k = int(round(heldout_fraction * len(groups)))
    if heldout_fraction > 0 and len(groups) > 1:
        k = max(k, 1)  # a held-out caption whenever one is asked for and one can be spared
    held = {groups[i] for i in perm[:k]}
    is_held = np.array([c in held for c in captions], dtype=bool)
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


@torch.no_grad()
def heldout_metrics(unet, scheduler, data: PairTensors, rows, beta: float, seed: int, batch: int = 32) -> dict:
    """Implicit accuracy and reward margin on held-out pairs, and the policy's and the reference's diffusion loss
    on the held-out winners, with the same noise and timesteps at every call (so the curve is comparable)."""
    g = torch.Generator().manual_seed(seed)
    out = {"heldout_implicit_acc": [], "heldout_reward_margin": [], "heldout_diffusion_loss": [],
           "heldout_ref_diffusion_loss": []}  # fmt: skip
    device = next(unet.parameters()).device
    for s in range(0, len(rows), batch):
        idx = torch.as_tensor(rows[s : s + batch])
        cond, ref, zw, zl = data.rows(idx, device)
        noise = torch.randn(zw.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(device)
        pw, pl, rw, rl = policy_and_reference_errors(unet, scheduler, cond, ref, zw, zl, noise, t,
                                                     data.source.as_reference(unet))  # fmt: skip
        res = diffusion_dpo_loss(pw, pl, rw, rl, beta)
        for key, v in (("heldout_implicit_acc", res.implicit_acc), ("heldout_reward_margin", res.reward_margin),
                       ("heldout_diffusion_loss", pw), ("heldout_ref_diffusion_loss", rw)):  # fmt: skip
            out[key].append(v)
    return {k: torch.cat(v).mean() for k, v in out.items()}


def dpo_timesteps(cfg: DPOTrainConfig, scheduler) -> tuple[int, int] | None:
    """The training timestep range of ``cfg`` checked against the scheduler's (None: all of them)."""
    n = int(scheduler.config.num_train_timesteps)
    high = n if cfg.max_timestep is None else cfg.max_timestep
    if high > n:
        raise InputError(f"max_timestep {high} is past the scheduler's {n} training timesteps")
    return None if (cfg.min_timestep, high) == (0, n) else (cfg.min_timestep, high)


def train_dpo(cfg: DPOTrainConfig, unet, vae, scheduler, source: Callable[[list[str]], object],
              progress: bool = True) -> Path:  # fmt: skip
    """Stage D: Diffusion-DPO on ``cfg.pairs`` through the one loop (resumable from ``cfg.out/checkpoint``) of
    ``cfg.target``: a U-Net LoRA (``unet_lora``), the connector (``connector``) or both. ``source(captions)``
    builds the captions' conditioning once: `FixedConditioning` (U-Net LoRA only) or `ConnectorConditioning`.
    Returns the exported folder ``cfg.out/final`` (``unet_dpo.safetensors`` and/or ``bridge/``), or the
    checkpoint when stopped early."""
    sources = [p.strip() for p in cfg.pairs.split(",") if p.strip()]
    pairs = load_preference_pairs(sources if len(sources) > 1 else cfg.pairs, seed=cfg.seed,
                                  resolution=image_resolution(unet, vae), min_score_gap=cfg.min_score_gap)  # fmt: skip
    train_idx, held_idx = split_pairs(list(pairs[GROUP_COLUMN]), cfg.heldout_fraction, cfg.seed)
    if len(train_idx) < cfg.batch_size:
        raise InputError(f"preference data {cfg.pairs} has {len(train_idx)} training pairs, fewer than one batch "
                         f"({cfg.batch_size})")  # fmt: skip
    data = PairTensors(*pair_latents(pairs, vae), source(list(pairs["caption"])))
    unet.requires_grad_(False)
    params = add_unet_lora(unet, cfg.lora_rank) if cfg.target in ("unet_lora", "both") else []
    if cfg.target in ("connector", "both"):
        if not data.source.parameters():
            raise InputError(f"target {cfg.target!r} trains the connector: it needs a bridge, not native text")
        data.source.bridge.requires_grad_(False)
        params += [p.requires_grad_(True) for p in data.source.parameters()]
    modules = _Trained(unet, getattr(data.source, "bridge", None))
    opt = make_optimizer(cfg.optimizer, [{"params": params, "lr": cfg.lr, "weight_decay": 1e-2}])
    sched = warmup_cosine(opt, cfg.max_steps, cfg.warmup)
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    sampler = EpochSampler(len(train_idx), cfg.batch_size, cfg.seed)
    timesteps = dpo_timesteps(cfg, scheduler)

    def losses(step: int, device: torch.device) -> dict[str, torch.Tensor]:
        cond, ref, zw, zl = data.rows(torch.as_tensor(train_idx)[sampler.batch(step)], device)
        out = dpo_step_losses(unet, scheduler, cond, zw, zl, cfg.beta, gen, cfg.sft_weight, ref,
                              data.source.as_reference(unet), timesteps)  # fmt: skip
        if len(held_idx) and (step + 1) % cfg.log_every == 0:
            out |= heldout_metrics(unet, scheduler, data, held_idx, cfg.beta, cfg.seed + 23)
        return out

    modules.train()
    if not fit("dpo", cfg, modules, opt, sched, losses, generators={"dpo": gen}, progress=progress):
        return Path(cfg.out) / "checkpoint"
    return save_dpo(modules, Path(cfg.out) / "final", cfg)


def train_unet_dpo(cfg: DPOTrainConfig, unet, vae, scheduler, condition: Callable[[list[str]], Conditioning],
                   progress: bool = True) -> Path:  # fmt: skip
    """`train_dpo` of a U-Net LoRA under a fixed conditioning ``condition(captions)``."""
    return train_dpo(cfg, unet, vae, scheduler, lambda caps: FixedConditioning.of(condition, caps), progress)


class _Trained(torch.nn.Module):
    """What a DPO run trains, as one module for the loop's checkpoints: the U-Net (its LoRA) and the bridge."""

    def __init__(self, unet, bridge=None):
        super().__init__()
        self.unet = unet
        self.bridge = bridge


def save_dpo(modules: _Trained, folder: str | Path, cfg: DPOTrainConfig | None = None) -> Path:
    """What a DPO run trained, written atomically: the U-Net LoRA as a low-rank delta (``unet_dpo.safetensors``,
    merged by `load_unet_dpo`), the trained bridge as a bridge folder (``bridge/``), and a config.json."""
    delta = lora_factors(modules.unet, lambda name: True)
    trained_bridge = cfg is not None and cfg.target in ("connector", "both")
    if not delta and not trained_bridge:
        raise ValueError("nothing to save: the U-Net has no LoRA layers and no connector was trained")
    with atomic_dir(folder) as tmp:
        if delta:
            save_file({k: v.contiguous() for k, v in delta.items()}, str(tmp / DPO_WEIGHTS))
        if trained_bridge:
            modules.bridge.save_pretrained(tmp / "bridge")
        meta = {"kind": "dpo", **({} if cfg is None else asdict(cfg))}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(folder)


def _read_unet_dpo(folder: str | Path) -> dict[str, torch.Tensor]:
    """The low-rank U-Net delta of a DPO folder (a clear error naming the folder when it is missing or corrupt)."""
    path = Path(folder) / DPO_WEIGHTS
    if not path.is_file():
        raise InputError(f"DPO folder {folder} has no {DPO_WEIGHTS}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"DPO weights {path} are unreadable: {err}") from None


def load_unet_dpo(unet, folder: str | Path) -> None:
    """Merge a saved DPO LoRA into ``unet`` (a clear error naming the folder when it is missing or corrupt)."""
    apply_delta(unet, _read_unet_dpo(folder), "U-Net")


def soup_unet_dpo(folders: list[str | Path], out: str | Path, weights: list[float] | None = None) -> Path:
    """Average several DPO LoRAs of one U-Net into one DPO folder (a "model soup", Wortsman et al. 2022): merged,
    it gives ``W + sum_i w_i * up_i @ down_i`` (uniform weights by default), exactly the weighted mean of the
    merged U-Nets. The factors are stacked along the rank (rank = sum of the inputs' ranks), not averaged factor
    by factor, which would not average the updates. Written atomically; loads with `load_unet_dpo`."""
    if len(folders) < 2:
        raise InputError(f"a soup needs at least two DPO folders, got {len(folders)}")
    weights = [1.0 / len(folders)] * len(folders) if weights is None else list(weights)
    if len(weights) != len(folders):
        raise InputError(f"{len(weights)} weights for {len(folders)} DPO folders")
    deltas = [_read_unet_dpo(f) for f in folders]
    for folder, delta in zip(folders[1:], deltas[1:]):
        if delta.keys() != deltas[0].keys():
            raise InputError(f"DPO folder {folder} adapts other U-Net layers than {folders[0]}; cannot average them")
    soup = {}
    for k in deltas[0]:
        if k.endswith(LOW_RANK_DOWN):
            soup[k] = torch.cat([d[k] for d in deltas]).contiguous()
        elif k.endswith(LOW_RANK_UP):
            soup[k] = torch.cat([w * d[k] for w, d in zip(weights, deltas)], dim=1).contiguous()
        else:
            raise InputError(f"DPO folder {folders[0]} holds a full weight {k}, not a LoRA; cannot average it")
    with atomic_dir(out) as tmp:
        save_file(soup, str(tmp / DPO_WEIGHTS))
        meta = {"kind": "dpo_soup", "folders": [str(f) for f in folders], "weights": weights}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)
