"""The critic: a local image-text-to-text model reads an image as a plan, and `critique` compares that reading
with the plan the image was meant to show.

`PlanReader` wraps any ``AutoModelForImageTextToText`` with its processor (LLaVA, Qwen2-VL, SmolVLM, ... and the
toy critic, a tiny LLaVA). It asks the model to describe the image as a plan and decodes under the planner's
constrained decoding (`planner.constrained.PlanConstraint`), so every reading parses. It never sees the
ShapesEval detector: that stays the judge.

`critique(intended, reading, grammar)` lists what differs, object by object and field by field (a missing or
extra object, count, color, size, material, position; style, lighting, camera), scores the agreement in [0, 1]
and says it in words for an LLM (`Critique.text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList

from planner.constrained import PlanConstraint, token_text_table
from planner.planner import PlannerLoadError, PlanResult, finish_plan
from planner.schema import IMG_BEGIN, ObjectGrammar, Plan, PlanError, PlanObject, PlanSpec
from planner.tokens import add_planning_tokens

INSTRUCTION = "Describe this image as a plan."
SCENE_FIELDS = ("STYLE", "LIGHTING", "CAMERA")  # the single-valued fields a critique compares
OBJECT_CHECKS = ("count", "color", "size", "material", "position")


class CriticError(RuntimeError):
    """The critic could not read an image (it raised, or returned no usable plan); names the image."""


class PlanReader:
    """An image-text-to-text model that reads images as plans. ``prompt`` overrides the text before
    ``<IMG_BEGIN>`` (default: the processor's chat template with the image and `INSTRUCTION`, or
    ``"<image> INSTRUCTION"`` for a model without one)."""

    def __init__(self, model, processor, spec: PlanSpec | None = None, prompt: str | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.spec = spec or PlanSpec()
        missing = [t for t in (IMG_BEGIN,) if t not in self.tokenizer.get_vocab()]
        if missing:
            raise PlannerLoadError(f"the critic's tokenizer lacks the planning tokens {missing}")
        self._prompt = prompt
        self._token_texts: list[str] | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, spec: PlanSpec | None = None, device=None,
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> PlanReader:  # fmt: skip
        """Load a local image-text-to-text model and its processor (local files only); planning tokens it
        lacks are added (mean-initialised rows: such a model reads plans only after fine-tuning, or through the
        constrained decoding alone)."""
        path = Path(path)
        if not path.is_dir():
            raise PlannerLoadError(f"critic folder {path} does not exist")
        try:
            processor = AutoProcessor.from_pretrained(str(path), local_files_only=True,
                                                      trust_remote_code=trust_remote_code)  # fmt: skip
            model = AutoModelForImageTextToText.from_pretrained(
                str(path), local_files_only=True, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, ImportError) as err:
            raise PlannerLoadError(f"could not load an image-text-to-text model from {path}: {err}") from None
        add_planning_tokens(processor.tokenizer, model)
        if device is not None:
            model.to(device)
        return cls(model.eval(), processor, spec)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self) -> str:
        """The text the model reads before writing the plan (ends with ``<IMG_BEGIN>``)."""
        if self._prompt is not None:
            return self._prompt + " " + IMG_BEGIN
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return text + IMG_BEGIN
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"{image_token} {INSTRUCTION} {IMG_BEGIN}"

    def token_texts(self) -> list[str]:
        if self._token_texts is None:
            self._token_texts = token_text_table(self.tokenizer)
        return self._token_texts

    @torch.no_grad()
    def read(self, images: np.ndarray, *, batch_size: int = 16, max_new_tokens: int = 96) -> list[PlanResult]:
        """The plan each image shows (constrained: every result parses). ``images``: (B, H, W, 3) uint8.
        Raises `CriticError` naming the image when the model fails."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"critic input must be (B, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
        out: list[PlanResult] = []
        for start in range(0, len(images), batch_size):
            out += self._read_batch(images[start : start + batch_size], start, max_new_tokens)
        return out

    def _read_batch(self, images: np.ndarray, offset: int, max_new: int) -> list[PlanResult]:
        text = self.prompt()
        enc = self.processor(images=list(images), text=[text] * len(images), return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        length = enc["input_ids"].shape[1]
        constraint = PlanConstraint(self.tokenizer, self.spec, length, max_new, self.token_texts())
        try:
            ids = self.model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                logits_processor=LogitsProcessorList([constraint]),
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                temperature=None,
                top_k=None,
                top_p=None,
            )
        except (RuntimeError, ValueError) as err:
            raise CriticError(f"the critic failed on images #{offset}..#{offset + len(images) - 1}: {err}") from err
        results = []
        for b in range(len(images)):
            gen = ids[b, length:].tolist()
            result = finish_plan(self.tokenizer, self.spec, "", gen, f"image #{offset + b}", constraint, b)
            if result.plan is None:
                raise CriticError(f"the critic's reading of image #{offset + b} is not a plan: {result.error}")
            results.append(result)
        return results


# ---------------------------------------------------------------------------------------------- critique
@dataclass(frozen=True)
class Finding:
    """One disagreement between the intended plan and the reading.

    ``kind``: ``missing`` / ``extra`` (an object), ``count`` / ``color`` / ``size`` / ``material`` / ``position``
    (an attribute of an object), or a scene field (``style`` / ``lighting`` / ``camera``). ``object`` is the
    index of the intended OBJECT entry (for ``extra``: of the read entry), None for scene fields."""

    kind: str
    object: int | None
    expected: str | None
    found: str | None

    def text(self, intended: list[PlanObject] | None = None) -> str:
        if self.kind == "missing":
            return f"missing: {self.expected}"
        if self.kind == "extra":
            return f"extra object: {self.found}"
        where = ""
        if self.object is not None and intended:
            where = f"object {self.object + 1} ({intended[self.object].name}) "
        return f"{where}{self.kind}: {self.found or 'none'} instead of {self.expected or 'none'}"


@dataclass
class Critique:
    """What the critic found: ``findings`` (empty: the image shows the plan), ``score`` in [0, 1] (the share of
    ``checks`` that agree: a missing object fails its presence and every attribute check, an extra object adds
    one failed check), and the reading it was based on."""

    intended: Plan
    reading: Plan
    findings: list[Finding] = field(default_factory=list)
    checks: int = 0
    failed: int = 0
    objects: list[PlanObject] | None = None  # the intended objects, structured (None: free-text objects)

    @property
    def score(self) -> float:
        return 1.0 if self.checks == 0 else max(0.0, 1.0 - self.failed / self.checks)

    @property
    def ok(self) -> bool:
        return not self.findings

    def failing_objects(self) -> list[int]:
        """Indices of intended OBJECT entries with a finding."""
        return sorted({f.object for f in self.findings if f.object is not None and f.kind != "extra"})

    @property
    def text(self) -> str:
        """The critique in words (what an LLM reads): one clause per finding, or that the image matches."""
        if self.ok:
            return "The image matches the plan."
        clauses = [f.text(self.objects) for f in self.findings]
        return f"Score {self.score:.2f}. " + "; ".join(clauses) + "."

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "text": self.text,
            "reading": self.reading.to_text(),
            "findings": [f.__dict__ for f in self.findings],
        }


