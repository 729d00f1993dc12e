"""End to end: real 2-process DeepSpeed ZeRO-3 runs of the tiny model on CPU (gloo).

- the session's uninterrupted run (`trained_run("zero3_2proc")`: the `deepspeed` launcher, sink
  monitoring, MLflow, exports): losses, partitioning, exports, monitor, MLflow;
- the same run as 2 "nodes" of 1 process (two launchers rendezvousing on loopback): the losses of
  1 node of 2;
- a copy of its folder resumed elsewhere: the original is untouched;
- a run from pretrained parts in local folders (Llama, Whisper, official AV-HuBERT keys)
  written by the test, loaded under zero.Init;
- the run again with its shards streamed from a local S3 endpoint (moto's server): the same
  per-step losses as from local files;
- MLflow's database locked by another process mid-run; `accelerate launch`.
Stopped, killed and resumed: tests/e2e/test_resume.py.
"""
import json
import subprocess
import sys
import time

import pytest
import torch

from tests.constants import REPO
from tests.helpers import TINY_STEPS, TRAIN, command, mlflow_losses, mlflow_run, node_commands, train, train_args

pytestmark = pytest.mark.slow
STEPS = TINY_STEPS


@pytest.fixture(scope="module")
def full(trained_run):
    return trained_run("zero3_2proc")


def _train(run_dir, corpus, full, *extra, launcher="torchrun", env=None):
    """The session run's options with `extra` last, under torchrun unless said."""
    return train(run_dir, corpus, *full.spec.args, *extra, launcher=launcher, env=env or full.env())


def test_loss_decreases_and_params_are_partitioned(full):
    losses = mlflow_losses(full.folder)
    assert len(losses) == STEPS
    assert losses[-1] < losses[0], losses
    _, run = mlflow_run(full.folder)
    # ZeRO-3: rank 0 holds about half of every partitioned parameter
    assert 0.3 < run.data.metrics["zero/local_param_fraction"] < 0.7


def test_two_nodes_of_one_train_like_one_node_of_two(full, tmp_path, synth_corpus):
    """Two launchers of one process each, rendezvousing with c10d on loopback as two SLURM nodes would (no
    final evaluation or export: the losses are the point)."""
    two = tmp_path / "two_nodes"
    args = train_args(two, synth_corpus, *full.spec.args, "--train.final-eval-splits", "--train.export-on-finish",
                      "False")
    procs = [subprocess.Popen(cmd, env=full.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in node_commands(TRAIN, *args)]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"training failed:\n{out[-3000:]}\n{err[-6000:]}"
    a, b = mlflow_losses(full.folder), mlflow_losses(two)
    assert len(b) == STEPS
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5), (a, b)


def test_exports_are_non_empty_and_load_with_peft(full):
    from peft import PeftModel
    from safetensors.torch import load_file

    from trainer.engine.checkpoint import seed_everything
    from trainer.model import build_model
    from trainer.model.config import ModelConfig

    trainable = load_file(str(full.folder / "export" / "trainable.safetensors"))
    lora_b = {k: v for k, v in trainable.items() if "lora_B" in k}
    assert lora_b and all(v.numel() > 0 for v in trainable.values())
    assert any(v.abs().sum() > 0 for v in lora_b.values()), "LoRA B is still zero: training did not reach it"

    seed_everything(1234)
    model = build_model(ModelConfig(decorrelation_weight=1.0, tokenizer_path=str(full.folder / "tokenizer")))
    reloaded = PeftModel.from_pretrained(model.llm.get_base_model(), str(full.folder / "export" / "adapters"))
    sd = reloaded.state_dict()
    for name, tensor in lora_b.items():
        suffix = name.split("base_model.model.", 1)[-1]
        match = [k for k in sd if k.endswith(suffix)]
        assert match, name
        torch.testing.assert_close(sd[match[0]].float(), tensor.float())
    consolidated = load_file(str(full.folder / "export" / "model.safetensors"))
    assert consolidated and all(t.numel() > 0 for t in consolidated.values())


