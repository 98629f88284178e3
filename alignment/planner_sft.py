"""The toy planner LLM: a BPE tokenizer with the planning tokens, a small Llama, SFT with TRL, and metrics.

Supervised fine-tuning on prompt -> canonical plan uses TRL's `SFTTrainer` on a prompt-completion data set,
so the loss is on the completion (the plan) only. Training resumes from the Trainer's last checkpoint.
``--init`` continues from a trained planner (its weights and its tokenizer); ``extra_rows`` (prompt, plan) pairs
without images are added to the data set's rows (``scripts/train_planner.py --wide-rows`` hands in rows of the toy
world's widened grammar).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback

from alignment.prepared import load_prepared
from planner.planner import Planner, PlanResult
from planner.schema import FIELDS, PLANNING_TOKENS, Plan, PlanError, PlanSpec
from planner.tokens import add_planning_tokens, format_prompt, resize_with_mean_init
from safeio import atomic_dir, atomic_write_json


@dataclass
class PlannerTrainConfig:
    data: str | None = "data/toy50k"  # a `plan2img data build` folder (its "train" split); None: extra rows only
    out: str = "runs/planner"  # checkpoints/, log.jsonl, final/
    vocab_size: int = 1024  # BPE vocabulary (before the planning tokens)
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 704
    epochs: float = 2.0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    seed: int = 0
    save_steps: int = 200
    logging_steps: int = 20
    threads: int | None = None
    init: str | None = None  # continue from this planner folder (weights + its tokenizer); None: from scratch
    data_rows: int | None = None  # a seeded random subset of the data set's train rows; None: all of them
    # toy world only, read by scripts/train_planner.py (recorded here so config.json says how a run was made):
    wide_rows: int = 0  # extra widened-grammar prompt/plan rows (row i depends only on (wide_seed, i))
    wide_seed: int = 1
    augment: bool = True  # chatter, politeness, typos, casing on the wide rows (toyworld.augment)
    lora_rank: int = 0  # >0 (with init): train a peft LoRA adapter on every linear layer, saved as final/adapter
    lora_alpha: float | None = None  # LoRA scale numerator (None: 2 * rank)
    load_in_8bit: bool = False  # the init LM in 8-bit (bitsandbytes, CUDA), trained through LoRA (peft k-bit)


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` over ``texts`` with <pad>, <s>, </s> and the planning tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=256
    )
    add_planning_tokens(fast)
    return fast


def plan_body(plan_text: str) -> str:
    """The text of a plan without special spacing changes (what the completion holds)."""
    return " " + plan_text


def toy_llm(tokenizer, cfg: PlannerTrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def sft_dataset(tokenizer, prompts: list[str], plans: list[str]):
    """TRL prompt-completion rows: the prompt format, then the plan (from <IMG_BEGIN>) and EOS."""
    import datasets

    return datasets.Dataset.from_dict(
        {
            "prompt": [format_prompt(tokenizer, p) for p in prompts],
            "completion": [plan_body(t) + tokenizer.eos_token for t in plans],
        }
    )


class JsonlCallback(TrainerCallback):
    """Writes the Trainer's logs to JSONL (one object per logging step)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")


def training_rows(
    cfg: PlannerTrainConfig, ds, extra_rows: Sequence[tuple[str, str]] = ()
) -> tuple[list[str], list[str]]:
    """Prompts and plans to train on: the data set's train rows (or ``cfg.data_rows`` of them, seeded; none when
    ``ds`` is None) followed by ``extra_rows``. The trainer shuffles."""
    prompts: list[str] = []
    plans: list[str] = []
    if ds is not None:
        train = ds.filter(lambda s: s == "train", input_columns="split")
        prompts, plans = list(train["prompt"]), list(train["plan"])
    if cfg.data_rows is not None and cfg.data_rows < len(prompts):
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(prompts))[: cfg.data_rows])
        prompts, plans = [prompts[i] for i in keep], [plans[i] for i in keep]
    for prompt, plan in extra_rows:
        prompts.append(prompt)
        plans.append(plan)
    return prompts, plans


