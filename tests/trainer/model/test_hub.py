"""--model.llm-path / --model.whisper-path as hub names: resolved through huggingface_hub's own cache
(laid out from the converted SmolLM2 and Whisper tiny.en: tests/support/hf_cache.py, fixture `offline_cache`)."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import TRAIN, child_env, command, run
from tests.support.hf_cache import LLM_REPO, WHISPER_REPO

pytestmark = pytest.mark.slow


def test_hub_names_resolve_from_the_cache_and_build_the_same_model(offline_cache, pretrained_models):
    from trainer.model.avsr import build_model
    from trainer.model.config import ModelConfig
    from trainer.model.hub import PretrainedNotFound, resolve

    cache, commits = offline_cache
    llm = resolve(LLM_REPO)
    assert (llm.repo_id, llm.commit) == (LLM_REPO, commits[LLM_REPO])
    assert llm.folder == cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / commits[LLM_REPO]
    assert llm.params() == {"source": "hub", "folder": str(llm.folder), "repo_id": LLM_REPO, "revision": "main",
                            "commit": commits[LLM_REPO]}
    assert resolve(LLM_REPO, commits[LLM_REPO]).folder == llm.folder                  # pinned by commit hash
    local = resolve(str(pretrained_models / "SmolLM2-135M-Instruct"))
    assert local.params()["source"] == "local" and local.commit is None
    with pytest.raises(PretrainedNotFound, match=r"--model.llm-path HuggingFaceTB/SmolLM2-135M-Instruct: no such "
                                                 r"folder, and not in the Hugging Face cache .* at revision v9 "
                                                 r"\(HF_HUB_OFFLINE=1: nothing is downloaded\)"):
        resolve(LLM_REPO, "v9")

    def build(**paths):
        torch.manual_seed(0)
        return build_model(ModelConfig(modality="asr", **paths, whisper_pad_to_30s=False)).eval()

    by_name = build(llm_path=LLM_REPO, whisper_path=WHISPER_REPO)
    by_folder = build(llm_path=str(pretrained_models / "SmolLM2-135M-Instruct"),
                      whisper_path=str(pretrained_models / "whisper-tiny.en"))
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_folder.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(by_name.base_llm(ids).logits, by_folder.base_llm(ids).logits)


def _train_py(args, cwd):
    return run(command(TRAIN, *args), env=child_env(RANK="0"), cwd=cwd, timeout=300, ok=False)


def test_a_name_not_in_the_cache_is_one_line_before_any_process_group(offline_cache, tmp_path):
    p = _train_py(["--model.llm-path", "meta-llama/Llama-3.2-1B", "--train.run-dir", str(tmp_path / "run")],
                  tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("error: --model.llm-path meta-llama/Llama-3.2-1B: no such folder, and not in the "
                               f"Hugging Face cache {offline_cache[0]} (HF_HUB_OFFLINE=1: nothing is downloaded); "
                               "fetch it once with `hf download meta-llama/Llama-3.2-1B`"), lines
    assert not (tmp_path / "run").exists()


def test_parsing_pins_the_resolved_commit(offline_cache, tmp_path):
    """experiment.json then names the exact snapshot; a later evaluation reads the same weights."""
    code = ("import json; from trainer.config import parse_args; m = parse_args(['--model.modality', 'asr', "
            f"'--model.llm-path', '{LLM_REPO}', '--model.whisper-path', '{WHISPER_REPO}']).model; "
            "print(json.dumps([m.llm_path, m.llm_revision, m.whisper_path, m.whisper_revision]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env=child_env())
    assert p.returncode == 0, p.stderr[-3000:]
    _, commits = offline_cache
    import json
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [LLM_REPO, commits[LLM_REPO], WHISPER_REPO,
                                                             commits[WHISPER_REPO]]