def test_monitor_ran_under_zero3_and_logged_figures(full):
    client, run = mlflow_run(full.folder)
    assert "sinks/bos_sink_head_frac_mean" in run.data.metrics
    hist = client.get_metric_history(run.info.run_id, "sinks/bos_sink_head_frac_mean")
    assert sorted(m.step for m in hist) == [0, 3, 6]           # step 0: before training, then every 3
    files = [a.path for a in client.list_artifacts(run.info.run_id, "sinks/step_0000003")]
    assert any(f.endswith(".png") for f in files) and any(f.endswith(".json") for f in files)


def test_mlflow_run_has_params_metrics_artifacts(full):
    client, run = mlflow_run(full.folder)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == str(STEPS)
    for key in ("train/ce_loss", "train/dec_loss_raw", "train/lr", "train/grad_norm", "perf/samples_per_s",
                "perf/tokens_per_s", "val/avsr/wer"):
        assert key in run.data.metrics, key
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "export", "results.json", "sinks"} <= top
    results = json.loads((full.folder / "results.json").read_text())
    assert 0 <= results["val"]["wer"] and results["val"]["num_utterances"] > 0


def test_mlflow_run_page_has_kind_description_source_and_datasets(full, synth_corpus):
    from trainer.data.shard_format import load_index

    client, run = mlflow_run(full.folder)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"     # not the GenAI view
    tags = run.data.tags
    assert "launch/train.py" in tags["mlflow.note.content"] and "--train.max-steps" in tags["mlflow.note.content"]
    assert tags["mlflow.source.name"].endswith("train.py")
    assert len(tags["mlflow.source.git.commit"]) == 40
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {f"{synth_corpus.name}/train", f"{synth_corpus.name}/val", f"{synth_corpus.name}/test"}
    train = inputs[f"{synth_corpus.name}/train"]
    assert json.loads(train.dataset.profile)["num_rows"] == load_index(synth_corpus, "train").num_samples
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"


def test_a_copied_run_folder_resumes_without_touching_the_original(full, tmp_path, synth_corpus):
    import hashlib

    copy = full.copy(tmp_path / "moved" / "copy")

    def snapshot(folder):
        return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot(full.folder)
    _train(copy, synth_corpus, full)     # resumes at the last step: final evaluation, export, MLflow artefacts
    assert snapshot(full.folder) == before, "resuming a copy changed the original run folder"
    client, run = mlflow_run(copy)
    assert run.info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri())
    assert run.info.status == "FINISHED"


def test_pretrained_parts_from_local_folders_load_under_zero3(full, tmp_path, synth_corpus):
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperModel

    from tests.trainer.model.test_avhubert import official_tiny_state_dict
    from trainer.data.text import iter_transcripts
    from trainer.model.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    llm_dir, whisper_dir, av_path = tmp_path / "llama", tmp_path / "whisper", tmp_path / "avhubert_large.pt"
    tok = train_bpe_tokenizer(iter_transcripts(str(synth_corpus), "train"), vocab_size=200)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    WhisperModel(WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_source_positions=200)).save_pretrained(whisper_dir)
    torch.save({"model": official_tiny_state_dict()}, av_path)

    run = tmp_path / "pretrained"
    _train(run, synth_corpus, full, "--model.llm-path", str(llm_dir), "--model.whisper-path", str(whisper_dir),
           "--model.avhubert-path", str(av_path), "--monitor.every", "0", "--train.final-eval-splits",
           "--train.max-steps", "2", "--train.save-every", "0")
    _, mrun = mlflow_run(run)
    assert mrun.info.status == "FINISHED"
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"step", "data_skipped"} and results["step"] == 2     # no end-of-run evaluation
    assert not (run / "eval").exists()
    assert 0.3 < mrun.data.metrics["zero/local_param_fraction"] < 0.7
    # the frozen base in the consolidated export is the pretrained one, not a fresh init
    from safetensors.torch import load_file
    consolidated = load_file(str(run / "export" / "model.safetensors"))
    key = [k for k in consolidated if k.endswith("layers.1.mlp.down_proj.weight") and k.startswith("llm.")]
    assert key, sorted(consolidated)[:10]
    torch.testing.assert_close(consolidated[key[0]].float(), llm.model.layers[1].mlp.down_proj.weight)


