"""End to end: real 2-process DeepSpeed ZeRO-3 runs of the tiny model on CPU (gloo).

- an uninterrupted run (with sink monitoring on), started by the `deepspeed` launcher;
- the same run under torchrun, stopped at step 3 and resumed: per-step losses must match;
- the same run as 2 "nodes" of 1 process (two launchers rendezvousing on loopback), also
  stopped and resumed: must match 1 node of 2;
- a run from pretrained parts in local folders (Llama, Whisper, official AV-HuBERT keys)
  written by the test, loaded under zero.Init;
- the uninterrupted run again with its shards streamed from a local S3 endpoint (moto's server):
  the same per-step losses as from local files.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.constants import REPO

pytestmark = pytest.mark.slow
STEPS = 6
COMMON = ["--train.device", "cpu", "--data.num-workers", "1", "--data.max-frames-per-batch", "600", "--data.max-batch-size", "4",
          "--data.batches-per-epoch", "4", "--train.max-steps", str(STEPS), "--train.log-every", "1",
          "--train.warmup-steps", "1", "--train.lr", "3e-3", "--train.save-every", "3",
          "--train.eval-max-new-tokens", "6", "--train.test-at-end", "False", "--train.eval-untrained", "False",
          "--model.decorrelation-weight", "1.0", "--monitor.every", "3", "--monitor.probe-batch-size", "2"]


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MLFLOW_EXPERIMENT_NAME": "e2e", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _train_args(run_dir: Path, corpus: Path | str, extra) -> list[str]:
    return [str(REPO / "launch" / "train.py"), "--config", str(REPO / "ds_configs" / "zero3.json"),
            "--data.shard-dir", str(corpus), "--train.run-dir", str(run_dir), *COMMON, *extra]


def _check(proc_out: tuple[int, str, str]) -> None:
    code, out, err = proc_out
    assert code == 0, f"training failed:\n{out[-3000:]}\n{err[-6000:]}"


def _train(run_dir: Path, corpus: Path | str, *extra: str, launcher: str = "torchrun", env: dict | None = None) -> None:
    """One node, two processes, started by torchrun, `accelerate launch` or the `deepspeed` launcher as the
    README has it (`deepspeed --num_gpus 2 launch/train.py --config ds_configs/zero3.json ...`,
    which passes --local_rank to the script)."""
    if launcher == "accelerate":        # README/ENV.md: accelerate's DeepSpeed launcher starts the trainer too
        accelerate_bin = Path(sys.executable).with_name("accelerate")
        cmd = [str(accelerate_bin), "launch", "--num_processes", "2", "--main_process_port", str(_free_port()),
               "--use_deepspeed", "--deepspeed_config_file", str(REPO / "ds_configs" / "zero3.json"),
               *_train_args(run_dir, corpus, extra)]
    elif launcher == "deepspeed":
        deepspeed_bin = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed_bin), "--num_gpus", "2", "--master_port", str(_free_port()),
               *_train_args(run_dir, corpus, extra)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *_train_args(run_dir, corpus, extra)]
    p = subprocess.run(cmd, env=_env(**(env or {})), cwd=REPO, capture_output=True, text=True, timeout=600)
    _check((p.returncode, p.stdout, p.stderr))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_nodes(run_dir: Path, corpus: Path, *extra: str) -> None:
    """Two launchers of one process each, rendezvousing with c10d on loopback, as two SLURM nodes would."""
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=e2e", *_train_args(run_dir, corpus, extra)]
        procs.append(subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        out, err = p.communicate(timeout=600)
        _check((p.returncode, out, err))


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return client, client.get_run(run_id)


def _losses(run_dir: Path) -> list[float]:
    client, run = _mlflow(run_dir)
    hist = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return [m.value for m in hist]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_corpus):
    root = tmp_path_factory.mktemp("zero3")
    full, resumed = root / "full", root / "resumed"
    _train(full, synth_corpus, launcher="deepspeed")       # the uninterrupted run: the users' launcher
    _train(resumed, synth_corpus, "--train.stop-after", "3")
    # a stop_after run ends like a stopped one: KILLED in MLflow, resumable
    first_half = {"losses": _losses(resumed), "status": _mlflow(resumed)[1].info.status}
    _train(resumed, synth_corpus)
    return full, resumed, first_half


def test_loss_decreases_and_params_are_partitioned(runs):
    full, _, _ = runs
    losses = _losses(full)
    assert len(losses) == STEPS
    assert losses[-1] < losses[0], losses
    _, run = _mlflow(full)
    # ZeRO-3: rank 0 holds about half of every partitioned parameter
    assert 0.3 < run.data.metrics["zero/local_param_fraction"] < 0.7


def test_resume_reproduces_the_uninterrupted_losses(runs):
    full, resumed, first_half = runs
    assert len(first_half["losses"]) == 3 and first_half["status"] == "KILLED"
    a, b = _losses(full), _losses(resumed)
    assert len(b) == STEPS
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5), (a, b)
    ckpts = sorted(p.name for p in (resumed / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_same_command_same_losses_and_wer(runs, tmp_path, synth_corpus):
    """The uninterrupted run's command again, in another folder: on CPU every per-step loss and the
    validation decode are identical, not just close (same seeds, same data order, gloo's fixed
    reduction order, the same thread count)."""
    full, _, _ = runs
    again = tmp_path / "again"
    _train(again, synth_corpus, launcher="deepspeed")
    assert _losses(again) == _losses(full)
    a, b = (json.loads((d / "results.json").read_text())["val"] for d in (full, again))
    assert {k: v for k, v in a.items() if k != "eval_time_s"} == {k: v for k, v in b.items() if k != "eval_time_s"}
    hyps = [json.loads(p.read_text())["utterances"] for d in (full, again) for p in sorted((d / "eval").glob("val_*"))]
    assert hyps[0] == hyps[1] and len(hyps) == 2


def test_two_nodes_of_one_train_and_resume_like_one_node_of_two(runs, tmp_path, synth_corpus):
    full, _, _ = runs
    two = tmp_path / "two_nodes"
    _train_two_nodes(two, synth_corpus, "--train.stop-after", "3")
    _train_two_nodes(two, synth_corpus)
    a, b = _losses(full), _losses(two)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5), (a, b)


def test_exports_are_non_empty_and_load_with_peft(runs):
    from peft import PeftModel
    from safetensors.torch import load_file

    from trainer.engine.checkpoint import seed_everything
    from trainer.model import build_model
    from trainer.model.config import ModelConfig

    full, _, _ = runs
    trainable = load_file(str(full / "export" / "trainable.safetensors"))
    lora_b = {k: v for k, v in trainable.items() if "lora_B" in k}
    assert lora_b and all(v.numel() > 0 for v in trainable.values())
    assert any(v.abs().sum() > 0 for v in lora_b.values()), "LoRA B is still zero: training did not reach it"

    seed_everything(1234)
    model = build_model(ModelConfig(decorrelation_weight=1.0, tokenizer_path=str(full / "tokenizer")))
    reloaded = PeftModel.from_pretrained(model.llm.get_base_model(), str(full / "export" / "adapters"))
    sd = reloaded.state_dict()
    for name, tensor in lora_b.items():
        suffix = name.split("base_model.model.", 1)[-1]
        match = [k for k in sd if k.endswith(suffix)]
        assert match, name
        torch.testing.assert_close(sd[match[0]].float(), tensor.float())
    consolidated = load_file(str(full / "export" / "model.safetensors"))
    assert consolidated and all(t.numel() > 0 for t in consolidated.values())


def test_monitor_ran_under_zero3_and_logged_figures(runs):
    full, _, _ = runs
    client, run = _mlflow(full)
    assert "sinks/bos_sink_head_frac_mean" in run.data.metrics
    hist = client.get_metric_history(run.info.run_id, "sinks/bos_sink_head_frac_mean")
    assert sorted(m.step for m in hist) == [0, 3, 6]           # step 0: before training, then every 3
    files = [a.path for a in client.list_artifacts(run.info.run_id, "sinks/step_0000003")]
    assert any(f.endswith(".png") for f in files) and any(f.endswith(".json") for f in files)


def test_mlflow_run_has_params_metrics_artifacts(runs):
    full, resumed, _ = runs
    client, run = _mlflow(full)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == str(STEPS)
    for key in ("train/ce_loss", "train/dec_loss_raw", "train/lr", "train/grad_norm", "perf/samples_per_s",
                "perf/tokens_per_s", "val/avsr/wer"):
        assert key in run.data.metrics, key
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "export", "results.json", "sinks"} <= top
    results = json.loads((full / "results.json").read_text())
    assert 0 <= results["val"]["wer"] and results["val"]["num_utterances"] > 0
    rclient, rrun = _mlflow(resumed)        # the resumed job reattached to one MLflow run
    assert rrun.info.status == "FINISHED"
    rsteps = [m.step for m in rclient.get_metric_history(rrun.info.run_id, "train/loss")]
    assert sorted(rsteps) == list(range(1, STEPS + 1))      # each step once across the two attempts


def test_mlflow_run_page_has_kind_description_source_and_datasets(runs, synth_corpus):
    from trainer.data.shard_format import load_index

    full, _, _ = runs
    client, run = _mlflow(full)
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


def test_a_copied_run_folder_resumes_without_touching_the_original(runs, tmp_path, synth_corpus):
    import hashlib
    import shutil

    full, _, _ = runs
    copy = tmp_path / "moved" / "copy"
    shutil.copytree(full, copy)

    def snapshot(folder):
        return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot(full)
    _train(copy, synth_corpus)          # resumes at the last step: final evaluation, export, MLflow artefacts
    assert snapshot(full) == before, "resuming a copy changed the original run folder"
    client, run = _mlflow(copy)
    assert run.info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri())
    assert run.info.status == "FINISHED"


def test_pretrained_parts_from_local_folders_load_under_zero3(tmp_path, synth_corpus):
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
    _train(run, synth_corpus, "--model.llm-path", str(llm_dir), "--model.whisper-path", str(whisper_dir),
           "--model.avhubert-path", str(av_path), "--monitor.every", "0", "--train.final-eval", "False")
    _, mrun = _mlflow(run)
    assert mrun.info.status == "FINISHED"
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"step", "data_skipped"} and results["step"] == STEPS     # no end-of-run evaluation
    assert not (run / "eval").exists()
    assert 0.3 < mrun.data.metrics["zero/local_param_fraction"] < 0.7
    # the frozen base in the consolidated export is the pretrained one, not a fresh init
    from safetensors.torch import load_file
    consolidated = load_file(str(run / "export" / "model.safetensors"))
    key = [k for k in consolidated if k.endswith("layers.1.mlp.down_proj.weight") and k.startswith("llm.")]
    assert key, sorted(consolidated)[:10]
    torch.testing.assert_close(consolidated[key[0]].float(), llm.model.layers[1].mlp.down_proj.weight)


def test_training_goes_on_while_another_process_locks_mlflow_db(tmp_path, synth_corpus):
    """The issue's fault: another process holds an exclusive lock on mlflow.db mid-run, longer than
    MLflow's 20 s busy timeout. Training must finish, and every step must reach the store after."""
    import time

    run = tmp_path / "locked"
    out = open(tmp_path / "train.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_train_args(run, synth_corpus, ["--monitor.every", "0", "--train.save-every", "0",
                                            # wait out the 30 s lock at exit (a quick run ends inside it)
                                            "--tracking.exit-timeout-s", "120"])]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
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
    client, mrun = _mlflow(run)
    assert mrun.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")) == \
        list(range(1, STEPS + 1))
    assert not (run / "tracking" / "undelivered.jsonl").exists()


