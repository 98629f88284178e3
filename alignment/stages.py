"""Stage configs (strategies A/B/C), the curriculum, and what each stage makes trainable.

A stage names the parameter groups it trains (``train: [connector, llm_top, unet_cross_attn]``):

- ``connector``: the connector, the learned null conditioning, the time modulation, the CLIP alignment head
  (strategy A trains only this);
- ``llm_top``: the top ``llm_top_layers`` transformer blocks of the LLM (full, or LoRA when
  ``llm_lora_rank > 0``), with layer-wise learning-rate decay, optionally with an LM loss on the plan tokens
  to keep the planner planning (strategy B);
- ``unet_cross_attn``: the U-Net's cross-attention keys and values (``attn2.to_k``/``to_v``), full or LoRA
  (strategy C).

Everything else is frozen. Configs are YAML; unknown keys, undefined stages and unknown parameter groups are
errors that name the offender.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from safeio import InputError

PARAMETER_GROUPS = ("connector", "llm_top", "unet_cross_attn")
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class StageConfig:
    name: str = "A"
    train: list[str] = field(default_factory=lambda: ["connector"])  # parameter groups (see module docstring)
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4  # connector (AdamW), the seed document's strategy-A range 1e-4 .. 5e-5
    weight_decay: float = 0.01
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    grad_clip: float = 1.0
    grad_accum: int = 1
    cfg_dropout: float = 0.1  # share of rows conditioned on the learned null (trains CFG's negative branch)
    ema_decay: float = 0.999  # EMA of every trainable weight; the exported weights are the EMA
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)) so short stages are not pulled to their init
    snr_gamma: float = 0.0  # min-SNR weighting of the diffusion loss (0: plain epsilon MSE)
    clip_align_weight: float = 0.0  # lambda of the CLIP alignment loss (0: off)
    clip_align_loss: str = "cosine"  # l2 | cosine | infonce
    # strategy B
    llm_top_layers: int = 0  # how many top LLM blocks `llm_top` unfreezes (1-4)
    llm_lora_rank: int = 0  # > 0: LoRA (peft) on those blocks instead of full fine-tuning
    llm_lr: float = 1e-5
    layer_decay: float = 0.8  # lr of each block below the top = lr x decay^depth
    lm_loss_weight: float = 0.0  # LM loss on plan tokens (keeps the planner able to plan)
    # strategy C
    unet_cross_attn: str = "lora"  # full | lora, for `unet_cross_attn`
    unet_lora_rank: int = 4
    unet_lr: float = 1e-5

    def uses_lora(self, group: str) -> bool:
        """Whether this stage trains ``group`` (llm_top / unet_cross_attn) through LoRA rather than in full."""
        return self.llm_lora_rank > 0 if group == "llm_top" else self.unet_cross_attn == "lora"

    def __post_init__(self) -> None:
        unknown = [g for g in self.train if g not in PARAMETER_GROUPS]
        if unknown:
            raise InputError(
                f"stage {self.name}: unknown parameter group(s) {unknown}; known: {list(PARAMETER_GROUPS)}"
            )
        if "llm_top" in self.train and self.llm_top_layers < 1:
            raise InputError(f"stage {self.name}: llm_top needs llm_top_layers >= 1")
        if self.unet_cross_attn not in ("full", "lora"):
            raise InputError(f"stage {self.name}: unet_cross_attn must be full or lora")
        if self.clip_align_loss not in ("l2", "cosine", "infonce"):
            raise InputError(f"stage {self.name}: clip_align_loss must be l2, cosine or infonce")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise InputError(f"stage {self.name}: cfg_dropout must be in [0, 1)")
        check_positive(f"stage {self.name}", steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                       llm_lr=self.llm_lr, unet_lr=self.unet_lr)  # fmt: skip


@dataclass
class BridgeTrainConfig:
    data: str = "data/toy50k"  # `plan2img data build` folder (its train split)
    base: str = "toyworld/pretrained/base"  # frozen base (VAE, U-Net, text encoder): toy, SD 1.x/2.x or SDXL
    clip_image_model: str | None = None  # a local HF CLIP folder for the alignment targets (bases without one)
    planner: str = "toyworld/pretrained/planner"  # the planner LLM (hidden states come from it)
    out: str = "runs/bridge"
    connector: str = "resampler-64q"  # preset name (llm_bridge.connector.CONNECTOR_PRESETS)
    layers: str | list[int] = "mean"  # last | mean | learned | [indices]
    hierarchical: str = "off"  # off | fixed | learned
    mode: str = "replace"  # replace | concat
    pooled: bool = True  # the pooled "how" stream into the time embedding
    spatial: bool = False  # plan-grounded spatial injection: per-object token groups confined to plan regions
    object_tokens: str = "span"  # span | shared (ablation: every group reads the whole plan)
    object_queries: int = 16  # resampler queries per object group
    region_strength: float = 1.0  # 1: object tokens get no attention outside their region
    region_levels: list[int] | None = None  # U-Net maps (latent side / 2**level) with regions; None: all
    use_planner: bool = True  # False: condition on the LLM's states of the raw prompt (no-planner ablation)
    cache_hidden: bool = True  # cache LLM states while the LLM is frozen
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate); bf16 pays on GPUs, on CPU it was slower here
    llm_dtype: str = "float32"  # precision the LLM runs in (recorded in the connector config)
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    max_examples: int | None = None  # use only the first N training rows
    stop_at: int | None = None  # stop (with a checkpoint) after this many total steps; resume later
    threads: int | None = None
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, CUDA only)
    gradient_checkpointing: bool = False  # recompute U-Net (and, in stages training it, LLM) activations
    llm_load_in_8bit: bool = False  # the planner LLM in 8-bit (bitsandbytes, CUDA); llm_top then trains via LoRA
    stages: dict[str, StageConfig] = field(default_factory=lambda: {"A": StageConfig("A")})
    curriculum: list[str] = field(default_factory=lambda: ["A"])

    def __post_init__(self) -> None:
        missing = [s for s in self.curriculum if s not in self.stages]
        if missing:
            raise InputError(f"curriculum names undefined stage(s) {missing}; defined: {list(self.stages)}")
        if not self.curriculum:
            raise InputError("the curriculum is empty")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise InputError(f"optimizer must be 'adamw' or 'adamw8bit', got {self.optimizer!r}")
        if self.llm_load_in_8bit:
            full = [s.name for s in self.stage_list() if "llm_top" in s.train and not s.uses_lora("llm_top")]
            if full:
                raise InputError(
                    f"stage(s) {full} train llm_top in full, but an 8-bit LLM (llm_load_in_8bit) trains only "
                    "through LoRA: set llm_lora_rank > 0"
                )

    def stage_list(self) -> list[StageConfig]:
        return [self.stages[s] for s in self.curriculum]

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stage_list())


def _type_ok(value, hint) -> bool:
    """Does a config value (parsed YAML) fit a dataclass field's type? Unknown kinds of hint pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _yaml11_number(value, hint):
    """``"3e-4"`` as 3e-4 where a float is due: YAML 1.1 (PyYAML) reads exponents without a dot as strings."""
    wants_float = hint is float or float in typing.get_args(hint)
    if wants_float and isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def build_config(cls, data: dict, where: str):
    """``cls(**data)``, naming the keys ``cls`` does not know and the values of the wrong type (a number where a
    word is due, NaN or inf, a list where a number is due)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    data = {key: _yaml11_number(value, hints[key]) for key, value in data.items()}
    for key, value in data.items():
        if not _type_ok(value, hints[key]):
            shown = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise InputError(f"{where}: {key} must be {shown}, got {value!r} ({type(value).__name__})")
    return cls(**data)


def check_positive(where: str, **values) -> None:
    """Raise `InputError` naming the first of ``values`` that is not > 0."""
    for key, value in values.items():
        if value is not None and not value > 0:
            raise InputError(f"{where}: {key} must be > 0, got {value}")


def config_from_dict(data: dict, where: str = "config") -> BridgeTrainConfig:
    """Build a `BridgeTrainConfig` from plain data (e.g. parsed YAML), naming any bad key or stage."""
    data = dict(data)
    stages = data.pop("stages", None) or {"A": {}}
    if not isinstance(stages, dict):
        raise InputError(f"{where}: 'stages' must map stage names to settings")
    built = {}
    for name, body in stages.items():
        body = dict(body or {})
        body.setdefault("name", name)
        built[name] = build_config(StageConfig, body, f"{where}: stage {name}")
    data["stages"] = built
    data.setdefault("curriculum", list(built))
    return build_config(BridgeTrainConfig, data, where)


def read_yaml_mapping(path: str | Path, overrides: dict | None = None) -> dict:
    """A YAML file's top-level mapping with ``overrides`` applied; errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping")
    data.update(overrides or {})
    return data


def load_config(path: str | Path, overrides: dict | None = None) -> BridgeTrainConfig:
    """Read a YAML training config (and apply top-level ``overrides``)."""
    return config_from_dict(read_yaml_mapping(path, overrides), str(path))
