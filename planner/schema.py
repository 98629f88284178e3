"""The image plan: planning tokens, the typed `Plan`, its parser, validator and repair.

A plan is a short program the LLM writes between ``<IMG_BEGIN>`` and ``<IMG_END>``::

    <IMG_BEGIN> <STYLE> plain background <LAYOUT> 2 objects, side by side
    <OBJECT> 1 medium red circle at left <OBJECT> 1 medium blue square at right
    <COLOR> red, blue <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>

Fields come in the fixed order of `FIELDS`; ``OBJECT`` may repeat, the others appear at most once.
Every field holds free text. An ``OBJECT`` text may also follow the structured object grammar
(``"<count> [size] [color] [material] <name> [at <pos>, <pos>, ...]"``), read by `ObjectGrammar`
against vocabularies the caller supplies (the toy world supplies its own).

``Plan.parse(p.to_text()) == p`` for every valid plan, and ``Plan.parse(t).to_text() == t`` for every
canonical text (single spaces). Anything else raises `PlanError`, which names the field and the reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from safeio import InputError

IMG_BEGIN = "<IMG_BEGIN>"
IMG_END = "<IMG_END>"
FIELDS: tuple[str, ...] = ("STYLE", "LAYOUT", "OBJECT", "COLOR", "MATERIAL", "LIGHTING", "CAMERA")
FIELD_TAGS: dict[str, str] = {name: f"<{name}>" for name in FIELDS}
TAG_TO_FIELD: dict[str, str] = {tag: name for name, tag in FIELD_TAGS.items()}
PLANNING_TOKENS: tuple[str, ...] = (IMG_BEGIN, *FIELD_TAGS.values(), IMG_END)

_TAG_RE = re.compile(r"(<[A-Z][A-Z_]*>)")
_WS_RE = re.compile(r"\s+")


class PlanError(InputError):
    """A plan that cannot be parsed or does not validate.

    ``field`` is the plan field at fault (``None`` when the fault is the plan as a whole) and
    ``reason`` says what is wrong; ``context`` (e.g. ``"prompt #3"``) says which input it came from.
    """

    def __init__(self, reason: str, field: str | None = None, context: str | None = None):
        self.reason = reason
        self.field = field
        self.context = context
        where = f"field {field} " if field else ""
        ctx = f" in plan for {context}" if context else ""
        super().__init__(f"{where}{reason}{ctx}")

    def with_context(self, context: str) -> PlanError:
        """Return the same error, saying which input (prompt, file line, ...) the plan came from."""
        return PlanError(self.reason, self.field, context)


def count_words(text: str) -> int:
    """Default token counter: whitespace-separated words. `Planner` passes its tokenizer's count."""
    return len(text.split())


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace to single spaces and strip the ends."""
    return _WS_RE.sub(" ", text).strip()


@dataclass(frozen=True)
class PlanSpec:
    """What a valid plan must satisfy. The defaults describe plan2img's own plan format."""

    required: tuple[str, ...] = FIELDS  # fields that must be present (OBJECT: at least once)
    max_field_tokens: int = 32  # per field text, counted by `count_tokens`
    max_total_tokens: int = 192  # all field texts together
    max_objects: int = 8  # OBJECT entries
    vocab: Mapping[str, frozenset[str]] | None = None  # allowed texts per field (None: free text)
    object_grammar: ObjectGrammar | None = None  # when set, every OBJECT text must follow it
    defaults: Mapping[str, str] | None = None  # texts `repair` may fill in for missing fields
    # computes missing required fields from the present ones, e.g. LAYOUT and COLOR from the objects
    derive: Callable[[list[tuple[str, str]]], Mapping[str, str]] | None = None
    count_tokens: Callable[[str], int] = count_words

    def __post_init__(self) -> None:
        unknown = [f for f in self.required if f not in FIELDS]
        if unknown:
            raise ValueError(f"PlanSpec.required names unknown fields {unknown}; known: {list(FIELDS)}")
        if self.max_field_tokens < 1 or self.max_total_tokens < 1 or self.max_objects < 1:
            raise ValueError("PlanSpec limits must be positive")


