"""The one training loop (`TrainLoop`, on accelerate) and what it needs: JSONL metrics, LR schedules, EMA
(diffusers), exact-resume checkpoints.

A checkpoint is a folder written atomically (temp folder + rename): model weights as safetensors, optimizer
and LR-scheduler state via ``torch.save`` (read back with ``weights_only=True``), RNG states and the data
position in ``state.json``. Resuming from it continues the run bit for bit on the same machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from safeio import InputError, atomic_dir, atomic_write_json, recover_dir


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
        """One update; call it once per optimizer step (not per gradient-accumulation micro-step). The averages
        follow the parameters' device (a model moved after the EMA was made, e.g. by ``accelerator.prepare``)."""
        params = list(self.params.values())
        if params and self.ema.shadow_params[0].device != params[0].device:
            self.ema.to(device=params[0].device)
        self.ema.step(params)  # EMAModel copies (not averages) params that need no grad

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
            save_file(_unshared(module.state_dict()), str(tmp / f"{name}.safetensors"))
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


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can write: a tensor sharing storage with an earlier one (tied weights) is copied."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


def load_checkpoint(
    folder: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    ema: EMA | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> TrainState:
    """Restore everything `save_checkpoint` wrote; raises `ValueError` naming a missing or corrupt file."""
    folder = recover_dir(folder)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise InputError(f"checkpoint {folder} has no state.json (incomplete or not a checkpoint)")
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
        raise InputError(f"checkpoint {folder} is corrupt or does not match the run: {err}") from None
    return TrainState(step=int(meta["step"]), extra=meta.get("extra") or {})


class EpochSampler:
    """Batches of indices in a fresh seeded permutation per epoch; batch ``k`` depends only on (seed, k)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise InputError(f"data set of {n} examples is smaller than one batch ({batch_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, k: int) -> torch.Tensor:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]


class NonFiniteLossError(InputError, FloatingPointError):
    """A loss went NaN or inf: the run stops naming the step (and batch rows), keeping its last good checkpoint.
    Usually the data or the settings (a learning rate too high, fp16 overflow), so the CLI reports it as one line."""


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (``adamw8bit``: optimizer states in 8 bits; needs CUDA). bitsandbytes is
    optional and imported only when asked for. Every trainer builds its optimizer here."""
    if name == "adamw8bit":
        if not torch.cuda.is_available():
            raise InputError("optimizer 'adamw8bit' (bitsandbytes) needs a CUDA GPU; none is available")
        import bitsandbytes as bnb  # optional, CUDA-only

        return bnb.optim.AdamW8bit(groups, betas=(0.9, 0.999))
    if name != "adamw":
        raise InputError(f"optimizer must be adamw or adamw8bit, got {name!r}")
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def check_finite(loss: torch.Tensor, step: int, what: str = "loss") -> None:
    """Stop with the step named when a loss is NaN or inf (`NonFiniteLossError`)."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"{what} is {loss.item()} at step {step}; stopping (last good checkpoint kept)")


LossFn = Callable[[int], dict[str, torch.Tensor]]  # micro-batch index -> losses (and other scalars to log)


@dataclass
class TrainLoop:
    """The one optimisation loop every trainer runs (base VAE / CLIP / U-Net, bridge stages; DPO and the critic
    later): each trainer hands it a loss function of the micro-batch index and a checkpoint writer.

    A step is ``grad_accum`` micro-batches under accelerate's ``accumulate`` and ``autocast``; the gradient is
    clipped, the optimizer, LR schedule and EMA move, the log is written and checkpoints are taken once per
    optimizer step. The LR schedule is stepped here, not by accelerate (whose prepared scheduler steps once per
    process under DDP), so N processes follow the schedule one does. Losses are averaged over processes for the
    log; only the main process logs. A NaN or inf ``loss_key`` stops the run naming the step (and ``what``).
    """

    accelerator: Accelerator
    model: torch.nn.Module  # the (prepared) module whose gradients accumulate
    optimizer: torch.optim.Optimizer  # prepared
    lr_scheduler: object
    params: list[torch.nn.Parameter]  # what the gradient clip sees
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema: EMA | None = None
    logger: JsonlLogger | None = None
    log_every: int = 25
    checkpoint_every: int = 250
    loss_key: str = "loss"
    step_offset: int = 0  # added to logged/named steps (a curriculum's earlier stages)
    log_fields: dict = field(default_factory=dict)  # constant fields of every log record (e.g. the stage)
    desc: str = "train"
    progress: bool = True
    autocast: Callable[[], AbstractContextManager] | None = None  # None: the accelerator's mixed precision

    def run(self, loss_fn: LossFn, start: int, end: int, total: int, save: Callable[[int], None],
            what: Callable[[int], str] | None = None) -> None:  # fmt: skip
        """Optimizer steps ``start..end`` (of ``total``); ``save(step)`` writes a checkpoint after ``step`` steps
        (every ``checkpoint_every`` and at ``end``)."""
        acc, ga = self.accelerator, self.grad_accum
        acc.gradient_accumulation_steps = ga
        t_last = time.perf_counter()
        with tqdm(
            total=total, initial=start, desc=self.desc, disable=not self.progress
        ) as bar:  # closed on errors too
            for micro in range(start * ga, end * ga):
                step = micro // ga
                losses, grad_norm = self._micro_step(loss_fn, micro, step, what)
                if not acc.sync_gradients:
                    continue
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.update()  # once per optimizer step, not per micro-batch
                bar.update(1)
                if (step + 1) % self.log_every == 0:
                    now = time.perf_counter()
                    self._log(step + 1, losses, grad_norm, (now - t_last) / self.log_every)
                    t_last = now
                if (step + 1) % self.checkpoint_every == 0 or step + 1 == end:
                    save(step + 1)

    def _micro_step(self, loss_fn: LossFn, micro: int, step: int, what):
        acc = self.accelerator
        grad_norm = None
        autocast = acc.autocast() if self.autocast is None else self.autocast()
        with acc.accumulate(self.model), autocast:
            losses = loss_fn(micro)
            label = self.loss_key if what is None else what(micro)
            check_finite(losses[self.loss_key], self.step_offset + step, label)
            acc.backward(losses[self.loss_key])
            if acc.sync_gradients and self.grad_clip:
                grad_norm = acc.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()  # accelerate's optimizer skips the step inside an accumulation window
            self.optimizer.zero_grad(set_to_none=True)
        return losses, grad_norm

    def _log(self, step: int, losses: dict, grad_norm, sec_per_step: float) -> None:
        acc = self.accelerator
        record = {}
        for k, v in losses.items():
            v = torch.as_tensor(v, dtype=torch.float32, device=acc.device).detach()
            record[k] = float(acc.reduce(v, "mean"))  # over processes
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if acc.device.type == "cuda":  # the cost of a run on a GPU: its peak allocated memory so far
            record["cuda_peak_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        if self.logger is not None and acc.is_main_process:
            lr = self.lr_scheduler.get_last_lr()[0]
            self.logger.log(step=self.step_offset + step, **self.log_fields, lr=lr, sec_per_step=sec_per_step,
                            **record)  # fmt: skip


def base_accelerator() -> Accelerator:
    """The accelerator of a single-model trainer: the GPU when there is one. Its mixed precision is left to the
    process's accelerate state (one per process: a second trainer asking for another one would be refused), and
    the trainer autocasts itself."""
    return Accelerator(cpu=not torch.cuda.is_available())


def fit(name: str, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
        loss_fn: Callable[[int, torch.device], dict[str, torch.Tensor]], *, ema_decay: float | None = None,
        generators: dict[str, torch.Generator] | None = None, progress: bool = True) -> bool:  # fmt: skip
    """Train one model with `TrainLoop`, resuming from ``cfg.out/checkpoint``: what the base trainers (VAE, CLIP,
    U-Net) share. ``cfg`` is a dataclass with ``out``, ``max_steps``, ``stop_at``, ``grad_clip``, ``bf16``,
    ``log_every`` and ``checkpoint_every``; ``loss_fn(micro, device)`` returns the losses of micro-batch
    ``micro`` (key ``loss`` is optimised). With ``ema_decay`` an EMA of the weights is kept and copied into the
    model at the end. Returns whether ``max_steps`` were reached (False: stopped at ``cfg.stop_at``)."""
    out = Path(cfg.out)
    acc = base_accelerator()
    model.to(acc.device)
    ema = None if ema_decay is None else EMA(dict(model.named_parameters()), ema_decay)
    logger = JsonlLogger(out / "log.jsonl")
    state = TrainState()
    if (out / "checkpoint").is_dir():
        state = load_checkpoint(out / "checkpoint", {name: model}, optimizer, lr_scheduler, ema, generators)
        logger.truncate_after(state.step)
    atomic_write_json(out / "config.json", asdict(cfg))
    model.train()
    end = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)

    def autocast():
        return torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    # one process, one micro-batch a step: the model and optimizer need no accelerate wrapping (which would also
    # impose the process's mixed precision on the model's forward)
    loop = TrainLoop(acc, model, optimizer, lr_scheduler, list(model.parameters()), grad_clip=cfg.grad_clip, ema=ema,
                     logger=logger, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, desc=name,
                     progress=progress, autocast=autocast)  # fmt: skip

    def save(step: int) -> None:
        save_checkpoint(out / "checkpoint", TrainState(step), {name: model}, optimizer, lr_scheduler, ema, generators)

    loop.run(lambda micro: loss_fn(micro, acc.device), state.step, end, cfg.max_steps, save)
    if end < cfg.max_steps:
        return False
    if ema is not None:
        ema.copy_to()  # export the EMA weights
    model.eval()
    return True
