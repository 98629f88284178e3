"""Planner DPO: TRL's `DPOTrainer` on plan preference pairs, through a peft LoRA.

Pairs are TRL's preference columns (``prompt``, ``chosen``, ``rejected``: the user's prompt and two plans), as
`alignment.preference.PairWriter` writes them, read from a `datasets` folder, a Parquet file or a JSON-lines file.
The prompt is put in the planner's one prompt format (`planner.tokens.format_prompt`) and each plan becomes a
completion ending in EOS, as in the planner's SFT. With ``peft_config`` and no reference model, TRL computes the
reference log-probabilities with the adapter disabled (one LM in memory); ``precompute_ref_log_probs`` computes
them once before training. The adapter is saved as a peft folder that `Planner.from_pretrained(adapter=...)` and
`plan2img plan --adapter` load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from peft import LoraConfig

from alignment.planner_sft import JsonlCallback, plan_body
from alignment.preference import PLAN_PAIR_COLUMNS
from alignment.prepared import DataPrepError, read_source
from planner.planner import Planner
from planner.schema import Plan, PlanError, PlanSpec
from planner.tokens import format_prompt
from safeio import InputError, atomic_dir, atomic_write_json


@dataclass
class PlannerDPOConfig:
    pairs: str = "runs/pairs_train/pairs/best-of/plans"  # prompt / chosen / rejected plans; several: comma-separated
    planner: str = "toyworld/pretrained/planner"  # the planner LM the LoRA is trained on
    adapter: str | None = None  # a LoRA adapter merged into ``planner`` first (the toy writer: planner_wide)
    out: str = "runs/planner_dpo"
    beta: float = 0.1  # DPO's KL strength (Rafailov et al.; TRL's default)
    loss_type: str = "sigmoid"  # TRL's loss types; sigmoid is the DPO paper's
    # + this x the NLL of the chosen plan (TRL's "sft" loss beside the DPO one; RPO, Pang et al. 2024): DPO alone
    # may lower the chosen plan's likelihood together with the rejected one's
    sft_weight: float = 0.0
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: 2 * rank
    lr: float = 5e-5
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    precompute_ref_log_probs: bool = False  # reference log-probs computed once, before training
    max_length: int = 256
    seed: int = 0
    logging_steps: int = 10
    threads: int | None = None


def plan_pairs(path: str | Path, tokenizer, spec: PlanSpec | None = None) -> datasets.Dataset:
    """TRL rows from a plan-pair file: the prompt in the planner's format, each plan a completion ending in EOS.
    A missing column, an empty prompt or a plan that does not parse is a `DataPrepError` naming the row."""
    path = Path(path)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        try:
            ds = datasets.Dataset.from_json(str(path))
        except (OSError, ValueError) as err:
            raise DataPrepError(f"cannot read plan pairs {path}: {err}") from None
    else:
        ds = read_source(path)
    missing = [c for c in PLAN_PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataPrepError(f"plan pairs {path} lack columns {missing} (columns: {ds.column_names})")
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i, row in enumerate(ds):
        prompt = " ".join(str(row["prompt"] or "").split())
        if not prompt:
            raise DataPrepError(f"plan pairs {path}, row {i}: empty prompt")
        rows["prompt"].append(format_prompt(tokenizer, prompt))
        for key in ("chosen", "rejected"):
            try:
                plan = Plan.parse(str(row[key]), spec)
            except PlanError as err:
                raise DataPrepError(f"plan pairs {path}, row {i}, column {key!r}: {err}") from None
            rows[key].append(plan_body(plan.to_text()) + tokenizer.eos_token)
    return datasets.Dataset.from_dict(rows)


def all_plan_pairs(paths: str, tokenizer, spec: PlanSpec | None = None) -> datasets.Dataset:
    """`plan_pairs` of every comma-separated path in ``paths``, one after another (e.g. self-play and contrast
    pairs trained together)."""
    parts = [p.strip() for p in str(paths).split(",") if p.strip()]
    if not parts:
        raise DataPrepError(f"no plan-pair path in {paths!r}")
    return datasets.concatenate_datasets([plan_pairs(p, tokenizer, spec) for p in parts])


def _loss_options(cfg: PlannerDPOConfig) -> dict:
    """TRL's loss arguments: the DPO loss alone, or with an SFT term on the chosen plans weighted ``sft_weight``."""
    if cfg.sft_weight < 0:
        raise InputError(f"sft_weight must be >= 0, got {cfg.sft_weight}")
    if cfg.sft_weight == 0:
        return {"loss_type": cfg.loss_type}
    return {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.sft_weight]}


def train_planner_dpo(cfg: PlannerDPOConfig, spec: PlanSpec | None = None) -> Path:
    """DPO of a LoRA adapter on ``cfg.planner`` (with ``cfg.adapter`` merged in) with TRL; returns the adapter
    folder ``cfg.out/final/adapter``. ``cfg.out/final/writer`` holds the planner with every adapter merged: a planner
    folder for ``plan2img generate|eval --writer``."""
    from trl import DPOConfig, DPOTrainer  # TRL pulls in much at import; only this command needs it

    loss = _loss_options(cfg)  # bad options fail before anything loads
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    planner = Planner.from_pretrained(cfg.planner, spec=spec, adapter=cfg.adapter)
    tokenizer, model = planner.tokenizer, planner.model
    rows = all_plan_pairs(cfg.pairs, tokenizer, spec)
    if len(rows) < cfg.batch_size:
        raise DataPrepError(f"plan pairs {cfg.pairs} have {len(rows)} rows, fewer than one batch ({cfg.batch_size})")
    atomic_write_json(out / "config.json", asdict(cfg))
    args = DPOConfig(
        output_dir=str(out / "checkpoints"),
        beta=cfg.beta,
        **loss,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to="none",
        dataset_num_proc=1,
    )
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=lora, callbacks=[JsonlCallback(out / "log.jsonl")])  # fmt: skip
    trainer.train()
    with atomic_dir(out / "final" / "adapter") as tmp:
        trainer.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    Planner(trainer.model.merge_and_unload(), tokenizer, spec).save_pretrained(out / "final" / "writer")
    return out / "final" / "adapter"