@dataclass(frozen=True)
class PlanObject:
    """One structured OBJECT entry: ``count`` instances of ``name`` with optional attributes."""

    name: str
    count: int = 1
    size: str | None = None
    color: str | None = None
    material: str | None = None
    positions: tuple[str, ...] = ()  # one region per instance, or empty when unplaced

    def to_text(self) -> str:
        words = [str(self.count), self.size, self.color, self.material, self.name]
        text = " ".join(w for w in words if w)
        if self.positions:
            text += " at " + ", ".join(self.positions)
        return text


@dataclass(frozen=True)
class ObjectGrammar:
    """Vocabularies that make OBJECT texts structured: ``<count> [size] [color] [material] <name> [at ...]``.

    Attribute words must be unique across ``sizes``, ``colors`` and ``materials`` so that each word
    says which slot it fills.
    """

    names: frozenset[str]
    colors: frozenset[str] = frozenset()
    sizes: frozenset[str] = frozenset()
    materials: frozenset[str] = frozenset()
    positions: frozenset[str] = frozenset()
    max_count: int = 4

    def __post_init__(self) -> None:
        slots = [self.sizes, self.colors, self.materials]
        for i, a in enumerate(slots):
            for b in slots[i + 1 :]:
                if a & b:
                    raise ValueError(f"ObjectGrammar attribute words must be unique across slots: {sorted(a & b)}")

    def parse(self, text: str) -> PlanObject:
        """Read one OBJECT text; raises `PlanError` (field OBJECT) naming what does not fit."""
        text = normalize_text(text)
        head, sep, tail = text.partition(" at ")
        words = head.split()
        if len(words) < 2:
            raise PlanError(f"'{text}' is not '<count> [size] [color] [material] <name>'", "OBJECT")
        if not words[0].isdigit():
            raise PlanError(f"'{text}' must start with a count, got '{words[0]}'", "OBJECT")
        count = int(words[0])
        if not 1 <= count <= self.max_count:
            raise PlanError(f"'{text}' has count {count} (allowed 1..{self.max_count})", "OBJECT")
        rest = words[1:]
        name = None
        for n in range(len(rest), 0, -1):  # the longest trailing run of words that is a known name
            candidate = " ".join(rest[-n:])
            if candidate in self.names:
                name, rest = candidate, rest[:-n]
                break
        if name is None:
            raise PlanError(f"'{text}' names no known object (known: {sorted(self.names)})", "OBJECT")
        attrs: dict[str, str] = {}
        order = [("size", self.sizes), ("color", self.colors), ("material", self.materials)]
        slot = 0
        for word in rest:
            while slot < len(order) and word not in order[slot][1]:
                slot += 1
            if slot == len(order):
                raise PlanError(f"'{text}': '{word}' is not a size, color or material in that order", "OBJECT")
            attrs[order[slot][0]] = word
            slot += 1
        positions: tuple[str, ...] = ()
        if sep:
            positions = tuple(p.strip() for p in tail.split(","))
            bad = [p for p in positions if p not in self.positions]
            if bad:
                raise PlanError(f"'{text}' has unknown positions {bad} (known: {sorted(self.positions)})", "OBJECT")
            if len(positions) != count:
                raise PlanError(f"'{text}' places {len(positions)} instances but counts {count}", "OBJECT")
        return PlanObject(name=name, count=count, positions=positions, **attrs)