def critique(intended: Plan, reading: Plan, grammar: ObjectGrammar | None = None) -> Critique:
    """Compare a reading with the intended plan. With ``grammar`` (structured OBJECT texts) objects are matched by
    name and compared attribute by attribute; without one, OBJECT texts are compared whole."""
    findings: list[Finding] = []
    checks = failed = 0
    for name in SCENE_FIELDS:
        want, got = intended.get(name), reading.get(name)
        if want is not None:
            checks += 1
            if got != want:
                findings.append(Finding(name.lower(), None, want, got))
                failed += 1
    objects = None
    if grammar is not None:
        try:
            objects = intended.structured_objects(grammar)
            read = reading.structured_objects(grammar)
        except PlanError:
            objects = None
    if objects is None:
        want, got = list(intended.objects), list(reading.objects)
        for i, text in enumerate(want):
            checks += 1
            if text in got:
                got.remove(text)
            else:
                findings.append(Finding("missing", i, text, None))
                failed += 1
        findings += [Finding("extra", None, None, text) for text in got]
        return Critique(intended, reading, findings, checks + len(got), failed + len(got))
    obj_findings, obj_checks, obj_failed = _compare_objects(objects, read)
    return Critique(intended, reading, findings + obj_findings, checks + obj_checks, failed + obj_failed, objects)


def says_the_same(intended: Plan, plan: Plan | None, grammar: ObjectGrammar | None = None) -> bool:
    """Whether ``plan`` (None: no plan) says what ``intended`` says: `critique` finds nothing."""
    return plan is not None and critique(intended, plan, grammar).ok


def _compare_objects(want: list[PlanObject], got: list[PlanObject]) -> tuple[list[Finding], int, int]:
    """Greedy matching: each intended object takes the unmatched read object of its name that agrees on most
    attributes; what stays unmatched is missing or extra. Returns (findings, checks, failed checks)."""
    findings, checks, failed = [], 0, 0
    free = list(range(len(got)))
    for i, w in enumerate(want):
        n_attr = sum(_specified(w, k) for k in OBJECT_CHECKS)
        checks += 1 + n_attr
        candidates = [j for j in free if got[j].name == w.name]
        if not candidates:
            findings.append(Finding("missing", i, w.to_text(), None))
            failed += 1 + n_attr  # a missing object fails its presence and every attribute check
            continue
        j = max(candidates, key=lambda j: sum(_agrees(w, got[j], k) for k in OBJECT_CHECKS))
        free.remove(j)
        for k in OBJECT_CHECKS:
            if _specified(w, k) and not _agrees(w, got[j], k):
                findings.append(Finding(k, i, _value(w, k), _value(got[j], k)))
                failed += 1
    findings += [Finding("extra", j, None, got[j].to_text()) for j in free]
    return findings, checks + len(free), failed + len(free)


def _value(o: PlanObject, key: str) -> str | None:
    if key == "count":
        return str(o.count)
    if key == "position":
        return ", ".join(o.positions) or None
    return getattr(o, key)


def _specified(o: PlanObject, key: str) -> bool:
    return key == "count" or _value(o, key) is not None


def _agrees(want: PlanObject, got: PlanObject, key: str) -> bool:
    if key == "position":
        return sorted(want.positions) == sorted(got.positions)
    return _value(want, key) == _value(got, key)
