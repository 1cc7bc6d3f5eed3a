"""The schema's building blocks: a `Rule` (type and range of one value) and a `Section` (the allowed keys
of a nested mapping), and `ConfigError`, the one-line message every config problem becomes."""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable


class _Unset:
    """Marks a Rule without a default / without a single implemented value."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (one line)."""


def normalize_key(key: str) -> str:
    return str(key).replace("-", "_")


def show_value(value) -> str:
    """A value as the user wrote it in YAML (strings quoted, so `'false'` is visibly not `false`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _looks_numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False



@dataclass(frozen=True)
class Rule:
    """Type and range of one config value.

    kind: int | float | bool | str | list | dict | any (top-level keys take it from their annotation).
    A bool is never a number and a string is never a bool; an int is accepted for a float; numbers
    are finite. `only` is the one value this stack implements (anything else is refused with `hint`
    as the reason); `writable` marks a directory the run writes (checked by `check_paths`).
    """

    kind: str = "any"
    null: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()
    casefold: bool = False
    items: Rule | None = None
    length: int | None = None
    section: Section | None = None
    only: Any = UNSET
    default: Any = UNSET
    required: bool = False
    writable: bool = False
    parse: Callable[[Any], str | None] | None = None
    hint: str = ""

    def expect(self) -> str:
        """What a valid value is, as the fix in a message ("a number in [0, 1)")."""
        if self.only is not UNSET:
            text = show_value(self.only)
        elif self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "bool":
            text = "true or false (unquoted)"
        elif self.kind in ("int", "float"):
            a_noun = "an integer" if self.kind == "int" else "a number"
            lo, lo_in = (self.ge, True) if self.ge is not None else (self.gt, False)
            hi, hi_in = (self.le, True) if self.le is not None else (self.lt, False)
            if lo is not None and hi is not None:
                text = f"{a_noun} in {'[' if lo_in else '('}{_num(lo)}, {_num(hi)}{']' if hi_in else ')'}"
            elif lo == 0:
                text = f"a {'non-negative' if lo_in else 'positive'} {a_noun.split()[1]}"
            elif lo is not None:
                text = f"{a_noun} {'>=' if lo_in else '>'} {_num(lo)}"
            else:
                text = a_noun
        elif self.kind == "list":
            text = f"a list of {self.length} entries" if self.length else "a list"
            if self.items is not None:
                text += f", each {self.items.expect()}"
        elif self.kind == "dict":
            text = f"a mapping, e.g. {self.section.example}" if self.section else "a mapping"
        elif self.kind == "str":
            text = "a path" if self.writable else "a string"
        else:
            text = "a value"
        return text + (" or null" if self.null and self.only is UNSET else "")

    def fail(self, name: str, value, where: str) -> ConfigError:
        notes = [self.hint] if self.hint else []
        if self.kind in ("int", "float") and isinstance(value, str) and _looks_numeric(value):
            notes.append("YAML read it as text: write numbers unquoted, with a decimal point before an exponent, "
                         "e.g. 6.0e-4")
        hint = f" ({'; '.join(notes)})" if notes else ""
        if self.only is not UNSET:
            return ConfigError(f"{where}: {name}: {show_value(value)}; only {show_value(self.only)} is supported "
                               f"here{hint}")
        return ConfigError(f"{where}: {name}: {show_value(value)}; use {self.expect()}{hint}")

    def check(self, value, name: str, where: str):
        """The value, type-checked, range-checked and normalised (int -> float, section defaults filled)."""
        if value is None:
            if self.section is not None and self.null:
                return self.section.check({}, name, where)
            if self.null or self.kind == "any":
                return None
            raise self.fail(name, value, where)
        kind = self.kind
        if kind == "bool" and not isinstance(value, bool):
            raise self.fail(name, value, where)
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
                raise self.fail(name, value, where)
            if isinstance(value, float) and not math.isfinite(value):
                raise self.fail(name, value, where)
            value = float(value) if kind == "float" else value
            if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)):
                raise self.fail(name, value, where)
        if kind == "str" and not isinstance(value, str):
            raise self.fail(name, value, where)
        if kind == "list":
            if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
                raise self.fail(name, value, where)
            if self.items is not None:
                value = [self.items.check(v, f"{name}[{i}]", where) for i, v in enumerate(value)]
            else:
                value = list(value)
        if kind == "dict":
            if not isinstance(value, dict):
                raise self.fail(name, value, where)
            if self.section is not None:
                value = self.section.check(value, name, where)
        if self.choices:
            match = [c for c in self.choices
                     if c == value or (self.casefold and isinstance(value, str) and c.lower() == value.lower())]
            if not match:
                close = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
                did = f" (did you mean {close[0]}?)" if close else ""
                hint = f" ({self.hint})" if self.hint else ""
                raise ConfigError(f"{where}: {name}: {show_value(value)} is not supported{did}; use one of "
                                  f"{', '.join(map(str, self.choices))}{hint}")
            value = match[0]
        if self.only is not UNSET and value != self.only:
            raise self.fail(name, value, where)
        if self.parse is not None:
            problem = self.parse(value)
            if problem:
                raise ConfigError(f"{where}: {name}: {show_value(value)}; {problem}")
        return value


@dataclass(frozen=True)
class Section:
    """The allowed keys of a nested mapping, each with its `Rule` (and default, where it has one).

    A key with no default stays absent (the consumer's own default applies, e.g. DeepSpeed's).
    `refused` keys are GPT-NeoX/DeepSpeed keys this stack does not implement, with the reason;
    `not_forwarded` keys (GPT-NeoX's own markers, switches accepted only where they do nothing) are not
    passed on to DeepSpeed.
    """

    name: str
    keys: dict
    example: str
    refused: dict = field(default_factory=dict)
    not_forwarded: frozenset = frozenset()

    def check(self, value: dict, name: str, where: str) -> dict:
        out = {}
        for raw_key, v in value.items():
            key = normalize_key(raw_key)
            if key in self.refused:
                raise ConfigError(f"{where}: {name}.{key}: {show_value(v)}; {self.refused[key]}")
            if key not in self.keys:
                close = difflib.get_close_matches(key, list(self.keys), n=1)
                did = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{where}: {name}.{key}: unknown key{did} (valid: {', '.join(self.keys)})")
            out[key] = self.keys[key].check(v, f"{name}.{key}", where)
        for key, rule in self.keys.items():
            if key in out:
                continue
            if rule.required:
                hint = f" ({rule.hint})" if rule.hint else ""
                raise ConfigError(f"{where}: {name}.{key} is missing; set it to {rule.expect()}{hint}")
            if rule.default is not UNSET:
                out[key] = copy.deepcopy(rule.default)
        return out

    def normalized(self, value: dict | None = None) -> dict:
        """A valid section with its defaults filled (for `Args` defaults)."""
        return self.check(value or {}, self.name, "defaults")

    def for_deepspeed(self, value: dict) -> dict:
        """The section as DeepSpeed's config takes it (without the `not_forwarded` keys)."""
        return {k: v for k, v in value.items() if k not in self.not_forwarded}
