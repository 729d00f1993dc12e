"""Unit tests of the engine parts that need no model: DeepSpeed config, tracking, data stream."""
import json

import pytest
import torch

from tests.constants import REPO
from trainer.data.stream import TrainStream
from trainer.engine.ds_config import DeepSpeedConfigError, load_ds_config, resolve_ds_config
from trainer.tracking.tracker import MLflowTracker, NullTracker, flatten, make_tracker

COMMON = dict(hidden_size=64, micro_batch_size=8, grad_accum=2, grad_clip=1.0, lr=1e-3, weight_decay=0.01,
              total_steps=100, warmup_steps=10, min_lr_ratio=0.1, bf16=False, on_cpu=True)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_configs_resolve_fully(name):
    cfg = resolve_ds_config(load_ds_config(REPO / "ds_configs" / name), **COMMON)
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["optimizer"]["params"]["lr"] == 1e-3
    assert "scheduler" not in cfg           # the trainer builds its own (trainer/engine/schedule.py)
    assert cfg["bf16"]["enabled"] is False
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        assert zero["stage3_param_persistence_threshold"] == 640
    # CPU without optimizer offload: plain torch AdamW (no op compile); offload keeps DeepSpeed's CPU Adam
    assert cfg["optimizer"]["params"].get("torch_adam", False) == ("offload_optimizer" not in zero)
    assert "auto" not in json.dumps(cfg)


def test_explicit_value_conflicting_with_experiment_is_an_error():
    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    raw["gradient_accumulation_steps"] = 4
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps"):
        resolve_ds_config(raw, **COMMON)
    raw["gradient_accumulation_steps"] = 2          # agreeing explicit value is kept
    assert resolve_ds_config(raw, **COMMON)["gradient_accumulation_steps"] == 2


def test_a_users_deepspeed_scheduler_gets_its_auto_values_filled():
    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    raw["scheduler"] = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                              "cos_min_ratio": "auto"}}
    params = resolve_ds_config(raw, **COMMON)["scheduler"]["params"]
    assert params == {"total_num_steps": 100, "warmup_num_steps": 10, "cos_min_ratio": 0.1}


def test_unknown_auto_is_reported_with_its_path():
    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    raw["zero_optimization"]["sub_group_size"] = "auto"
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.sub_group_size"):
        resolve_ds_config(raw, **COMMON)


def test_a_json_that_does_not_parse_is_one_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        load_ds_config(bad)


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


def _loader_factory(sizes):
    def make(epoch):   # epoch e yields sizes[e % len] batches, each tagged with (epoch, i)
        return iter([{"id": (epoch, i), "skipped": {"bad_video": 1}} for i in range(sizes[epoch % len(sizes)])])
    return make


def test_train_stream_rolls_epochs_and_resumes_exactly():
    make = _loader_factory([3, 2])
    full = TrainStream(make)
    seen = [next(full)["id"] for _ in range(7)]
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert full.pop_skipped() == {"bad_video": 7} and full.pop_skipped() == {}

    part = TrainStream(make)
    for _ in range(4):
        next(part)
    resumed = TrainStream.from_state(make, part.state())
    assert [next(resumed)["id"] for _ in range(3)] == seen[4:]

    fresh = TrainStream.from_state(make, part.state(), fast_forward=False)
    assert next(fresh)["id"] == (2, 0)      # next epoch, not a replay


class _EchoModel(torch.nn.Module):
    """Decodes every utterance as its reference except keys listed in `wrong`."""

    def __init__(self, wrong=()):
        super().__init__()
        self.wrong = set(wrong)

    def generate(self, batch, **_):
        """Token ids, as the model returns them: here the UTF-8 bytes of the text (BYTES decodes them)."""
        return [list(("x" if k in self.wrong else t).encode()) for k, t in zip(batch["keys"], batch["text"])]


