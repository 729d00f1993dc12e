"""One validation style for every config section (model, data, train, tracking, monitor), and the
one way a section is built from a dict (a recipe, a saved run's experiment.json).

Each section's `__post_init__` collects all its problems in a `Problems` and raises them as one
ValueError at the end, so a user fixes everything in one go. Every message starts with the
command-line flag (`--model.audio-rate`), which is also the recipe key (`model: {audio_rate: ...}`),
so it says what to change. A leaf module: every config imports it, it imports nothing of trainer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


def flag(section: str, name: str) -> str:
    """`flag("model.tiny", "llm_width")` -> "--model.tiny.llm-width" (tyro's spelling of the field)."""
    return f"--{section + '.' if section else ''}{name}".replace("_", "-")


class Problems:
    """The problems found in one config section; `raise_any()` raises them together."""

    def __init__(self, section: str):
        self.section = section
        self.found: list[str] = []

    def flag(self, name: str) -> str:
        return flag(self.section, name)

    def check(self, ok: bool, name: str, message: str) -> None:
        """Unless `ok`: record "--section.name <message>"."""
        if not ok:
            self.found.append(f"{self.flag(name)} {message}")

    def at_least(self, obj: Any, names: Iterable[str], low: int | float, integer: bool = False) -> None:
        """Each field in `names` is a number (an int when `integer`) >= low; bools are not numbers here."""
        kinds = int if integer else (int, float)
        for name in names:
            value = getattr(obj, name)
            ok = isinstance(value, kinds) and not isinstance(value, bool) and value >= low
            self.check(ok, name, f"must be {'an int ' if integer else ''}>= {low}, got {value!r}")

    def one_of(self, obj: Any, name: str, choices: Iterable[Any]) -> None:
        choices = tuple(choices)
        value = getattr(obj, name)
        self.check(value in choices, name, f"must be one of {choices}, got {value!r}")

    def raise_any(self) -> None:
        if self.found:
            raise ValueError("; ".join(self.found))


def build_config(cls, values: Mapping[str, Any], where: str, section: str = "",
          renamed: Mapping[str, str] | None = None):
    """`cls` from a (possibly partial) dict, recursing into nested dataclass fields. An unknown key is
    an error; one in `renamed` (dotted path such as "model.tiny_llm_layers" -> what to use now) says
    what replaced it."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        path = [f"{section}.{k}" if section else k for k in unknown]
        moved = [f"{p} is now {renamed[p]}" for p in path if renamed and p in renamed]
        if moved:
            raise ValueError(f"renamed option(s) in {where}: " + "; ".join(moved))
        raise ValueError(f"unknown option(s) {unknown} in {where}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING \
            else None
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            inner = f"{section}.{name}" if section else name
            kwargs[name] = build_config(type(default), value, f"{where}.{name}", inner, renamed)
        elif isinstance(value, list):
            kwargs[name] = tuple(value) if isinstance(default, tuple) else value
        else:
            kwargs[name] = value
    return cls(**kwargs)
