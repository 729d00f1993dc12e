"""trainer/tracking/tracker.py in one process: parameters flattened, a local MLflow run logged in batches,
reattached on resume and marked with its end state; other ranks get a tracker that does nothing.
(The tracker under real faults: tests/trainer/tracking/test_faults.py.)"""
from trainer.tracking.tracker import MLflowTracker, NullTracker, flatten, make_tracker


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}


def test_mlflow_tracker_logs_reattaches_and_marks_status(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    run_dir = tmp_path / "run"
    tr = MLflowTracker(run_dir, experiment_name="t", run_name="r")
    params = {f"p{i}": i for i in range(250)}            # more than one log_batch request
    tr.log_params({"train": params, "long": "x" * 10000})
    tr.log_metrics({f"m{i}": float(i) for i in range(1500)}, step=3)
    (tmp_path / "a.json").write_text("{}")
    tr.log_artifact(tmp_path / "a.json", "config")
    tr.finish("KILLED")                                   # delivers the queue, then sets the state
    run = tr.client.get_run(tr.run_id)
    assert run.info.status == "KILLED"
    assert len(run.data.params) == 251 and len(run.data.params["long"]) == 6000
    assert run.data.metrics["m1499"] == 1499.0
    assert [a.path for a in tr.client.list_artifacts(tr.run_id, "config")] == ["config/a.json"]

    again = MLflowTracker(run_dir, experiment_name="t")   # resume: same run, RUNNING again
    assert again.run_id == tr.run_id and again.resumed
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    again.log_params({"train": {"p0": 99}})               # changed param -> tag, not a crash
    assert again.flush(30)
    assert again.client.get_run(again.run_id).data.tags["resume.train.p0"] == "99"
    again.finish("FAILED")
    assert again.client.get_run(again.run_id).info.status == "FAILED"
    assert (run_dir / "mlartifacts").is_dir()

    # a second run in the same process keeps its artefacts in its own folder too
    other = MLflowTracker(tmp_path / "other", experiment_name="t2")
    other.log_artifact(tmp_path / "a.json", "config")
    other.finish()
    assert list((tmp_path / "other" / "mlartifacts").rglob("a.json"))


def test_non_zero_ranks_get_a_null_tracker(tmp_path):
    assert type(make_tracker(1, tmp_path)) is NullTracker
    assert not (tmp_path / "mlflow.db").exists()
