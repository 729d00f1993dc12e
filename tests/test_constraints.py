"""constraints/tested.txt (the versions the suite ran with) pins every direct dependency of
pyproject.toml, and each pinned version satisfies pyproject's bounds (so the bounds never claim less
than what was tested allows, and the pins never fall outside what is declared)."""
from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.constants import REPO


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints" / "tested.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
            pins[canonicalize_name(name)] = version
    return pins


def test_every_direct_dependency_is_pinned_within_its_bounds():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = _pins()
    missing = [r.name for r in reqs if canonicalize_name(r.name) not in pins]
    outside = [f"{r.name}=={pins[canonicalize_name(r.name)]} not in {r.specifier}" for r in reqs
               if canonicalize_name(r.name) in pins and not r.specifier.contains(pins[canonicalize_name(r.name)])]
    extra = sorted(set(pins) - {canonicalize_name(r.name) for r in reqs})
    assert not missing and not outside and not extra, (missing, outside, extra)
