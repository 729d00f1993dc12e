"""launch/evaluate.py end to end on CPU, on a real 4-step ZeRO-3 run folder.

The training run also checks the end-of-run evaluation options: only the test split, capped at 3
utterances. Then the tool, as a real subprocess: 1 process (clean and two SNRs of babble noise,
logged to the run's MLflow run) and 2 processes under the deepspeed launcher; the printed table,
results.json and the per-utterance files must agree, and the clean WER must not depend on the
number of processes. Bad input gives clear errors.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.constants import REPO

pytestmark = pytest.mark.slow
SCRIPT = REPO / "launch" / "evaluate.py"


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MLFLOW_EXPERIMENT_NAME": "evaluate-tool"}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synth_corpus) -> Path:
    run = tmp_path_factory.mktemp("evaluate") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "ds_configs" / "zero3.json"),
           "--data.shard-dir", str(synth_corpus), "--train.run-dir", str(run), "--data.num-workers", "1", "--train.device", "cpu",
           "--data.max-frames-per-batch", "600", "--data.max-batch-size", "4", "--data.batches-per-epoch", "4",
           "--train.max-steps", "4", "--train.save-every", "4", "--train.warmup-steps", "1",
           "--train.eval-max-new-tokens", "4", "--train.eval-untrained", "False", "--monitor.every", "0",
           "--train.final-eval-splits", "test", "--train.final-eval-max-samples", "3",
           "--train.final-eval-beams", "2"]
    p = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"training failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return run


def _evaluate(*args: str, procs: int = 1, ok: bool = True) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(procs), "--master_port",
               str(_free_port()), str(SCRIPT), *args]
    p = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, f"evaluate.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


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


def test_final_evaluation_follows_the_options(trained_run):
    results = json.loads((trained_run / "results.json").read_text())
    assert set(results) == {"step", "test", "data_skipped"} and results["step"] == 4       # no val, as asked
    assert results["data_skipped"]["samples"] == 0 and results["data_skipped"]["summary"] == "nothing skipped"
    assert results["test"]["num_utterances"] == 3
    report = json.loads((trained_run / "eval" / "test_step00000004.json").read_text())
    assert len(report["utterances"]) == 3
    assert not list((trained_run / "eval").glob("val_*"))


@pytest.fixture(scope="module")
def one_process(trained_run, synth_corpus, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("one") / "out"
    p = _evaluate("--run-dir", str(trained_run), "--shards", str(synth_corpus), "--split", "test",
                  "--max-new-tokens", "4", "--snr", "clean", "10", "-5", "--noise", "babble", "--out", str(out),
                  "--mlflow")
    return out, p.stdout


def test_one_process_clean_and_babble_table_logged_to_mlflow(trained_run, one_process):
    from mlflow.tracking import MlflowClient

    out, stdout = one_process
    results = _check_outputs(out, stdout, ["clean", "10dB", "-5dB"])
    assert results["noise"] == "babble" and results["step"] == 4 and results["split"] == "test"
    assert "step_00000004" in results["weights"] and results["world_size"] == 1
    keys = {json.dumps(sorted(r["key"] for r in json.loads((out / f"utterances_{c}.json").read_text())["utterances"]))
            for c in results["conditions"]}
    assert len(keys) == 1                              # every condition decodes the same utterances

    run_id = json.loads((trained_run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{trained_run / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"               # the finished run stays finished
    assert run.data.metrics["evaluate/test/-5dB/avsr/wer"] == pytest.approx(results["conditions"]["-5dB"]["wer"])
    files = [a.path for a in client.list_artifacts(run_id, f"evaluate/{out.name}")]
    assert any(f.endswith("results.json") for f in files) and any(f.endswith("utterances_clean.json") for f in files)


def test_two_processes_give_the_one_process_figures(trained_run, one_process, tmp_path):
    one, _ = one_process
    two = tmp_path / "two"
    p2 = _evaluate("--run-dir", str(trained_run), "--split", "test", "--max-new-tokens", "4", "--checkpoint",
                   "export", "--out", str(two), procs=2)
    r1 = json.loads((one / "results.json").read_text())
    r2 = _check_outputs(two, p2.stdout, ["clean"])
    assert r2["world_size"] == 2 and "consolidated" in r2["weights"]
    u1 = sorted(json.loads((one / "utterances_clean.json").read_text())["utterances"], key=lambda r: r["key"])
    u2 = sorted(json.loads((two / "utterances_clean.json").read_text())["utterances"], key=lambda r: r["key"])
    assert u1 == u2             # the same weights (checkpoint and fp32 export), greedy, any number of processes
    assert r1["conditions"]["clean"]["wer"] == r2["conditions"]["clean"]["wer"]


def test_bad_input_is_a_clear_error(trained_run, synth_corpus, tmp_path):
    p = _evaluate("--run-dir", str(trained_run), "--split", "nope", ok=False)
    assert p.returncode != 0 and "no split 'nope'" in p.stderr and "test" in p.stderr
    p = _evaluate("--run-dir", str(tmp_path / "missing"), ok=False)
    assert p.returncode != 0 and "run folder not found" in p.stderr
    p = _evaluate("--run-dir", str(trained_run), "--snr", "clean", "loud", ok=False)
    assert p.returncode != 0 and "'loud'" in p.stderr
