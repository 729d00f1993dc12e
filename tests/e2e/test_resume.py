"""Resume end to end: a run stopped, then killed, then started again by the same command trains exactly
what the uninterrupted run trained.

The uninterrupted run is the session's `trained_run("zero3_2proc")`: 2 ranks under the `deepspeed`
launcher with the shipped ds_configs/zero3.json, 6 steps, checkpoints after steps 3 and 6, sink
monitoring, MLflow, the end-of-run validation WER and exports. Its exact command, in a fresh folder:

1. with `--train.stop-after 3`: a clean stop with a checkpoint; the MLflow run is KILLED;
2. again, killed with SIGKILL of its whole process group (launcher, ranks, DataLoader workers, the
   tracking and figure processes) at a random moment: 1 or 2 logged steps plus up to 2 s in, so in a
   forward, a backward, a save, the final evaluation or the export;
3. again, to the end.

Every loss any attempt printed, the MLflow history (one run, each step once, FINISHED), the
checkpoints (each verifies) and the final evaluation (the WER and every hypothesis) must equal the
uninterrupted run's exactly: on CPU the same seeds, data order, gloo reduction order and thread count
give the same bits, and a resume restores all of them (RNG and data position included).

The moment of the kill comes from AVSR_CHAOS_SEED (default: the time), printed first, so that a
failure replays with `AVSR_CHAOS_SEED=<seed> python -m pytest tests/e2e/test_resume.py -m slow -s`.
What each part of a resume restores, in one process: tests/trainer/engine/test_checkpoint.py.
"""
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.constants import REPO
from tests.helpers import TINY_STEPS, mlflow_run, printed_losses
from trainer.engine.checkpoint import verify

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


class Attempt:
    """One start of the command in its own process group, its output read line by line as it comes."""

    def __init__(self, cmd: list[str], env: dict):
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def losses(self) -> dict[int, str]:
        return printed_losses("".join(list(self.lines)))

    def wait_for_steps(self, n: int, timeout: float = 900) -> bool:
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

    def finish(self, timeout: float = 900) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(30)
        return code

    def output(self) -> str:
        return "".join(self.lines)


def _final_eval(run_dir: Path) -> tuple[dict, list]:
    results = json.loads((run_dir / "results.json").read_text())["val"]
    hyps = [json.loads(p.read_text())["utterances"] for p in sorted((run_dir / "eval").glob("val_*"))]
    return {k: v for k, v in results.items() if k != "eval_time_s"}, hyps


def test_stopped_then_killed_then_the_same_command_trains_the_uninterrupted_run(trained_run, synth_corpus, tmp_path):
    seed = int(os.environ.get("AVSR_CHAOS_SEED") or time.time())
    print(f"AVSR_CHAOS_SEED={seed}", flush=True)
    rng = random.Random(seed)
    full = trained_run("zero3_2proc")
    want = printed_losses(full.output)
    assert sorted(want) == list(range(1, TINY_STEPS + 1)), full.output[-3000:]
    run = tmp_path / "resumed"

    # 1. a clean stop after 3 steps: checkpoint, MLflow run KILLED, resumable
    first = Attempt(full.command(run, synth_corpus, "--train.stop-after", "3"), full.env())
    assert first.finish() == 0, first.output()[-6000:]
    assert sorted(first.losses()) == [1, 2, 3], first.output()[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    client, mrun = mlflow_run(run)
    assert mrun.info.status == "KILLED"

    # 2. the same command, killed at a random moment
    second = Attempt(full.command(run, synth_corpus), full.env())
    steps, delay = rng.randint(1, 2), rng.uniform(0.0, 2.0)
    if second.wait_for_steps(steps):
        time.sleep(delay)
        second.kill()
        how = f"killed {delay:.2f} s after its step line {steps}"
    else:
        assert second.finish() == 0, second.output()[-6000:]
        how = "ended by itself"
    print(f"attempt 2: {how}; it logged steps {sorted(second.losses())}", flush=True)

    # 3. the same command to the end
    last = Attempt(full.command(run, synth_corpus), full.env())
    assert last.finish() == 0, f"AVSR_CHAOS_SEED={seed}\n" + last.output()[-6000:]
    printed = [(a, step, loss) for a, attempt in enumerate((first, second, last), 1)
               for step, loss in attempt.losses().items()]
    assert {step for _, step, _ in printed} == set(want), printed
    wrong = [(a, step, loss, want[step]) for a, step, loss in printed if loss != want[step]]
    assert not wrong, f"AVSR_CHAOS_SEED={seed}: (attempt, step, loss, uninterrupted) {wrong}"

    # one MLflow run, reattached by each attempt: each step once, with the uninterrupted values
    client, mrun = mlflow_run(run)
    assert mrun.info.status == "FINISHED"
    history = client.get_metric_history(mrun.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, TINY_STEPS + 1))        # each step once
    ref_client, ref = mlflow_run(full.folder)
    reference = {m.step: m.value for m in ref_client.get_metric_history(ref.info.run_id, "train/loss")}
    assert {m.step: m.value for m in history} == reference
    # the checkpoints of a save that a kill interrupted were set aside; the kept ones verify
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert (ck / "latest").read_text().strip() == "step_00000006"
    assert all(verify(folder) == [] for folder in ck.glob("step_*"))
    # the same weights at the end: the same decoding, word for word
    assert _final_eval(run) == _final_eval(full.folder)
