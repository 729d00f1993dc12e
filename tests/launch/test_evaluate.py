"""launch/evaluate.py end to end on CPU, on the session's 1-process ZeRO-3 run of 6 steps.

The training run also checks the end-of-run evaluation options: only the test split, capped at 3
utterances, 2 beams. Then the tool, as a real subprocess, on a copy of the run folder: 1 process (clean
and two SNRs of babble noise, logged to the run's MLflow run) and 2 processes under the deepspeed
launcher; the printed table, results.json and the per-utterance files must agree, and the clean WER
must not depend on the number of processes. Bad input gives clear errors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.constants import REPO
from tests.helpers import TINY_STEPS, command, run

pytestmark = pytest.mark.slow
SCRIPT = REPO / "launch" / "evaluate.py"
LAST = f"step_{TINY_STEPS:08d}"


@pytest.fixture(scope="module")
def trained_run_dir(trained_run, tmp_path_factory) -> Path:
    """A copy of the session run (the tool logs into its MLflow run)."""
    return trained_run("zero3_1proc").copy(tmp_path_factory.mktemp("evaluate") / "run")


def _evaluate(*args: str, procs: int = 1, ok: bool = True):
    return run(command(SCRIPT, *args, launcher="python" if procs == 1 else "deepspeed", nproc=procs), ok=ok)


def _printed(stdout: str) -> dict[str, tuple[float, float, int]]:
    rows = re.findall(r"^\s*(clean|-?\d+(?:\.\d+)?dB)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s*$", stdout, re.M)
    return {name: (float(w), float(c), int(n)) for name, w, c, n in rows}


def _check_outputs(out: Path, stdout: str, conditions: list[str]) -> dict:
    from trainer.model.metrics import error_counts

    results = json.loads((out / "results.json").read_text())
    printed = _printed(stdout)
    assert list(results["conditions"]) == list(printed) == conditions
    assert (out / "table.txt").read_text() in stdout
    for name, r in results["conditions"].items():
        rows = json.loads((out / f"utterances_{name}.json").read_text())["utterances"]
        assert len(rows) == int(r["num_utterances"]) == printed[name][2] > 0
        assert all({"key", "ref", "hyp", "word_errors", "ref_words"} <= set(row) for row in rows)   # stats.py's input
        counts = error_counts([row["ref"] for row in rows], [row["hyp"] for row in rows])
        assert counts.wer == pytest.approx(r["wer"]) and counts.cer == pytest.approx(r["cer"])
        assert round(100 * counts.wer, 2) == printed[name][0] and round(100 * counts.cer, 2) == printed[name][1]
    return results


def test_final_evaluation_follows_the_options(trained_run_dir):
    results = json.loads((trained_run_dir / "results.json").read_text())
    assert set(results) == {"step", "test", "data_skipped"} and results["step"] == TINY_STEPS     # no val, as asked
    assert results["data_skipped"]["samples"] == 0 and results["data_skipped"]["summary"] == "nothing skipped"
    assert results["test"]["num_utterances"] == 3
    report = json.loads((trained_run_dir / "eval" / f"test_step{TINY_STEPS:08d}.json").read_text())
    assert len(report["utterances"]) == 3
    assert not list((trained_run_dir / "eval").glob("val_*"))


@pytest.fixture(scope="module")
def one_process(trained_run_dir, synth_corpus, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("one") / "out"
    p = _evaluate("--run-dir", str(trained_run_dir), "--shards", str(synth_corpus), "--split", "test",
                  "--max-new-tokens", "4", "--snr", "clean", "10", "-5", "--noise", "babble", "--out", str(out),
                  "--mlflow")
    return out, p.stdout


def test_one_process_clean_and_babble_table_logged_to_mlflow(trained_run_dir, one_process):
    from mlflow.tracking import MlflowClient

    out, stdout = one_process
    results = _check_outputs(out, stdout, ["clean", "10dB", "-5dB"])
    assert results["noise"] == "babble" and results["step"] == TINY_STEPS and results["split"] == "test"
    assert LAST in results["weights"] and results["world_size"] == 1
    keys = {json.dumps(sorted(r["key"] for r in json.loads((out / f"utterances_{c}.json").read_text())["utterances"]))
            for c in results["conditions"]}
    assert len(keys) == 1                              # every condition decodes the same utterances

    run_id = json.loads((trained_run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{trained_run_dir / 'mlflow.db'}")
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED"               # the finished run stays finished
    assert mrun.data.metrics["evaluate/test/-5dB/avsr/wer"] == pytest.approx(results["conditions"]["-5dB"]["wer"])
    files = [a.path for a in client.list_artifacts(run_id, f"evaluate/{out.name}")]
    assert any(f.endswith("results.json") for f in files) and any(f.endswith("utterances_clean.json") for f in files)


def test_two_processes_give_the_one_process_figures(trained_run_dir, one_process, tmp_path):
    one, _ = one_process
    two = tmp_path / "two"
    p2 = _evaluate("--run-dir", str(trained_run_dir), "--split", "test", "--max-new-tokens", "4", "--checkpoint",
                   "export", "--out", str(two), procs=2)
    r1 = json.loads((one / "results.json").read_text())
    r2 = _check_outputs(two, p2.stdout, ["clean"])
    assert r2["world_size"] == 2 and "consolidated" in r2["weights"]
    u1 = sorted(json.loads((one / "utterances_clean.json").read_text())["utterances"], key=lambda r: r["key"])
    u2 = sorted(json.loads((two / "utterances_clean.json").read_text())["utterances"], key=lambda r: r["key"])
    assert u1 == u2             # the same weights (checkpoint and fp32 export), greedy, any number of processes
    assert r1["conditions"]["clean"]["wer"] == r2["conditions"]["clean"]["wer"]


def test_bad_input_is_a_clear_error(trained_run_dir, synth_corpus, tmp_path):
    p = _evaluate("--run-dir", str(trained_run_dir), "--split", "nope", ok=False)
    assert p.returncode != 0 and "no split 'nope'" in p.stderr and "test" in p.stderr
    p = _evaluate("--run-dir", str(tmp_path / "missing"), ok=False)
    assert p.returncode != 0 and "run folder not found" in p.stderr
    p = _evaluate("--run-dir", str(trained_run_dir), "--snr", "clean", "loud", ok=False)
    assert p.returncode != 0 and "'loud'" in p.stderr