@dataclass(frozen=True)
class Plan:
    """A parsed image plan. ``objects`` holds the OBJECT texts in order; other fields are optional."""

    objects: tuple[str, ...]
    style: str | None = None
    layout: str | None = None
    color: str | None = None
    material: str | None = None
    lighting: str | None = None
    camera: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_fields(cls, fields: Iterable[tuple[str, str]]) -> Plan:
        """Build from ``(FIELD, text)`` pairs in plan order (OBJECT may repeat)."""
        values: dict[str, str] = {}
        objects: list[str] = []
        for name, text in fields:
            if name == "OBJECT":
                objects.append(text)
            else:
                values[name.lower()] = text
        return cls(objects=tuple(objects), **values)

    @classmethod
    def from_objects(cls, objects: Iterable[PlanObject], **fields: str | None) -> Plan:
        """Build from structured objects plus the other field texts (``style=...``, ``camera=...``)."""
        return cls(objects=tuple(o.to_text() for o in objects), **fields)

    # ------------------------------------------------------------------ views
    def fields(self) -> list[tuple[str, str]]:
        """The ``(FIELD, text)`` pairs in plan order, skipping absent fields."""
        out: list[tuple[str, str]] = []
        for name in FIELDS:
            if name == "OBJECT":
                out.extend(("OBJECT", t) for t in self.objects)
            else:
                value = getattr(self, name.lower())
                if value is not None:
                    out.append((name, value))
        return out

    def get(self, field_name: str) -> str | None:
        """Text of a single-valued field (``"STYLE"``), or the OBJECT texts joined by ``"; "``."""
        if field_name == "OBJECT":
            return "; ".join(self.objects) if self.objects else None
        if field_name not in FIELDS:
            raise KeyError(f"unknown plan field {field_name!r}; known: {list(FIELDS)}")
        return getattr(self, field_name.lower())

    def to_text(self) -> str:
        """The canonical plan text, planning tokens included."""
        parts = [IMG_BEGIN]
        for name, text in self.fields():
            parts.extend([FIELD_TAGS[name], text])
        parts.append(IMG_END)
        return " ".join(parts)

    def structured_objects(self, grammar: ObjectGrammar) -> list[PlanObject]:
        """Read every OBJECT text with ``grammar``; raises `PlanError` if one is free text."""
        return [grammar.parse(t) for t in self.objects]

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, text: str, spec: PlanSpec | None = None) -> Plan:
        """Parse a plan text (the ``<IMG_BEGIN> ... <IMG_END>`` span, surrounding whitespace allowed).

        Field texts are whitespace-normalised. Validates against ``spec`` (default `PlanSpec()`).
        Raises `PlanError` for anything else, never another exception type.
        """
        if not isinstance(text, str):
            raise PlanError(f"plan must be a str, got {type(text).__name__}")
        pieces = [p for p in _TAG_RE.split(text)]
        # pieces alternate: text, tag, text, tag, ..., text
        if normalize_text(pieces[0]):
            raise PlanError(f"text before {IMG_BEGIN}: '{normalize_text(pieces[0])[:40]}'")
        if len(pieces) < 3 or pieces[1] != IMG_BEGIN:
            raise PlanError(f"plan must start with {IMG_BEGIN}")
        fields: list[tuple[str, str]] = []
        ended = False
        last_index = -1
        for i in range(1, len(pieces), 2):
            tag, body = pieces[i], normalize_text(pieces[i + 1])
            if ended:
                raise PlanError(f"text after {IMG_END}: '{(tag + ' ' + body)[:40]}'")
            if i == 1:
                if body:
                    raise PlanError(f"text between {IMG_BEGIN} and the first field: '{body[:40]}'")
                continue
            if tag == IMG_END:
                if body:
                    raise PlanError(f"text after {IMG_END}: '{body[:40]}'")
                ended = True
                continue
            if tag == IMG_BEGIN:
                raise PlanError(f"{IMG_BEGIN} appears twice")
            name = TAG_TO_FIELD.get(tag)
            if name is None:
                raise PlanError(f"unknown tag {tag}; known: {' '.join(PLANNING_TOKENS)}")
            if not body:
                raise PlanError("is empty", name)
            index = FIELDS.index(name)
            if index < last_index or (index == last_index and name != "OBJECT"):
                what = "repeats" if index == last_index else f"comes after {FIELDS[last_index]}"
                raise PlanError(f"{what} (order is {' '.join(FIELDS)}; only OBJECT repeats)", name)
            last_index = index
            fields.append((name, body))
        if not ended:
            raise PlanError(f"plan must end with {IMG_END}")
        plan = cls.from_fields(fields)
        plan.validate(spec)
        return plan

    # ------------------------------------------------------------------ validation
    def validate(self, spec: PlanSpec | None = None) -> Plan:
        """Check required fields, token limits, vocabulary and object grammar; returns ``self``."""
        spec = spec or PlanSpec()
        for name in spec.required:
            if name == "OBJECT":
                if not self.objects:
                    raise PlanError("is required (at least one OBJECT)", "OBJECT")
            elif getattr(self, name.lower()) is None:
                raise PlanError("is required but missing", name)
        if len(self.objects) > spec.max_objects:
            raise PlanError(f"appears {len(self.objects)} times (max {spec.max_objects})", "OBJECT")
        total = 0
        for name, text in self.fields():
            if not isinstance(text, str) or not text or text != normalize_text(text):
                raise PlanError(f"text {text!r} must be non-empty with single spaces", name)
            if _TAG_RE.search(text):
                raise PlanError(f"text '{text[:40]}' contains a tag", name)
            n = spec.count_tokens(text)
            if n > spec.max_field_tokens:
                raise PlanError(f"has {n} tokens (max {spec.max_field_tokens})", name)
            total += n
            if spec.vocab is not None and name in spec.vocab and text not in spec.vocab[name]:
                raise PlanError(f"'{text[:40]}' is not in the vocabulary ({sorted(spec.vocab[name])[:8]} ...)", name)
        if total > spec.max_total_tokens:
            raise PlanError(f"has {total} tokens in all (max {spec.max_total_tokens})")
        if spec.object_grammar is not None:
            self.structured_objects(spec.object_grammar)
        return self

    def is_valid(self, spec: PlanSpec | None = None) -> bool:
        try:
            self.validate(spec)
        except PlanError:
            return False
        return True