def planner_tokenizer(cfg: PlannerTrainConfig, ds):
    """The run's tokenizer: the one saved in ``out/tokenizer``, else the ``init`` LM's with the planning tokens
    added, else a new BPE trained on the data set's texts; saved to ``out/tokenizer`` so a resumed run uses the
    same one."""
    tok_dir = Path(cfg.out) / "tokenizer"
    if tok_dir.is_dir():
        return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if cfg.init:  # a planner saved here, or any local causal LM: the planning tokens are added if missing
        tokenizer = AutoTokenizer.from_pretrained(cfg.init, local_files_only=True)
        add_planning_tokens(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = train_bpe_tokenizer(list(ds["prompt"]) + list(ds["plan"]), cfg.vocab_size)
    with atomic_dir(tok_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return tokenizer


def initial_model(cfg: PlannerTrainConfig, tokenizer):
    """The ``init`` LM (fp32, or 8-bit with ``load_in_8bit``) with embedding rows for every token of
    ``tokenizer`` (new rows = the mean of the old ones), or a fresh `toy_llm`."""
    if cfg.load_in_8bit and not (cfg.init and cfg.lora_rank):
        raise ValueError("load_in_8bit needs init (an existing LM) and lora_rank (8-bit weights train via LoRA)")
    if not cfg.init:
        return toy_llm(tokenizer, cfg)
    kwargs: dict = {"local_files_only": True}
    if cfg.load_in_8bit:
        if not torch.cuda.is_available():
            raise ValueError("load_in_8bit needs a CUDA GPU (bitsandbytes 8-bit training); none is available")
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0})
    else:
        kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.init, **kwargs)
    except OSError as err:
        raise ValueError(f"could not load a causal LM from init={cfg.init}: {err}") from None
    resize_with_mean_init(model, len(tokenizer))
    if cfg.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def new_token_ids(cfg: PlannerTrainConfig, tokenizer) -> list[int]:
    """Ids of the planning tokens the ``init`` LM's own tokenizer lacks (their rows must train under LoRA)."""
    if not cfg.init:
        return []
    own = AutoTokenizer.from_pretrained(cfg.init, local_files_only=True).get_vocab()
    return sorted(tokenizer.convert_tokens_to_ids(t) for t in PLANNING_TOKENS if t not in own)


def train_planner(cfg: PlannerTrainConfig, extra_rows: Sequence[tuple[str, str]] = ()) -> Path:
    """Train the planner on a prepared data set's prompts and plans (plus ``extra_rows``), resuming from the last
    checkpoint in ``cfg.out/checkpoints``; returns final/ (or final/adapter with ``lora_rank``)."""
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if cfg.data is None and not (cfg.init and extra_rows):
        raise ValueError("data=None trains on extra rows alone: it needs init (an LM to start from) and extra_rows")
    ds = None if cfg.data is None else load_prepared(cfg.data)
    tokenizer = planner_tokenizer(cfg, ds)
    model = initial_model(cfg, tokenizer)
    rows = sft_dataset(tokenizer, *training_rows(cfg, ds, extra_rows))
    atomic_write_json(out / "config.json", asdict(cfg))
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=1.0,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,  # TRL defaults to bf16 autocast: ~10x slower on CPUs without bf16 units, and the run is fp32
        gradient_checkpointing=False,  # TRL's default; a 3.4M-parameter model does not need to save activations
        report_to="none",
        max_length=256,
        completion_only_loss=True,
        dataset_num_proc=1,
        disable_tqdm=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        callbacks=[JsonlCallback(out / "log.jsonl")],
        peft_config=lora_config(cfg, model, new_token_ids(cfg, tokenizer)),
    )
    last = get_last_checkpoint(str(out / "checkpoints")) if (out / "checkpoints").is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    if cfg.lora_rank:
        with atomic_dir(out / "final" / "adapter") as tmp:
            # peft: adapter_config.json + adapter_model.safetensors. Not the whole resized embedding: the loader
            # grows it with the same mean init, and the new rows are the adapter's trainable tokens
            trainer.model.save_pretrained(str(tmp), save_embedding_layers=False)
            tokenizer.save_pretrained(str(tmp))  # with the planning tokens: the base LM's own may lack them
        return out / "final" / "adapter"
    planner = Planner(trainer.model, tokenizer)
    return planner.save_pretrained(out / "final")