class BYTES:
    """A tokenizer stand-in whose ids are UTF-8 bytes."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return bytes(ids).decode()


def test_evaluate_wer_caps_samples_and_writes_report(tmp_path):
    from trainer.engine.evaluate import evaluate_wer

    batches = [{"keys": [f"u{i}{j}" for j in range(4)], "text": ["a b"] * 4} for i in range(3)]
    model = _EchoModel(wrong={"u00"})
    model.train()
    report = tmp_path / "eval.json"
    res = evaluate_wer(model, batches, tokenizer=BYTES, device=torch.device("cpu"), to_device=lambda b: b, num_beams=1,
                       max_new_tokens=8, synced_gpus=False, max_samples=6, report_path=report)
    assert res["num_utterances"] == 6 and res["ref_words"] == 12
    assert res["wer"] == pytest.approx(2 / 12)              # "x" for "a b": one substitution, one deletion
    assert model.training                                    # train mode restored
    rows = json.loads(report.read_text())["utterances"]
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows) and len(rows) == 6
    full = evaluate_wer(_EchoModel(), batches, tokenizer=BYTES, device=torch.device("cpu"), to_device=lambda b: b, num_beams=1,
                        max_new_tokens=8, synced_gpus=False)
    assert full["num_utterances"] == 12 and full["wer"] == 0


class _NllEcho(_EchoModel):
    """Echo decoding plus a teacher-forced pass: each utterance's summed CE is its key's last digit,
    over len(transcript_ids) + 1 target tokens."""

    def target_nll(self, batch):
        assert "transcript_ids" in batch          # the references are tokenized for the loss pass
        return (torch.tensor([float(k[-1]) for k in batch["keys"]]),
                torch.tensor([len(t) + 1 for t in batch["transcript_ids"]]))


def test_evaluation_reports_per_utterance_counts_and_the_loss_per_token(tmp_path, monkeypatch):
    from trainer.engine import evaluate
    from trainer.model import prompt_text

    monkeypatch.setattr(prompt_text, "with_transcript_ids",
                        lambda tok, b: {**b, "transcript_ids": [list(t.encode()) for t in b["text"]]})
    batches = [{"keys": [f"u{i}{j}" for j in range(2)], "text": ["a b", "c d e"]} for i in range(2)]
    report = tmp_path / "eval.json"
    res = evaluate.evaluate_wer(_NllEcho(wrong={"u01"}), batches, tokenizer=BYTES, device=torch.device("cpu"),
                                to_device=lambda b: b, num_beams=1, max_new_tokens=8, synced_gpus=False,
                                report_path=report, loss=True)
    rows = {r["key"]: r for r in json.loads(report.read_text())["utterances"]}
    assert rows["u01"]["word_errors"] == 3 and rows["u01"]["ref_words"] == 3       # "x" for "c d e"
    assert rows["u00"]["word_errors"] == 0 and rows["u00"]["ref_words"] == 2
    assert sum(r["word_errors"] for r in rows.values()) / sum(r["ref_words"] for r in rows.values()) == res["wer"]
    assert rows["u11"]["nll"] == 1.0 and rows["u11"]["target_tokens"] == 6
    # CE sums 0 + 1 + 0 + 1 over 4 + 6 + 4 + 6 target tokens
    assert res["loss_per_token"] == pytest.approx(2 / 20) and res["target_tokens"] == 20
    only = evaluate.evaluate_loss(_NllEcho(), batches, tokenizer=BYTES, device=torch.device("cpu"),
                                  to_device=lambda b: b, max_samples=2)
    assert only["loss_per_token"] == pytest.approx(1 / 10) and "wer" not in only and only["num_utterances"] == 2


def test_evaluate_wer_stops_at_once_on_a_stop_signal(tmp_path):
    """A SLURM time-limit signal during a long eval: the next batch is not decoded, nothing is reported,
    train mode is restored, and the trainer gets EvalInterrupted to checkpoint and exit."""
    from trainer.engine.evaluate import EvalInterrupted, evaluate_wer

    batches = [{"keys": [f"u{i}{j}" for j in range(4)], "text": ["a b"] * 4} for i in range(3)]
    model = _EchoModel()
    model.train()
    calls = []
    original = model.generate
    model.generate = lambda batch, **kw: calls.append(batch["keys"][0]) or original(batch, **kw)
    report = tmp_path / "eval.json"
    with pytest.raises(EvalInterrupted, match="after 4 utterances"):
        evaluate_wer(model, batches, tokenizer=BYTES, device=torch.device("cpu"), to_device=lambda b: b, num_beams=1,
                     max_new_tokens=8, synced_gpus=False, report_path=report,
                     stop_requested=lambda: len(calls) >= 1)     # the signal lands during batch 1
    assert calls == ["u00"] and model.training and not report.exists()


def test_a_run_folder_with_checkpoints_is_continued_never_restarted(tmp_path):
    from trainer.engine.checkpoint import LATEST, MANIFEST as MARKER, CheckpointManager

    mgr = CheckpointManager(tmp_path / "run", keep_last=2, rank=0, world_size=1)
    for resume in ("auto", "never"):
        mgr.check_start(resume)                         # an empty run folder: anything goes
    done = mgr.root / "step_00000200"
    done.mkdir(parents=True)
    (done / MARKER).write_text("ok\n")
    (mgr.root / LATEST).write_text("step_00000200\n")
    mgr.check_start("auto")
    mgr.check_start(str(done))                          # one of its own checkpoints
    mgr.check_start(str(mgr.root))
    with pytest.raises(FileExistsError, match="already holds a run .*step_00000200.*--train.resume auto"):
        mgr.check_start("never")
    other = tmp_path / "other" / "checkpoints" / "step_00000100"
    other.mkdir(parents=True)
    (other / MARKER).write_text("ok\n")
    with pytest.raises(FileExistsError, match="own --train.run-dir"):
        mgr.check_start(str(other))                     # warm-starting from another run, into this one
    assert (done / MARKER).is_file()                    # nothing was touched
