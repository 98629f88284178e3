"""Constrained decoding: a `LogitsProcessor` that keeps any causal LM's output a valid plan.

The grammar is checked on *strings*, not on token ids, so it works with any tokenizer: a candidate token is
allowed when the field text it would produce is still a prefix of some valid text of that field (free
text: no ``<``/``>``; a vocabulary field: a prefix of one of its texts; OBJECT with an object grammar: a
prefix of a sentence of that grammar) and it makes progress (adds a character after whitespace
normalisation). A field tag is allowed when the current field is complete and the order (and the required
fields) allow it; ``<IMG_END>`` when every required field is present; EOS only after ``<IMG_END>``.

Budgets are guaranteed: when a field's token limit, the plan's token limit or ``max_new_tokens`` would no
longer leave room for the shortest way to finish the plan, that shortest completion is tokenised and
forced, so even a model with random weights ends with a plan that parses.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from planner.schema import FIELD_TAGS, FIELDS, IMG_BEGIN, IMG_END, ObjectGrammar, PlanError, PlanSpec

_WS = re.compile(r"\s+")


def norm_partial(text: str) -> str:
    """Collapse whitespace, strip the left, keep one trailing space (it says the last word is finished)."""
    return _WS.sub(" ", text.lstrip())


# ----------------------------------------------------------------------------------------------- field grammars
class FreeText:
    """Any text without tag brackets."""

    filler = "none"

    def is_prefix(self, text: str) -> bool:
        return "<" not in text and ">" not in text

    def is_complete(self, text: str) -> bool:
        return bool(text.strip()) and self.is_prefix(text)

    def next_chars(self, text: str) -> set[str] | None:
        return None  # anything

    def shortest_completion(self, text: str) -> str:
        return "" if text.strip() else self.filler


@dataclass
class Choice:
    """One of a fixed set of texts."""

    texts: frozenset[str]

    def is_prefix(self, text: str) -> bool:
        return any(t.startswith(text) for t in self.texts)

    def is_complete(self, text: str) -> bool:
        return text.rstrip() in self.texts and text.rstrip() == text.rstrip(" ")

    def next_chars(self, text: str) -> set[str]:
        return {t[len(text)] for t in self.texts if t.startswith(text) and len(t) > len(text)}

    def shortest_completion(self, text: str) -> str:
        if self.is_complete(text):
            return ""
        options = [t for t in self.texts if t.startswith(text)]
        if not options:
            raise ValueError(f"{text!r} is no prefix of {sorted(self.texts)}")
        return min(options, key=len)[len(text) :]


@dataclass(eq=False)
class ObjectSentence:
    """Sentences of an `ObjectGrammar`: ``<count> [size] [color] [material] <name> [at <pos>, <pos>, ...]``.

    A word-level automaton; states are tuples ``(kind, ...)``. Commas are words of their own.
    """

    grammar: ObjectGrammar
    _names: list[tuple[str, ...]] = field(init=False)
    _positions: list[tuple[str, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self._names = [tuple(n.split()) for n in self.grammar.names]
        self._positions = [tuple(p.split()) for p in self.grammar.positions]

    # states: ("count",) | ("attr", slot, c) | ("name", prefix, c) | ("after", c) | ("pos", k, prefix, c)
    #         | ("sep", k, c) ;  final states: after a full name without 'at', or after the last position
    def _moves(self, state) -> dict[str, list]:
        g = self.grammar
        kind = state[0]
        out: dict[str, list] = {}

        def add(word, nxt):
            out.setdefault(word, []).append(nxt)

        if kind == "count":
            for c in range(1, g.max_count + 1):
                add(str(c), ("attr", 0, c))
        elif kind == "attr":
            _, slot, c = state
            for s, words in enumerate([g.sizes, g.colors, g.materials]):
                if s >= slot:
                    for w in words:
                        add(w, ("attr", s + 1, c))
            for name in self._names:
                add(name[0], ("name", name[:1], c))
        elif kind == "name":
            _, prefix, c = state
            for name in self._names:
                if len(name) > len(prefix) and name[: len(prefix)] == prefix:
                    add(name[len(prefix)], ("name", name[: len(prefix) + 1], c))
            if prefix in self._names and g.positions:
                add("at", ("pos", 0, (), c))
        elif kind == "pos":
            _, k, prefix, c = state
            for pos in self._positions:
                if len(pos) > len(prefix) and pos[: len(prefix)] == prefix:
                    add(pos[len(prefix)], ("pos", k, pos[: len(prefix) + 1], c))
            if prefix in self._positions and k + 1 < c:
                add(",", ("pos", k + 1, (), c))
        return out

    def _final(self, state) -> bool:
        if state[0] == "name":
            return state[1] in self._names
        if state[0] == "pos":
            _, k, prefix, c = state
            return prefix in self._positions and k + 1 == c
        return False

    @staticmethod
    def _words(text: str) -> tuple[list[str], str]:
        """Complete words and the unfinished last word ('' when the text ends with a separator)."""
        spaced = text.replace(",", " , ")
        parts = spaced.split(" ")
        if text.endswith(" ") or text.endswith(","):
            return [p for p in parts if p], ""
        return [p for p in parts[:-1] if p], parts[-1]

    def _states(self, words: Iterable[str]) -> list:
        return self._states_cached(tuple(words))

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - grammars live as long as their planner
    def _states_cached(self, words: tuple[str, ...]) -> list:
        states = [("count",)]
        for w in words:
            states = [nxt for s in states for nxt in self._moves(s).get(w, [])]
            if not states:
                return []
        return states

    def is_prefix(self, text: str) -> bool:
        words, last = self._words(text)
        states = self._states(words)
        if not states:
            return False
        if not last:
            return True
        return any(w.startswith(last) for s in states for w in self._moves(s))

    def is_complete(self, text: str) -> bool:
        if text != text.rstrip() and text.endswith(","):
            return False
        words, last = self._words(text.rstrip())
        return any(self._final(s) for s in self._states([*words, last] if last else words))

    def next_chars(self, text: str) -> set[str] | None:
        return None

    def shortest_completion(self, text: str) -> str:
        words, last = self._words(text)
        states = self._states(words)
        if last:  # finish the current word first
            options = sorted({w for s in states for w in self._moves(s) if w.startswith(last)}, key=len)
            best = None
            for w in options:
                rest = self._bfs(self._states([*words, w]))
                if rest is not None and (best is None or len(w) + len(" ".join(rest)) < best[0]):
                    best = (len(w) + len(" ".join(rest)), w, rest)
            if best is None:
                raise ValueError(f"{text!r} cannot be completed")
            return best[1][len(last) :] + _join(best[2], leading=True)
        rest = self._bfs(states)
        if rest is None:
            raise ValueError(f"{text!r} cannot be completed")
        return _join(rest, leading=bool(text) and not text.endswith(" "))

    def _bfs(self, states: list) -> list[str] | None:
        frontier = [(s, []) for s in states]
        seen = set()
        while frontier:
            nxt = []
            for s, path in frontier:
                if self._final(s):
                    return path
                for w, targets in sorted(self._moves(s).items(), key=lambda kv: len(kv[0])):
                    for t in targets:
                        if t not in seen:
                            seen.add(t)
                            nxt.append((t, [*path, w]))
            frontier = nxt
        return None


def _join(words: list[str], leading: bool) -> str:
    out = ""
    for i, w in enumerate(words):
        if w == ",":
            out += ","
        else:
            out += (" " if (i > 0 or leading) else "") + w
    return out


def field_grammars(spec: PlanSpec) -> dict[str, FreeText | Choice | ObjectSentence]:
    """The string grammar of each field under ``spec``."""
    out: dict[str, FreeText | Choice | ObjectSentence] = {}
    for name in FIELDS:
        if spec.vocab is not None and name in spec.vocab:
            out[name] = Choice(frozenset(spec.vocab[name]))
        elif name == "OBJECT" and spec.object_grammar is not None:
            out[name] = ObjectSentence(spec.object_grammar)
        else:
            out[name] = FreeText()
    return out


def unspellable(tokenizer, spec: PlanSpec, limit: int = 3) -> list[tuple[str, str]]:
    """Fixed plan words the tokenizer cannot spell: ``(text, what it decodes to)`` for each choice text and object
    word of ``spec`` whose encode-decode round trip changes it (a word-level tokenizer maps unknown words to
    ``<unk>``). Constrained decoding can only write what the tokenizer spells. At most ``limit`` are returned."""
    texts: list[str] = []
    for name in FIELDS:
        if spec.vocab is not None and name in spec.vocab:
            texts += sorted(spec.vocab[name])
    g = spec.object_grammar
    if g is not None:
        texts += sorted(g.names | g.colors | g.sizes | g.materials | g.positions)
    bad = []
    for text in texts:
        ids = tokenizer.encode(" " + text, add_special_tokens=False)
        back = tokenizer.decode(ids, skip_special_tokens=False).strip()
        if back != text:
            bad.append((text, back))
            if len(bad) >= limit:
                break
    return bad


def check_spelling(tokenizer, spec: PlanSpec) -> None:
    """Raise `PlanError` when the tokenizer cannot spell the plan vocabulary of ``spec`` (see `unspellable`)."""
    bad = unspellable(tokenizer, spec)
    if bad:
        shown = "; ".join(f"{t!r} comes back as {b!r}" for t, b in bad)
        raise PlanError(
            f"this LLM's tokenizer ({type(tokenizer).__name__}) cannot spell the plan vocabulary ({shown}), so "
            "constrained decoding cannot write the plan: use --free-plan (free-text fields) or an LLM whose "
            "tokenizer spells any text (byte-level BPE or SentencePiece)"
        )


# ----------------------------------------------------------------------------------------------- the processor
@dataclass
class _RowState:
    fields: list[str]  # field names in order so far (OBJECT repeated)
    current: str | None  # field being written (None: right after <IMG_BEGIN>)
    current_ids: list[int]  # tokens of the current field's text
    field_tokens: int  # total text tokens so far (all fields)
    ended: bool  # <IMG_END> generated
    done_ids: list[list[int]] = field(default_factory=list)  # token ids of each finished field


class PlanConstraint(LogitsProcessor):
    """Mask every token that would make the plan unparseable under ``spec``.

    ``prompt_length`` is the (padded, left-padded) length of the inputs: tokens after it are the plan
    being generated, which starts right after the ``<IMG_BEGIN>`` that ends every prompt.
    """

    def __init__(
        self,
        tokenizer,
        spec: PlanSpec,
        prompt_length: int,
        max_new_tokens: int,
        token_texts: list[str] | None = None,
        candidates: int = 64,
    ):
        self.tok = tokenizer
        self.spec = spec
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.candidates = candidates
        self.grammars = field_grammars(spec)
        self.tag_ids = {name: tokenizer.convert_tokens_to_ids(tag) for name, tag in FIELD_TAGS.items()}
        self.id_to_field = {i: n for n, i in self.tag_ids.items()}
        self.end_id = tokenizer.convert_tokens_to_ids(IMG_END)
        self.begin_id = tokenizer.convert_tokens_to_ids(IMG_BEGIN)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token; constrained decoding needs one to stop")
        self.texts = token_texts if token_texts is not None else token_text_table(tokenizer)
        special = set(tokenizer.all_special_ids) | set(self.tag_ids.values()) | {self.end_id, self.begin_id}
        self.text_ids = torch.tensor([i for i, t in enumerate(self.texts) if i not in special and _plain_text(t)])
        self.min_text = {name: self._min_field_text(name) for name in FIELDS}
        self.forced: dict[int, str] = {}  # rows that had to be completed by force

    # -- helpers
    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def _min_field_text(self, name: str) -> str:
        g = self.grammars[name]
        if isinstance(g, Choice):
            return min(g.texts, key=lambda t: (self.count_tokens(" " + t), t))
        return g.shortest_completion("").strip()

    def _row_state(self, ids: list[int]) -> _RowState:
        st = _RowState([], None, [], 0, False)
        for i in ids:
            if i == self.end_id:
                st.ended = True
            elif i in self.id_to_field:
                if st.current is not None:
                    st.done_ids.append(st.current_ids)
                st.fields.append(self.id_to_field[i])
                st.current, st.current_ids = self.id_to_field[i], []
            elif st.current is not None:
                st.current_ids.append(i)
                st.field_tokens += 1
        return st

    def _next_tags(self, st: _RowState) -> list[str]:
        """Tags that may follow: later fields in order (OBJECT may repeat), never skipping a missing required one."""
        last = FIELDS.index(st.current) if st.current else -1
        out = []
        for j, name in enumerate(FIELDS):
            if j < last or (j == last and name != "OBJECT"):
                continue
            if name == "OBJECT" and st.fields.count("OBJECT") >= self.spec.max_objects:
                continue
            out.append(name)
            if name in self.spec.required and name not in st.fields:
                break
        return out

    def _missing_required(self, st: _RowState) -> list[str]:
        return [f for f in self.spec.required if f not in st.fields]

    def _completion_text(self, st: _RowState, text: str) -> str:
        """The shortest text (with tags) that turns the plan so far into a valid one."""
        parts = []
        if st.current is not None:
            parts.append(self.grammars[st.current].shortest_completion(text))
        after = FIELDS.index(st.current) if st.current else -1
        for name in self._missing_required(st):
            if FIELDS.index(name) > after:
                parts.append(f" {FIELD_TAGS[name]} {self.min_text[name]}")
        parts.append(f" {IMG_END}")
        return "".join(parts)

    # -- the processor
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for b in range(input_ids.shape[0]):
            allowed = self._allowed(b, input_ids[b, self.prompt_length :].tolist(), scores[b])
            mask[b, allowed] = 0.0
        return scores + mask

    def _allowed(self, row: int, ids: list[int], row_scores: torch.Tensor) -> list[int]:
        st = self._row_state(ids)
        if st.ended:
            return [self.eos_id]
        raw = self.tok.decode(st.current_ids) if st.current else ""
        text = norm_partial(raw)
        remaining = self.max_new_tokens - len(ids)
        done_tokens = sum(self.count_tokens(self.tok.decode(f).strip()) for f in st.done_ids)
        missing_after = [f for f in self._missing_required(st) if f != st.current]
        missing_tokens = sum(self.count_tokens(self.min_text[f]) for f in missing_after)

        def feasible(new_text: str | None) -> bool:
            """Can the plan still be finished within every limit if the field's text becomes ``new_text``?"""
            if st.current is None:
                return True
            final = (new_text + self.grammars[st.current].shortest_completion(new_text)).strip()
            n_field = self.count_tokens(final)
            if n_field > self.spec.max_field_tokens:
                return False
            if done_tokens + n_field + missing_tokens > self.spec.max_total_tokens:
                return False
            tail = self.count_tokens(self._completion_text(st, new_text))
            return tail + 2 <= remaining - 1  # +2: this token and EOS

        allowed: list[int] = []
        complete = st.current is None or self.grammars[st.current].is_complete(text)
        if complete:
            for name in self._next_tags(st):
                extra = 0 if name in self.spec.required else self.count_tokens(self.min_text[name])
                if name in self.spec.required or (
                    done_tokens + self.count_tokens(text) + missing_tokens + extra <= self.spec.max_total_tokens
                    and self.count_tokens(self._completion_text(st, text)) + extra + 3 <= remaining
                ):
                    allowed.append(self.tag_ids[name])
            if st.current is not None and not self._missing_required(st):
                allowed.append(self.end_id)
        if st.current is not None and feasible(text):
            near = (
                self.count_tokens(self._completion_text(st, text)) + 6 >= remaining
                or (
                    self.count_tokens((text + self.grammars[st.current].shortest_completion(text)).strip()) + 4
                    >= self.spec.max_field_tokens
                )
                or done_tokens + self.count_tokens(text) + missing_tokens + 6 >= self.spec.max_total_tokens
            )
            # grammar fields can jump in what they still need (" at" asks for every position): always check them
            check = near or not isinstance(self.grammars[st.current], FreeText)
            allowed += self._valid_text_tokens(st.current, raw, text, row_scores, feasible if check else None)
        if not allowed:  # only the shortest completion still fits: force it, token by token
            completion = self._completion_text(st, text)
            self.forced[row] = completion
            forced = self.tok(completion, add_special_tokens=False).input_ids
            return forced[:1] or [self.end_id]
        return allowed

    def _valid_text_tokens(self, name: str, raw: str, text: str, row_scores: torch.Tensor, feasible=None) -> list[int]:
        """Up to ``candidates`` best-scoring text tokens that keep the field a valid prefix, make progress
        and (near a limit) leave room to finish the plan."""
        grammar = self.grammars[name]
        order = self.text_ids[torch.argsort(row_scores[self.text_ids], descending=True)].tolist()
        out: list[int] = []
        for i in order:
            new = norm_partial(raw + self.texts[i])
            if new == text or (new.rstrip() == text.rstrip() and len(new) <= len(text)):
                continue  # no progress
            if grammar.is_prefix(new) and (feasible is None or feasible(new)):
                out.append(i)
                if len(out) >= self.candidates:
                    break
        return out


def _plain_text(t: str) -> bool:
    """Tokens free text may use: visible, no tag brackets, no broken UTF-8 pieces or control characters."""
    return bool(t.strip()) and "<" not in t and ">" not in t and "\ufffd" not in t and t.isprintable()


def token_text_table(tokenizer) -> list[str]:
    """How each token id reads when appended to text (SentencePiece's leading space included)."""
    anchor = tokenizer("a", add_special_tokens=False).input_ids[:1]
    prefix = tokenizer.decode(anchor)
    out = []
    for i in range(len(tokenizer)):
        both = tokenizer.decode([*anchor, i])
        out.append(both[len(prefix) :] if both.startswith(prefix) else tokenizer.decode([i]))
    return out
