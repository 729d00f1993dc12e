"""One validation style for every config section (model, data, train, tracking, monitor), and the
one way a section is built from a dict (a recipe, a saved run's experiment.json).

Each section's `__post_init__` collects all its problems in a `Problems` and raises them as one
ValueError at the end, so a user fixes everything in one go. Every message starts with the
command-line flag (`--model.audio-rate`), which is also the recipe key (`model: {audio_rate: ...}`),
so it says what to change. A leaf module: every config imports it, it imports nothing of trainer.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from typing import Any, Iterable, Literal, Mapping, Union


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


def one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def close_names(name: str, known: Iterable[str]) -> list[str]:
    """The known names a misspelt `name` was probably meant to be (best first)."""
    return difflib.get_close_matches(name, list(known), n=2, cutoff=0.7)


def folder_problem(flag_: str, folder: str | os.PathLike) -> str | None:
    """Why `folder` (an output folder, created on demand) cannot be written, or None: the mistake found
    before any work, with nothing created."""
    from pathlib import Path

    if not str(folder).strip():
        return f"{flag_} is empty (a folder is needed)"
    path = existing = Path(folder)
    if path.exists() and not path.is_dir():
        return f"{flag_} {folder}: is a file, not a folder"
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag_} {folder}: {existing} is a file, so the folder cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is read-only" if existing == path else f"cannot be created: {existing} is read-only"
        return f"{flag_} {folder}: {where} (a writable folder is needed)"
    return None


def user_error(message: BaseException | str) -> int:
    """The one error style of every command: a user's mistake is one line on stderr, `error: ...`, and
    exit status 2 (argparse's); never a traceback. Returns the status for `return user_error(...)`."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is `error: <what> (see --help)`: one line, exit status 2."""

    def error(self, message: str):
        sys.exit(user_error(f"{self.prog}: {message} (see {self.prog} --help)"))


def expected_type(hint: Any, value: Any) -> str | None:
    """None when `value` fits the field annotation `hint`, else what would be accepted ("an int")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        wanted = [expected_type(a, value) for a in inner]
        if any(w is None for w in wanted):
            return None
        return " or ".join(w for w in wanted if w) + (" or null (left out)" if type(None) in args else "")
    if origin is Literal:
        return None if value in args else f"one of {args}"
    if origin is tuple:
        item = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            return f"a list of {_plural(item)}"
        bad = [v for v in value if expected_type(item, v) is not None]
        return f"a list of {_plural(item)}" if bad else None
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")
        return None if ok else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, (Mapping, hint)) else f"a mapping of {hint.__name__} options"
    return None                        # an annotation this check does not know: the section checks it


def _plural(hint: Any) -> str:
    return {int: "ints", float: "numbers", str: "strings", bool: "booleans"}.get(hint, "values")


def _as_float(hint: Any, value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string: take it as the number it plainly is."""
    if isinstance(value, str) and float in (hint, *typing.get_args(hint)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def build_config(cls, values: Mapping[str, Any], where: str, section: str = ""):
    """`cls` from a (possibly partial) dict, recursing into nested dataclass fields. An unknown key is
    an error (naming the close known ones). A value of the wrong type is an error naming the flag and
    the type wanted, before the section's own checks compare it."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        # a nested section's names too: a key one level too high (model: {llm_layers}) is a likely slip
        names = [*known] + [f"{name}.{inner.name}" for name in known if dataclasses.is_dataclass(hints[name])
                            for inner in dataclasses.fields(hints[name])]
        guesses = [f"{k} -> {' or '.join(close_names(k, names))}" for k in unknown if close_names(k, names)]
        meant = f" (did you mean: {', '.join(guesses)}?)" if guesses else ""
        raise ValueError(f"unknown option(s) {unknown} in {where}{meant}; known: {sorted(known)}")
    kwargs, wrong = {}, []
    for name, value in values.items():
        value = _as_float(hints[name], value)
        wanted = expected_type(hints[name], value)
        if wanted is not None:
            wrong.append(f"{flag(section, name)} must be {wanted}, got {value!r}")
            continue
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING \
            else None
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            inner = f"{section}.{name}" if section else name
            try:
                kwargs[name] = build_config(type(default), value, f"{where}.{name}", inner)
            except ValueError as err:
                wrong.append(str(err))
        elif isinstance(value, list):
            kwargs[name] = tuple(value) if isinstance(default, tuple) or typing.get_origin(
                hints[name]) is not list else value
        else:
            kwargs[name] = value
    if wrong:
        raise ValueError("; ".join(wrong))
    return cls(**kwargs)
