"""launch/setup_env.sh is safe to source: the shell's options come back as they were, no device
variable is exported, and a failed setup returns 1 to an interactive shell instead of closing it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.constants import REPO

SETUP = REPO / "launch" / "setup_env.sh"
VENV = Path(sys.prefix)
pytestmark = pytest.mark.skipif(not (VENV / ".avsr-deps-stamp").is_file(),
                                reason="not running in the project's cached venv (setup_env.sh would install one)")


def _bash(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "AVSR_SETUP_APT")}
    base.update({"AVSR_VENV": str(VENV), "AVSR_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path), **env})
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=base, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("options", ["", "set -e", "set -euo pipefail", "set -u", "set -o pipefail"])
def test_sourcing_leaves_the_shell_options_and_exports_no_device(tmp_path, options):
    # `set -o` straight into files, not in a command substitution (which reports errexit off)
    p = _bash(f"""{options}
set -o > {tmp_path}/before; shopt -p > {tmp_path}/shopt_before
source {SETUP}
set -o > {tmp_path}/after; shopt -p > {tmp_path}/shopt_after
echo "cwd=$PWD"; env | grep '^DS_ACCELERATOR=' || echo "no DS_ACCELERATOR"
declare -F | grep -c _avsr || true; compgen -v | grep -c '^_avsr' || true""", tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()
    assert (tmp_path / "shopt_before").read_text() == (tmp_path / "shopt_after").read_text()
    out = [line for line in p.stdout.splitlines() if not line.startswith("[setup]")]   # its own progress lines
    assert out[:2] == [f"cwd={REPO}", "no DS_ACCELERATOR"] and out[2:] == ["0", "0"], p.stdout


def test_a_failed_setup_returns_to_the_shell(tmp_path):
    p = _bash(f"""source {SETUP}; echo "rc=$? still here"; set -o | grep -E '^(errexit|nounset)'""", tmp_path,
              AVSR_VENV=str(tmp_path / "no_venv"), PYTHON="false")
    assert p.returncode == 0 and "rc=1 still here" in p.stdout, (p.stdout, p.stderr)
    assert "errexit        \toff" in p.stdout and "nounset        \toff" in p.stdout
