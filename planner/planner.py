"""`Planner`: any local Hugging Face causal LM that writes image plans.

    planner = Planner.from_pretrained("path/to/llm", load_in_8bit=False)
    results = planner.plan(["two blue squares above a red star"])
    results[0].plan.to_text()

Generation is batched (left padding, KV cache), greedy or sampled with an explicit ``torch.Generator``.
With ``constrained=True`` a `PlanConstraint` keeps the output parseable under the planner's `PlanSpec`;
without it, output that does not parse is repaired (each fix listed) or reported as an error, never
passed on silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from planner.constrained import PlanConstraint, check_spelling, token_text_table
from planner.schema import FIELDS, IMG_BEGIN, IMG_END, Plan, PlanError, PlanSpec, repair_plan
from planner.tokens import add_planning_tokens, format_prompt, resize_with_mean_init
from safeio import InputError, atomic_dir

MAX_PROMPT_CHARS = 4000  # longer prompts are an error: a plan request is a sentence, not a document
MAX_PROMPT_TOKENS = 256  # prompts are truncated to this many tokens (documented; reported in warnings)


class PlannerLoadError(InputError):
    """A planner folder that cannot be loaded; names the path."""


@dataclass
class PlanResult:
    """What the planner made of one prompt."""

    prompt: str
    plan: Plan | None  # None only when unconstrained output could not be repaired (see error)
    text: str  # the raw plan text the model produced (from <IMG_BEGIN>)
    token_ids: list[int]  # generated token ids (after the prompt)
    stop_reason: str  # "end" (<IMG_END>), "forced" (budget forced the shortest completion), "eos", "length"
    fixes: list[str] = field(default_factory=list)  # repairs applied to unconstrained output
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def check_prompts(prompts: list[str] | str) -> list[str]:
    """Normalise prompts; `InputError` naming the prompt for empty, non-string or over-long ones."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise InputError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompt #{i} is a {type(p).__name__}, not a str")
        text = " ".join(p.split())
        if not text:
            raise InputError(f"prompt #{i} is empty or whitespace only")
        if len(text) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt #{i} has {len(text)} characters (max {MAX_PROMPT_CHARS}); shorten it")
        out.append(text)
    return out