def lora_config(cfg: PlannerTrainConfig, model=None, new_tokens: Sequence[int] = ()) -> LoraConfig | None:
    """The peft adapter of a LoRA run (every linear layer but the output head), or None for full fine-tuning.
    ``new_tokens`` (planning tokens the base LM lacked) train as peft trainable tokens in the input embedding,
    so their rows are saved in the adapter."""
    if not cfg.lora_rank:
        return None
    if not cfg.init:
        raise ValueError("lora_rank needs init: a LoRA adapter fine-tunes an existing LM")
    trainable = None
    if new_tokens and model is not None:
        # input rows only: TRL's fused loss reads the output head's attributes, which peft's wrapper hides; an
        # untied head keeps its mean-initialised rows and the LoRA layers learn to reach them
        trainable = {_module_name(model, model.get_input_embeddings()): list(new_tokens)}
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        trainable_token_indices=trainable,
        task_type="CAUSAL_LM",
    )


def _module_name(model, module) -> str:
    return next(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module)


# ------------------------------------------------------------------------------------------------ metrics
def _bag(text: str | None) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text or "")


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred and not gold:
        return 1.0
    common = sum(min(pred.count(w), gold.count(w)) for w in set(pred))
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def plan_metrics(
    results: list[PlanResult],
    gold_texts: list[str],
    spec: PlanSpec | None = None,
    groups: Sequence[str] | None = None,
) -> dict:
    """Exact match, per-field token F1, object-level F1 (OBJECT entries as items) and parse rate. ``groups``: a
    label per prompt (e.g. its sentence frame); then also ``exact_by_group``, ``{label: {"right", "n", "exact"}}``."""
    if groups is not None and len(groups) != len(results):
        raise ValueError(f"groups has {len(groups)} labels for {len(results)} results")
    exact, parsed = 0, 0
    by_group: dict[str, list[int]] = {}
    field_f1: dict[str, list[float]] = {f: [] for f in FIELDS}
    tp = n_pred = n_gold = 0
    for i, (r, gold_text) in enumerate(zip(results, gold_texts)):
        gold = Plan.parse(gold_text)
        pred = None
        try:
            pred = Plan.parse(r.text, spec) if spec is not None else Plan.parse(r.text)
            parsed += 1
        except PlanError:
            pred = r.plan  # a repaired plan still counts for F1, not for the parse rate
        right = pred is not None and pred.to_text() == gold.to_text()
        exact += right
        if groups is not None:
            tally = by_group.setdefault(groups[i], [0, 0])
            tally[0] += right
            tally[1] += 1
        for f in FIELDS:
            field_f1[f].append(_f1(_bag(pred.get(f) if pred else None), _bag(gold.get(f))))
        pred_objs = list(pred.objects) if pred else []
        gold_objs = list(gold.objects)
        n_pred += len(pred_objs)
        n_gold += len(gold_objs)
        for o in pred_objs:
            if o in gold_objs:
                gold_objs.remove(o)
                tp += 1
    p = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    n = len(results)
    metrics = {
        "n": n,
        "exact_match": exact / n,
        "parse_rate": parsed / n,
        "field_f1": {f: float(np.mean(v)) for f, v in field_f1.items()},
        "object_f1": 2 * p * rec / (p + rec) if p + rec else 0.0,
    }
    if groups is not None:
        metrics["exact_by_group"] = {g: {"right": a, "n": b, "exact": a / b} for g, (a, b) in sorted(by_group.items())}
    return metrics