def test_training_goes_on_while_another_process_locks_mlflow_db(full, tmp_path, synth_corpus):
    """The issue's fault: another process holds an exclusive lock on mlflow.db mid-run, longer than
    MLflow's 20 s busy timeout. Training must finish, and every step must reach the store after."""
    run = tmp_path / "locked"
    out = open(tmp_path / "train.log", "w")
    cmd = command(TRAIN, *train_args(run, synth_corpus, *full.spec.args, "--monitor.every", "0", "--train.save-every",
                                     "0", "--tracking.exit-timeout-s", "120"),   # wait out the 30 s lock at exit
                  launcher="torchrun")
    proc = subprocess.Popen(cmd, env=full.env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (run / "mlflow_run.json").exists():          # the tracker is up; params come next
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-4000:]
            time.sleep(0.2)
        holder = subprocess.run([sys.executable, "-c", (
            "import sqlite3, time\n"
            f"c = sqlite3.connect({str(run / 'mlflow.db')!r}, timeout=60, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); time.sleep(30); c.execute('ROLLBACK')\n")], timeout=120)
        assert holder.returncode == 0
        assert proc.wait(600) == 0, (tmp_path / "train.log").read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "train.log").read_text()
    assert "MLflow store not answering" in log and "database is locked" in log, log[-4000:]
    client, mrun = mlflow_run(run)
    assert mrun.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")) == \
        list(range(1, STEPS + 1))
    assert not (run / "tracking" / "undelivered.jsonl").exists()


def test_streaming_from_s3_gives_the_same_losses_as_local_files(full, tmp_path, synth_corpus):
    """The uninterrupted run again, its shards (train, the monitor's probe batch, eval) streamed from a
    local S3 endpoint started here and stopped by PID; credentials and endpoint from the environment."""
    import boto3

    from tests.support.remote_servers import s3_env, start_moto
    moto = start_moto(tmp_path)
    try:
        env = s3_env(moto.url)
        s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="corpus")
        for path in sorted(synth_corpus.iterdir()):
            s3.upload_file(str(path), "corpus", f"synth/{path.name}")
        streamed = tmp_path / "s3"
        _train(streamed, "s3://corpus/synth", full, env=full.env(**env))
    finally:
        moto.stop()
    a, b = mlflow_losses(full.folder), mlflow_losses(streamed)
    assert len(b) == STEPS
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5), (a, b)
    _, run = mlflow_run(streamed)
    assert run.data.params["data.shard_dir"] == "s3://corpus/synth"
    assert not any("testing" in v for v in run.data.params.values())        # no credential in the params


def test_accelerate_launch_runs_the_trainer(full, tmp_path, synth_corpus):
    """`accelerate launch --use_deepspeed` (the reason accelerate is a declared dependency beside
    transformers' HfDeepSpeedConfig, which is accelerate's class): two ZeRO-3 ranks, partitioned."""
    run = tmp_path / "accelerate"
    _train(run, synth_corpus, full, "--train.max-steps", "2", "--train.save-every", "0", "--train.final-eval-splits",
           "--train.export-on-finish", "False", "--monitor.every", "0", launcher="accelerate")
    client, mrun = mlflow_run(run)
    assert mrun.data.params["world_size"] == "2"
    assert 0.3 < mrun.data.metrics["zero/local_param_fraction"] < 0.7
    assert len(client.get_metric_history(mrun.info.run_id, "train/loss")) == 2
