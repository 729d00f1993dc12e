"""Chaos: SIGKILL of the whole process group at random moments, the same command after each.

A 2-process ZeRO-3 run (torchrun, the tiny model) saves a checkpoint after every step. It is killed
(kill -9 of its process group: launcher, ranks, DataLoader workers) at KILLS random moments, each a random
number of logged steps plus a random delay into the run, so a kill can land in a forward, a backward, a
save, a manifest write or a start-up; after each, the same command again; the last attempt runs to the
end. Every loss any attempt logged for a step must equal the uninterrupted run's for that step.

The moments come from AVSR_CHAOS_SEED (default: the time), printed first, so that a failure replays with
`AVSR_CHAOS_SEED=<seed> pytest tests/e2e/test_resume.py`.
"""
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.constants import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
STEPS = 6
KILLS = 3
ARGS = ["--data.num-workers", "1", "--data.max-frames-per-batch", "600", "--data.max-batch-size", "4",
        "--data.batches-per-epoch", "4", "--train.max-steps", str(STEPS), "--train.log-every", "1",
        "--train.warmup-steps", "1", "--train.lr", "3e-3", "--train.save-every", "1", "--train.keep-last", "2",
        "--train.final-eval", "False", "--train.eval-untrained", "False", "--train.export-on-finish", "False",
        "--monitor.every", "0", "--tracking.enabled", "False"]
STEP_LINE = re.compile(r"step (\d+)/\d+ loss (\S+)")


class Attempt:
    """One start of the command in its own process group, its output read line by line as it comes."""

    def __init__(self, run_dir: Path, corpus: Path):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "launch" / "train.py"), "--config", str(REPO / "ds_configs" / "zero3.json"),
               "--data.shard-dir", str(corpus), "--train.run-dir", str(run_dir), *ARGS]
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def losses(self) -> list[tuple[int, str]]:
        return [(int(m[1]), m[2]) for ln in list(self.lines) if (m := STEP_LINE.search(ln))]

    def wait_for_steps(self, n: int, timeout: float = 600) -> bool:
        """True once n steps were logged; False if the run ended first."""
        deadline = time.monotonic() + timeout
        while len(self.losses()) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)      # the launcher's group: ranks and workers too
        except ProcessLookupError:
            pass
        self.finish()

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(30)
        return code

    def output(self) -> str:
        return "".join(self.lines)


def test_random_kills_then_the_same_command_reproduce_the_uninterrupted_losses(tmp_path, synth_corpus):
    seed = int(os.environ.get("AVSR_CHAOS_SEED") or time.time())
    print(f"AVSR_CHAOS_SEED={seed}", flush=True)
    rng = random.Random(seed)
    reference = Attempt(tmp_path / "reference", synth_corpus)
    assert reference.finish() == 0, reference.output()[-6000:]
    want = dict(reference.losses())
    assert sorted(want) == list(range(1, STEPS + 1))

    run = tmp_path / "chaos"
    seen: list[tuple[int, str]] = []
    for kill in range(KILLS):
        attempt = Attempt(run, synth_corpus)
        steps, delay = rng.randint(1, 2), rng.uniform(0.0, 2.0)
        if attempt.wait_for_steps(steps):
            time.sleep(delay)
            attempt.kill()
            how = f"killed {delay:.2f} s after its step line {steps}"
        else:
            assert attempt.finish() == 0, attempt.output()[-6000:]
            how = "ended by itself"
        print(f"attempt {kill + 1}: {how}; it logged {[s for s, _ in attempt.losses()]}", flush=True)
        seen += attempt.losses()
    last = Attempt(run, synth_corpus)
    assert last.finish() == 0, f"AVSR_CHAOS_SEED={seed}\n" + last.output()[-6000:]
    seen += last.losses()
    assert max(s for s, _ in seen) == STEPS, seen
    wrong = [(s, loss, want[s]) for s, loss in seen if loss != want[s]]
    assert not wrong, f"AVSR_CHAOS_SEED={seed}: (step, loss after a kill, uninterrupted) {wrong}"