def test_streaming_from_s3_gives_the_same_losses_as_local_files(runs, tmp_path, synth_corpus):
    """The uninterrupted run again, its shards (train, the monitor's probe batch, eval) streamed from a
    local S3 endpoint started here and stopped by PID; credentials and endpoint from the environment."""
    import boto3

    from tests.support.remote_servers import s3_env, start_moto
    full, _, _ = runs
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
        _train(streamed, "s3://corpus/synth", env=env)
    finally:
        moto.stop()
    a, b = _losses(full), _losses(streamed)
    assert len(b) == STEPS
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5), (a, b)
    _, run = _mlflow(streamed)
    assert run.data.params["data.shard_dir"] == "s3://corpus/synth"
    assert not any("testing" in v for v in run.data.params.values())        # no credential in the params


def test_accelerate_launch_runs_the_trainer(tmp_path, synth_corpus):
    """`accelerate launch --use_deepspeed` (the reason accelerate is a declared dependency beside
    transformers' HfDeepSpeedConfig, which is accelerate's class): two ZeRO-3 ranks, partitioned."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "accelerate"
    _train(run, synth_corpus, "--train.max-steps", "2", "--train.save-every", "0", "--train.final-eval", "False",
           "--train.export-on-finish", "False", "--monitor.every", "0", launcher="accelerate")
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    assert client.get_run(run_id).data.params["world_size"] == "2"
    assert 0.3 < client.get_run(run_id).data.metrics["zero/local_param_fraction"] < 0.7
    assert len(client.get_metric_history(run_id, "train/loss")) == 2