class Planner:
    def __init__(self, model, tokenizer, spec: PlanSpec | None = None, few_shot: bool = False):
        self.model = model.eval()
        self.few_shot = few_shot  # worked examples before each request: for instruct LMs without planner training
        self.tokenizer = tokenizer
        missing = [t for t in (IMG_BEGIN, IMG_END) if t not in tokenizer.get_vocab()]
        if missing:
            add_planning_tokens(tokenizer, model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.plan_spec = spec or PlanSpec()  # limits in words: what a plan given by a user must satisfy
        self.spec = dataclasses.replace(self.plan_spec, count_tokens=self.count_tokens)  # in LLM tokens: decoding
        self._token_texts: list[str] | None = None
        self._spelling_checked = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        spec: PlanSpec | None = None,
        trust_remote_code: bool = False,
        adapter: str | Path | Sequence[str | Path] | None = None,
        few_shot: bool = False,
    ) -> Planner:
        """Load any local causal LM (``local_files_only``; remote code only if asked), optionally 8/4-bit.

        ``adapter``: a peft LoRA adapter folder (``adapter_config.json`` + safetensors) trained on this LM,
        merged into the weights after loading (e.g. the toy planner's widened-grammar adapter); a tokenizer saved in
        the adapter folder (planning tokens the LM lacked) replaces the LM's. A list of adapters is merged in order
        (e.g. the widened-grammar adapter, then the reviser's, trained on the merged writer). ``few_shot``: worked
        example plans before each request (`planner.tokens.FEW_SHOT_EXAMPLES`), for an instruct LM used without
        training.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise PlannerLoadError(f"planner folder {path} does not exist")
        if load_in_8bit and load_in_4bit:
            raise ValueError("choose one of load_in_8bit and load_in_4bit")
        kwargs: dict = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        if load_in_8bit or load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
            if device is not None:
                kwargs["device_map"] = {"": str(device)}
        if not (load_in_8bit or load_in_4bit):
            kwargs["dtype"] = dtype or torch.float32  # shipped weights may be fp16; compute in fp32 unless asked
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code
            )
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, ImportError) as err:
            raise PlannerLoadError(f"could not load a causal LM from {path}: {err}") from None
        adapters = [] if adapter is None else [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
        for one in adapters:
            if (Path(one) / "tokenizer_config.json").is_file():  # saved with its planning tokens
                tokenizer = AutoTokenizer.from_pretrained(str(one), local_files_only=True)
                resize_with_mean_init(model, len(tokenizer))  # rows the adapter's trainable tokens overwrite
            model = _merge_adapter(model, Path(one))
        if device is not None and not (load_in_8bit or load_in_4bit):
            model = model.to(device)
        return cls(model, tokenizer, spec, few_shot)

    def save_pretrained(self, path: str | Path) -> Path:
        """Save model (safetensors) and tokenizer atomically."""
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp))
        return Path(path)

    # ------------------------------------------------------------------ helpers
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Planner:
        """Move the LLM to ``device`` and return self. An 8/4-bit LLM stays where it was loaded (bitsandbytes
        weights cannot be moved: pass ``device`` to `from_pretrained` instead)."""
        if not getattr(self.model, "is_quantized", False) and getattr(self.model, "hf_quantizer", None) is None:
            self.model.to(device)
        return self

    def default_max_new_tokens(self) -> int:
        """Enough for the longest plan the spec allows: every field at its limit, plus tags."""
        n_fields = len(FIELDS) - 1 + self.spec.max_objects
        return min(self.spec.max_total_tokens, n_fields * self.spec.max_field_tokens) + n_fields + 2

    def token_texts(self) -> list[str]:
        if self._token_texts is None:
            self._token_texts = token_text_table(self.tokenizer)
        return self._token_texts

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, list[list[str]]]:
        """Tokenise prompt + ``<IMG_BEGIN>`` (left-padded); over-long prompts are cut to MAX_PROMPT_TOKENS."""
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        notes: list[list[str]] = []
        texts = []
        for p in prompts:
            ids = self.tokenizer(p, add_special_tokens=False).input_ids
            if len(ids) > MAX_PROMPT_TOKENS:
                p = self.tokenizer.decode(ids[:MAX_PROMPT_TOKENS])
                notes.append([f"prompt truncated from {len(ids)} to {MAX_PROMPT_TOKENS} tokens"])
            else:
                notes.append([])
            texts.append(format_prompt(self.tokenizer, p, self.few_shot) + " " + IMG_BEGIN)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        return enc, notes

    # ------------------------------------------------------------------ planning
    @torch.no_grad()
    def plan(
        self,
        prompts: list[str] | str,
        *,
        max_new_tokens: int | None = None,
        constrained: bool = True,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        batch_size: int = 16,
        repair: bool = True,
    ) -> list[PlanResult]:
        """Write a plan for each prompt. See the module docstring for what ``constrained`` and ``repair`` do."""
        prompts = check_prompts(prompts)
        max_new = max_new_tokens or self.default_max_new_tokens()
        results: list[PlanResult] = []
        for start in range(0, len(prompts), batch_size):
            results += self._plan_batch(
                prompts[start : start + batch_size],
                start,
                max_new,
                constrained,
                do_sample,
                temperature,
                generator,
                repair,
            )
        return results

    def _plan_batch(self, prompts, offset, max_new, constrained, do_sample, temperature, generator, repair):
        enc, notes = self.encode_prompts(prompts)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        length = enc["input_ids"].shape[1]
        processors = []
        constraint = None
        if constrained:
            if not self._spelling_checked:
                check_spelling(self.tokenizer, self.spec)
                self._spelling_checked = True
            constraint = PlanConstraint(self.tokenizer, self.spec, length, max_new, self.token_texts())
            processors.append(constraint)
        from transformers import LogitsProcessorList

        gen_kwargs = dict(
            max_new_tokens=max_new,
            do_sample=do_sample,
            logits_processor=LogitsProcessorList(processors),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
        )
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        else:
            gen_kwargs.update(temperature=None, top_k=None, top_p=None)
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            out = self.model.generate(**enc, **gen_kwargs)
        results = []
        for b, prompt in enumerate(prompts):
            ids = out[b, length:].tolist()
            results.append(self._finish(prompt, ids, offset + b, constraint, b, repair, notes[b]))
        return results

    def _finish(self, prompt, ids, index, constraint, row, repair, notes) -> PlanResult:
        return finish_plan(self.tokenizer, self.spec, prompt, ids, f"prompt #{index}", constraint, row, repair, notes)


def finish_plan(tokenizer, spec: PlanSpec, prompt: str, ids: list[int], where: str, constraint=None, row: int = 0,
                repair: bool = True, notes: list[str] | None = None) -> PlanResult:  # fmt: skip
    """The `PlanResult` of generated token ids (after ``<IMG_BEGIN>``): parsed, repaired if asked, and why it
    stopped; ``where`` names the input in errors (e.g. ``prompt #3``)."""
    end_id = tokenizer.convert_tokens_to_ids(IMG_END)
    eos = tokenizer.eos_token_id
    if end_id in ids:
        body = ids[: ids.index(end_id) + 1]
        reason = "forced" if constraint is not None and row in constraint.forced else "end"
    else:
        body = [i for i in ids if i not in (eos, tokenizer.pad_token_id)]
        reason = "eos" if eos in ids else "length"
    text = IMG_BEGIN + " " + tokenizer.decode(body, skip_special_tokens=False)
    result = PlanResult(prompt, None, text, ids, reason, warnings=list(notes or []))
    try:
        result.plan = Plan.parse(text, spec)
    except PlanError as err:
        err = err.with_context(where)
        if repair:
            try:
                fixed = repair_plan(text, spec)
                result.plan, result.fixes = fixed.plan, fixed.fixes
            except PlanError as err2:
                result.error = str(err2.with_context(where))
        else:
            result.error = str(err)
    return result


def is_adapter_dir(path: str | Path) -> bool:
    """Is ``path`` a peft adapter folder (rather than a full model folder)?"""
    return (Path(path) / "adapter_config.json").is_file()


def load_planner(path: str | Path, *, base: str | Path | None = None, **kwargs) -> Planner:
    """A planner from ``path``: a full planner folder, or a peft LoRA adapter folder merged over ``base`` (the LM it
    was trained on). ``kwargs`` go to `Planner.from_pretrained`. An adapter folder without ``base`` is a
    `PlannerLoadError` naming the folder."""
    if is_adapter_dir(path):
        if base is None:
            raise PlannerLoadError(f"{path} is a LoRA adapter folder: give the planner it was trained on as base")
        return Planner.from_pretrained(base, adapter=path, **kwargs)
    return Planner.from_pretrained(path, **kwargs)


def _merge_adapter(model, adapter: Path):
    from peft import PeftModel

    if not is_adapter_dir(adapter):
        raise PlannerLoadError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    try:
        merged = PeftModel.from_pretrained(model, str(adapter), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise PlannerLoadError(f"could not load the LoRA adapter {adapter}: {err}") from None
    return merged.merge_and_unload()
