"""Pieces every training loop here shares: JSONL metrics, LR schedules, EMA (diffusers), exact-resume checkpoints.

A checkpoint is a folder written atomically (temp folder + rename): model weights as safetensors, optimizer
and LR-scheduler state via ``torch.save`` (read back with ``weights_only=True``), RNG states and the data
position in ``state.json``. Resuming from it continues the run bit for bit on the same machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from safeio import atomic_dir


class JsonlLogger:
    """Append one JSON object per line; each line is flushed so a stopped run keeps its curve."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record) -> None:
        record.setdefault("time", time.time())
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run re-logs them)."""
        if not self.path.exists():
            return
        keep = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in keep))


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float = 0.1):
    """transformers' schedule: linear warmup from 0 over ``warmup`` steps, then cosine decay to ``min_ratio`` of
    the peak at ``total`` (one ``step()`` per optimizer step)."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_ratio)


class _FixedDecayEMA(EMAModel):
    """diffusers' EMA at one decay from the first update on (``warmup=False``, the ablation)."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


class EMA:
    """Exponential moving average of named parameters: diffusers' `EMAModel`, keyed by name for checkpoints.

    With ``warmup`` (the default) the decay of update ``n`` is EMAModel's ``min(decay, (1 + n) / (10 + n))`` (0
    for the first update, which copies the weights), so a run much shorter than ``1 / (1 - decay)`` steps
    exports (an average of) its trained weights rather than weights still dominated by their initial values:
    with a fixed 0.999, 1,000 steps leave 37% of the initial weights in the average. The update count is part of
    the state, so a resumed run continues the same schedule. Kept as a wrapper because our checkpoints store the
    averages as named safetensors (EMAModel's own ``state_dict`` is a pickled list).
    """

    COUNT_KEY = "@num_updates"  # not a valid parameter name, so it cannot collide

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float = 0.999, warmup: bool = True):
        self.params = params
        self.names = list(params)
        cls = EMAModel if warmup else _FixedDecayEMA
        self.ema = cls([p.detach().float() for p in params.values()], decay=decay)

    @property
    def num_updates(self) -> int:
        return self.ema.optimization_step

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (fp32)."""
        return dict(zip(self.names, self.ema.shadow_params))

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return self.ema.get_decay(self.ema.optimization_step + 1)

    @torch.no_grad()
    def update(self) -> None:
        """One update; call it once per optimizer step (not per gradient-accumulation micro-step)."""
        self.ema.step(list(self.params.values()))  # EMAModel copies (not averages) params that need no grad

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.nn.Parameter] | None = None) -> None:
        target = params or self.params
        for name, avg in zip(self.names, self.ema.shadow_params):
            target[name].copy_(avg.to(target[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, self.COUNT_KEY: torch.tensor([self.num_updates], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        self.ema.shadow_params = [state[k].float().clone() for k in self.names]
        # checkpoints written before the count was saved: treat the warm-up as over (the old fixed decay)
        count = state.get(self.COUNT_KEY)
        self.ema.optimization_step = int(count.item()) if count is not None else 10**9


@dataclass
class TrainState:
    """Where a run stands: the next step to run and anything else JSON-serialisable (data position...)."""

    step: int = 0
    extra: dict | None = None


def save_checkpoint(
    folder: str | Path,
    state: TrainState,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    ema: EMA | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Write a resumable checkpoint folder atomically (it replaces ``folder`` only when complete)."""
    with atomic_dir(folder) as tmp:
        for name, module in modules.items():
            tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if lr_scheduler is not None:
            torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        for name, g in (generators or {}).items():
            rng[f"gen_{name}"] = g.get_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": state.step, "extra": state.extra or {}}, indent=2))
    return Path(folder)


def load_checkpoint(
    folder: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    ema: EMA | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> TrainState:
    """Restore everything `save_checkpoint` wrote; raises `ValueError` naming a missing or corrupt file."""
    folder = Path(folder)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise ValueError(f"checkpoint {folder} has no state.json (incomplete or not a checkpoint)")
    try:
        for name, module in modules.items():
            module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        if lr_scheduler is not None:
            lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
        if ema is not None:
            ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        for name, g in (generators or {}).items():
            g.set_state(rng[f"gen_{name}"])
        meta = json.loads(state_file.read_text())
    except (OSError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {folder} is corrupt or does not match the run: {err}") from None
    return TrainState(step=int(meta["step"]), extra=meta.get("extra") or {})


class EpochSampler:
    """Batches of indices in a fresh seeded permutation per epoch; batch ``k`` depends only on (seed, k)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"data set of {n} examples is smaller than one batch ({batch_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, k: int) -> torch.Tensor:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]


def check_finite(loss: torch.Tensor, step: int, what: str = "loss") -> None:
    """Stop with the step named when a loss is NaN or inf."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"{what} is {loss.item()} at step {step}; stopping (last good checkpoint kept)")
