"""ZeRO-3 training steps on 2 processes with the real pretrained parts (launch/recipes/mini_avsr.yaml):
SmolLM2-135M-Instruct (frozen, LoRA) and Whisper tiny.en's encoder (clip-length frames), converted
by data_tools.pretrained (session fixture `pretrained_models`), on the session's synthetic corpus."""
import json

import pytest

from tests.constants import REPO
from tests.helpers import child_env, train

pytestmark = pytest.mark.slow


def test_mini_avsr_trains_under_zero3_with_the_real_parts(pretrained_models, synth_corpus, tmp_path):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "mini"
    train(run, synth_corpus, "--recipe", str(REPO / "launch" / "recipes" / "mini_avsr.yaml"),
          "--model.llm-path", str(pretrained_models / "SmolLM2-135M-Instruct"),
          "--model.whisper-path", str(pretrained_models / "whisper-tiny.en"), "--train.device", "cpu",
          "--data.max-frames-per-batch", "200", "--data.max-batch-size", "2", "--data.batches-per-epoch", "3",
          "--train.max-steps", "2", "--train.warmup-steps", "1", "--train.log-every", "1",
          "--train.eval-untrained", "False", "--train.final-eval-splits", "val", "--train.eval-max-new-tokens", "3",
          "--train.export-on-finish", "False", "--monitor.every", "2", "--monitor.probe-batch-size", "1",
          "--monitor.figures", "False", env=child_env(MLFLOW_EXPERIMENT_NAME="real_parts"), cwd=tmp_path)

    exp = json.loads((run / "experiment.json").read_text())
    assert exp["model"]["modality_order"] == ["audio", "video"] and exp["model"]["whisper_pad_to_30s"] is False
    ids = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")          # the run folder's own store
    metrics = client.get_run(ids["run_id"]).data.metrics
    assert 0.3 < metrics["zero/local_param_fraction"] < 0.7            # really partitioned over 2 ranks
    losses = [m.value for m in client.get_metric_history(ids["run_id"], "train/loss")]
    assert len(losses) == 2 and all(0 < x < 50 for x in losses)
    # step 0: the pretrained SmolLM2 under the paper's prompt: BOS, <audio>, ...; BOS is a sink in most
    # middle layers (a randomly initialised LLM has no such sink: the real weights were loaded)
    step0 = json.loads((run / "sinks" / "step_0000000" / "report.json").read_text())
    assert step0["token_roles"][0][:2] == [1, 2]
    middle = step0["layers"][2:-2]
    assert sum(lay["bos_sink_head_frac"] > 0.5 for lay in middle) >= 0.75 * len(middle)
    assert (run / "sinks" / "step_0000002" / "report.json").is_file()
