"""A mini real run's exports used without the trainer (docs/exports.md): `export/adapters` loaded with
plain peft onto SmolLM2 gives the trainer's LLM logits; the projector and delimiter rows of
`trainable.safetensors` work in plain torch. The run takes the LLM and Whisper by hub name from an
offline Hugging Face cache, so MLflow's record of the resolved commit is checked here too."""
import json

import pytest
import torch

from tests.constants import REPO
from tests.helpers import child_env, train
from tests.support.hf_cache import LLM_REPO, WHISPER_REPO

pytestmark = pytest.mark.slow


@pytest.fixture()
def mini_run(offline_cache, synth_corpus, tmp_path):
    run = tmp_path / "mini"
    train(run, synth_corpus, "--recipe", str(REPO / "launch" / "recipes" / "mini_asr.yaml"),
          "--model.llm-path", LLM_REPO, "--model.whisper-path", WHISPER_REPO,
          "--data.max-frames-per-batch", "200", "--data.max-batch-size", "2", "--data.batches-per-epoch", "3",
          "--train.max-steps", "3", "--train.warmup-steps", "1", "--train.lr", "1e-2", "--train.final-eval-splits",
          "--train.eval-untrained", "False", "--monitor.every", "0", env=child_env(DS_ACCELERATOR="cpu"), cwd=tmp_path)
    return run, offline_cache[1]


def test_exports_work_with_plain_transformers_and_peft(mini_run, pretrained_models):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainer.run_folder.load import load_trained_model

    run, commits = mini_run
    export = run / "export"
    assert {p.name for p in export.iterdir()} >= {"adapters", "trainable.safetensors", "model.safetensors"}
    trained, cfg, _ = load_trained_model(run, "export")
    assert cfg.model.llm_revision == commits[LLM_REPO]                   # the run pinned what it resolved

    # docs/exports.md, step by step: the base by name (here its snapshot folder), the adapters with peft
    base = AutoModelForCausalLM.from_pretrained(pretrained_models / "SmolLM2-135M-Instruct")
    vocab = base.config.vocab_size
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2], [17, 8, 1001, 4, 4, 93, 600]])
    with torch.no_grad():
        before = base(ids).logits
        llm = PeftModel.from_pretrained(base, export / "adapters").eval()
        plain = llm(ids).logits
        ours = trained.llm(ids).logits[..., :vocab]      # the trainer's LLM also has rows for its 5 special tokens
    assert torch.allclose(plain, ours, atol=1e-4, rtol=1e-4), (plain - ours).abs().max()
    assert (plain - before).abs().max() > 1e-3                                  # the adapters changed something

    weights = load_file(export / "trainable.safetensors")
    projector = torch.nn.Sequential(torch.nn.Linear(*weights["audio_projector.fc1.weight"].shape[::-1]),
                                    torch.nn.ReLU(),
                                    torch.nn.Linear(*weights["audio_projector.fc2.weight"].shape[::-1]))
    projector.load_state_dict({"0.weight": weights["audio_projector.fc1.weight"],
                               "0.bias": weights["audio_projector.fc1.bias"],
                               "2.weight": weights["audio_projector.fc2.weight"],
                               "2.bias": weights["audio_projector.fc2.bias"]})
    k = cfg.model.audio_rate
    frames = torch.randn(1, 8 * k, trained.audio_encoder.out_dim)
    with torch.no_grad():
        expected, _ = trained.audio_projector(frames, torch.tensor([8 * k]))
        got = projector(frames.reshape(1, 8, -1))                  # "stack": k consecutive frames side by side
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(weights["delimiter_embeddings.weight"], trained.delimiter_embeddings.weight.detach())

    from mlflow.tracking import MlflowClient
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    params = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}").get_run(run_id).data.params
    assert params["pretrained.llm.repo_id"] == LLM_REPO and params["pretrained.llm.commit"] == commits[LLM_REPO]
    assert params["pretrained.whisper.commit"] == commits[WHISPER_REPO]
    assert params["model.llm_revision"] == commits[LLM_REPO]
