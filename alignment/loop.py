"""Pieces every training loop here shares: JSONL metrics, LR schedules, EMA, exact-resume checkpoints.

A checkpoint is a folder written atomically (temp folder + rename): model weights as safetensors, optimizer
and LR-scheduler state via ``torch.save`` (read back with ``weights_only=True``), RNG states and the data
position in ``state.json``. Resuming from it continues the run bit for bit on the same machine.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a set of parameters (kept in fp32).

    With ``warmup`` (the default) the decay of update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so a run much
    shorter than ``1 / (1 - decay)`` steps exports (an average of) its trained weights rather than weights still
    dominated by their initial values: with a fixed 0.999, 1,000 steps leave 37% of the initial weights in the
    average. The update count is part of the state, so a resumed run continues the same schedule.
    """

    COUNT_KEY = "@num_updates"  # not a valid parameter name, so it cannot collide

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float = 0.999, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.params = params
        self.num_updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.nn.Parameter] | None = None) -> None:
        for k, p in (params or self.params).items():
            p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, self.COUNT_KEY: torch.tensor([self.num_updates], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        self.shadow = {k: state[k].float().clone() for k in self.shadow}
        # checkpoints written before the count was saved: treat the warm-up as over (the old fixed decay)
        count = state.get(self.COUNT_KEY)
        self.num_updates = int(count.item()) if count is not None else 10**9


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