@dataclass
class RepairResult:
    """What `repair_plan` made of a text: the plan and the list of fixes it applied (empty: none needed)."""

    plan: Plan
    fixes: list[str] = field(default_factory=list)


def repair_plan(text: str, spec: PlanSpec | None = None) -> RepairResult:
    """Rewrite a damaged plan text into a valid `Plan`, listing each fix; `PlanError` if it cannot.

    Fixes: text around the plan is dropped, a missing ``<IMG_BEGIN>``/``<IMG_END>`` is supplied, unknown
    tags and empty fields are removed, fields are put in order (the first of a repeated single field is
    kept), over-long fields are cut to the token limit, out-of-vocabulary texts are replaced by the
    closest vocabulary entry, missing required fields are derived (``spec.derive``) or filled from
    ``spec.defaults``, and surplus
    OBJECT entries are dropped. OBJECT texts that break ``spec.object_grammar`` cannot be repaired.
    """
    spec = spec or PlanSpec()
    if not isinstance(text, str):
        raise PlanError(f"plan must be a str, got {type(text).__name__}")
    try:
        return RepairResult(Plan.parse(text, spec))
    except PlanError:
        pass
    fixes: list[str] = []
    found = _tagged_fields(_between_markers(text, fixes), fixes)
    kept = _fill_required(_repaired_fields(found, spec, fixes), spec, fixes)
    kept.sort(key=lambda nb: FIELDS.index(nb[0]))
    plan = Plan.from_fields(kept)
    plan.validate(spec)  # anything still wrong (object grammar, total length) is not repairable
    return RepairResult(plan, fixes)


def _between_markers(text: str, fixes: list[str]) -> str:
    """The text between ``<IMG_BEGIN>`` and ``<IMG_END>`` (either supplied when missing; text outside dropped)."""
    start, end = text.find(IMG_BEGIN), text.find(IMG_END)
    if start < 0:
        fixes.append(f"added missing {IMG_BEGIN}")
        start = 0
    else:
        if normalize_text(text[:start]):
            fixes.append(f"dropped text before {IMG_BEGIN}")
        start += len(IMG_BEGIN)
    if end < 0 or end < start:
        fixes.append(f"added missing {IMG_END}")
        end = len(text)
    elif normalize_text(text[end + len(IMG_END) :]):
        fixes.append(f"dropped text after {IMG_END}")
    return text[start:end]


def _tagged_fields(inner: str, fixes: list[str]) -> list[tuple[str, str]]:
    """(field, text) pairs in the order written; unknown tags, empty fields and leading text dropped."""
    pieces = _TAG_RE.split(inner)
    if normalize_text(pieces[0]):
        fixes.append("dropped text before the first field")
    found: list[tuple[str, str]] = []
    for i in range(1, len(pieces), 2):
        tag, body = pieces[i], normalize_text(pieces[i + 1])
        name = TAG_TO_FIELD.get(tag)
        if name is None:
            fixes.append(f"removed unknown tag {tag}")
        elif not body:
            fixes.append(f"removed empty {name}")
        else:
            found.append((name, body))
    return found


def _repaired_fields(found: list[tuple[str, str]], spec: PlanSpec, fixes: list[str]) -> list[tuple[str, str]]:
    """Fields in order, repeats and surplus OBJECTs dropped, each cut to the token limit and held to the
    vocabulary (closest entry, else the default)."""
    ordered = sorted(found, key=lambda nb: FIELDS.index(nb[0]))  # stable: OBJECTs keep their order
    if [n for n, _ in ordered] != [n for n, _ in found]:
        fixes.append("put fields in order")
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, body in ordered:
        if name != "OBJECT" and name in seen:
            fixes.append(f"dropped repeated {name}")
            continue
        seen.add(name)
        if name == "OBJECT" and sum(1 for n, _ in kept if n == "OBJECT") >= spec.max_objects:
            fixes.append(f"dropped OBJECT beyond {spec.max_objects}")
            continue
        body = _in_vocabulary(name, _cut_to_limit(name, body, spec, fixes), spec, fixes)
        if body:
            kept.append((name, body))
    return kept


def _cut_to_limit(name: str, body: str, spec: PlanSpec, fixes: list[str]) -> str:
    if spec.count_tokens(body) <= spec.max_field_tokens:
        return body
    words = body.split()
    while words and spec.count_tokens(" ".join(words)) > spec.max_field_tokens:
        words.pop()
    fixes.append(f"cut {name} to {spec.max_field_tokens} tokens")
    return " ".join(words)


def _in_vocabulary(name: str, body: str, spec: PlanSpec, fixes: list[str]) -> str:
    if spec.vocab is None or name not in spec.vocab or body in spec.vocab[name]:
        return body
    match = difflib.get_close_matches(body, sorted(spec.vocab[name]), n=1, cutoff=0.5)
    if match:
        fixes.append(f"replaced {name} '{body}' by '{match[0]}'")
        return match[0]
    if spec.defaults and name in spec.defaults:
        fixes.append(f"replaced unknown {name} '{body}' by default '{spec.defaults[name]}'")
        return spec.defaults[name]
    raise PlanError(f"'{body[:40]}' is not in the vocabulary and has no close match", name)


def _fill_required(kept: list[tuple[str, str]], spec: PlanSpec, fixes: list[str]) -> list[tuple[str, str]]:
    """Missing required fields derived from the others (``spec.derive``) or filled from ``spec.defaults``."""
    present = {n for n, _ in kept}
    if "OBJECT" in spec.required and "OBJECT" not in present:
        raise PlanError("is required (at least one OBJECT); an object cannot be made up", "OBJECT")
    derived: Mapping[str, str] = {}
    if spec.derive is not None and any(n not in present for n in spec.required):
        try:
            derived = spec.derive(kept)
        except PlanError:
            derived = {}
    for name in spec.required:
        if name in present:
            continue
        if name in derived:
            kept.append((name, derived[name]))
            fixes.append(f"derived missing {name} '{derived[name]}' from the other fields")
        elif spec.defaults and name in spec.defaults:
            kept.append((name, spec.defaults[name]))
            fixes.append(f"filled missing {name} with default '{spec.defaults[name]}'")
        else:
            raise PlanError("is required, missing, and has no default to fill in", name)
    return kept


def replace_fields(plan: Plan, **changes: str | tuple[str, ...] | None) -> Plan:
    """Return a copy of ``plan`` with some fields changed (``objects=(...)`` for OBJECT)."""
    return dataclasses.replace(plan, **changes)
