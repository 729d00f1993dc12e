"""launch/analyze_sinks.py end to end on CPU.

- text-only mode on a tiny local transformers Llama with a planted sink (as in test_monitor.py),
  saved with its own tokenizer: the report finds BOS and '.' as sinks fed by a massive feature;
- run mode on the session's 1-process ZeRO-3 run of 6 steps: the offline report from its last
  checkpoint equals the trainer's own probe at that step; the consolidated export and another
  split work; trainable-only weights are refused (the random frozen base is not reproducible);
- clear errors for a missing run folder, checkpoint, shard set or split.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from tests.trainer.monitor.test_monitor import J, MASSIVE_LAYER, R, S, plant_sink, tiny_llama
from tests.constants import REPO
from tests.helpers import TINY_STEPS, command, run

SCRIPT = REPO / "launch" / "analyze_sinks.py"
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "sat", "on", "mat", ".", "a", "dog", "ran", "home"]
PNG = b"\x89PNG\r\n\x1a\n"


def _analyze(*args: str, cwd: Path):
    return run(command(SCRIPT, *args), cwd=cwd, timeout=300)


def _script_main():
    spec = importlib.util.spec_from_file_location("analyze_sinks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _same(a, b, path="") -> None:
    """Equal JSON trees, floats to a relative 1e-4 or 2e-5 absolute: report.json rounds cosines to 5
    decimals, so two runs that differ in the 7th digit can differ by one rounding step (1e-5) there."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=2e-5), (path, a, b)
    else:
        assert a == b, (path, a, b)


# --------------------------------------------------------------------------- text-only mode
def write_planted_lm(folder: Path) -> None:
    """A tiny Llama whose layer-1 MLP writes a massive feature J on tokens carrying the S marker
    (BOS and '.'), which later layers' heads all attend to; a word-level tokenizer beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    model = tiny_llama(vocab_size=len(WORDS))
    plant_sink(model)
    with torch.no_grad():                      # embeddings like test_monitor.make_inputs
        emb = model.get_input_embeddings().weight
        emb.normal_()
        emb[:, [S, J]] = 0.0
        emb[:, R] = 1.0
        emb[[vocab["<s>"], vocab["."]], S] = 8.0
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


@pytest.mark.slow
def test_text_mode_finds_the_planted_sinks(tmp_path):
    llm, out = tmp_path / "llm", tmp_path / "out"
    write_planted_lm(llm)
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\na dog sat . the cat ran\n\n")
    p = _analyze("--llm", str(llm), "--text", "the cat sat on the mat . a dog ran home",
                 "--text-file", str(text_file), "--out", str(out), cwd=tmp_path)

    names = {f.name for f in out.iterdir()}
    pngs = {f"{kind}_L{i:02d}.png" for kind in ("attention", "activations") for i in range(4)}
    assert names == pngs | {"cos_to_bos.png", "bos_sink_heads.png", "report.json", "metrics.json",
                            "probe.json", "summary.txt"}
    assert all((out / n).read_bytes()[:8] == PNG for n in names if n.endswith(".png"))

    js = json.loads((out / "report.json").read_text())
    assert js["lengths"] == [12, 8] and js["first_massive_layer"] == MASSIVE_LAYER
    assert js["token_roles"][1] == [1] + [6] * 7            # BOS, then text ("transcript") tokens
    assert [layer["layer"] for layer in js["layers"]] == [0, 1, 2, 3]
    for layer in js["layers"]:
        massive = layer["layer"] >= MASSIVE_LAYER
        assert layer["massive_features"] == ([J] if massive else [])
        sinks = {(t["batch"], t["token"]) for t in layer["sink_tokens"]}
        if layer["layer"] > MASSIVE_LAYER:                  # BOS and both '.' tokens, in every head
            assert sinks == {(0, 0), (0, 7), (1, 0), (1, 4)}
            assert layer["bos_sink_head_frac"] == 1.0 and layer["sink_features_shared"] is True
            assert layer["sinks_by_role"] == {"bos": 2, "transcript": 2}
            assert layer["cos_to_bos_sink"] > 0.99 and layer["cos_to_bos_nonsink"] < 0.5
        else:                   # no planted sink yet (BOS of a short row may still be one by chance)
            assert {tok for _, tok in sinks} <= {0}
    assert js["layers"][MASSIVE_LAYER]["mlp_share"] == pytest.approx(1.0)

    probe = json.loads((out / "probe.json").read_text())
    assert probe["text"] == ["the cat sat on the mat . a dog ran home", "a dog sat . the cat ran"]
    assert probe["tokens"][0][0] == "<s>" and probe["tokens"][0][7] == probe["tokens"][1][4] == "."
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sinks/first_massive_layer"] == MASSIVE_LAYER and metrics["sinks/role/transcript"] == 4
    assert "massive activations: first in layer 1" in p.stdout and "7 '.' transcript 1.00" in p.stdout
    # which tokens carry the massive values: named in the summary and in report.json
    assert "tokens carrying the massive values" in p.stdout
    assert "L1: " in p.stdout and "L2-L3: " in p.stdout and f"7 '.' transcript* [{J}]" in p.stdout
    carriers = js["layers"][2]["massive_tokens"]
    assert {(m["batch"], m["token"], m["label"], m["role"]) for m in carriers} == {
        (0, 0, "<s>", "bos"), (0, 7, ".", "transcript"), (1, 0, "<s>", "bos"), (1, 4, ".", "transcript")}
    assert len(js["layers"][2]["massive_entries"]) == 4 and js["token_labels"][0][7] == "."
    assert (out / "summary.txt").read_text().strip() in p.stdout


# --------------------------------------------------------------------------- run mode
@pytest.fixture(scope="module")
def trained_run_dir(trained_run, tmp_path_factory) -> Path:
    """A copy of the session's 1-process run: checkpoints and probes at steps 3 and 6, an export."""
    return trained_run("zero3_1proc").copy(tmp_path_factory.mktemp("analyze") / "run")


@pytest.mark.slow
def test_run_mode_reproduces_the_training_probe(trained_run_dir, tmp_path):
    out = tmp_path / "out"
    p = _analyze("--run-dir", str(trained_run_dir), "--out", str(out), cwd=tmp_path)
    probed = trained_run_dir / "sinks" / f"step_{TINY_STEPS:07d}"
    trained = json.loads((probed / "report.json").read_text())
    offline = json.loads((out / "report.json").read_text())
    assert offline["step"] == TINY_STEPS and len(offline["lengths"]) == len(trained["lengths"]) >= 1
    _same(trained, offline)              # same weights, same probe batch, same prompt: same report
    trained_pngs = probed.glob("*.png")
    assert sorted(f.name for f in out.glob("*.png")) == sorted(f.name for f in trained_pngs)
    probe = json.loads((out / "probe.json").read_text())
    assert probe["split"] == "val" and f"step_{TINY_STEPS:08d}" in probe["weights"] and len(probe["keys"]) == 2
    roles = offline["token_roles"][0]
    assert probe["tokens"][0][0] == "<s>" and probe["tokens"][0][1] == "<audio>" and roles[:2] == [1, 2]   # paper order
    assert "checkpoint" in p.stdout and "layer" in p.stdout and "intermediate sinks of sample 0" in p.stdout


@pytest.mark.slow
def test_run_mode_export_other_split_and_trainable_only(trained_run_dir, synth_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    _analyze("--run-dir", str(trained_run_dir), "--checkpoint", "export", "--shards", str(synth_corpus),
             "--split", "test", "--num-samples", "1", "--no-figures", "--out", str(out), cwd=tmp_path)
    js = json.loads((out / "report.json").read_text())
    assert len(js["lengths"]) == 1 and len(js["layers"]) == 4 and js["step"] == TINY_STEPS
    assert not list(out.glob("*.png"))
    probe = json.loads((out / "probe.json").read_text())
    assert probe["split"] == "test" and "export/model.safetensors" in probe["weights"]

    # export/trainable.safetensors alone: the rebuilt random frozen base is not the run's -> refused
    main = _script_main()
    trainable = trained_run_dir / "export" / "trainable.safetensors"
    rc = main(["--run-dir", str(trained_run_dir), "--checkpoint", str(trainable),
               "--out", str(tmp_path / "refused")])
    assert rc == 2 and "frozen weights differ" in capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    from trainer.config import ExperimentConfig

    main = _script_main()
    run = tmp_path / "run"                          # a run folder without any checkpoint
    run.mkdir()
    cfg = ExperimentConfig(config=str(REPO / "ds_configs" / "zero3.json")).to_dict()
    cfg["train"]["run_dir"] = str(run)
    (run / "experiment.json").write_text(json.dumps(cfg))

    def error(*args: str) -> str:
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        return err

    assert "run folder not found" in error("--run-dir", str(tmp_path / "nope"))
    assert "no experiment.json" in error("--run-dir", str(tmp_path))
    assert "shard folder not found" in error("--run-dir", str(run), "--shards", str(tmp_path / "no_shards"))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "val.index.json").write_text("{}")
    shards = str(tmp_path / "shards")
    assert "no split 'test'" in error("--run-dir", str(run), "--shards", shards, "--split", "test")
    assert "no complete checkpoint" in error("--run-dir", str(run), "--shards", str(tmp_path / "shards"))
    assert "checkpoint not found" in error("--run-dir", str(run), "--shards", str(tmp_path / "shards"),
                                           "--checkpoint", str(tmp_path / "missing"))
    assert "no consolidated export" in error("--run-dir", str(run), "--shards", str(tmp_path / "shards"),
                                             "--checkpoint", "export")
    assert "not a transformers model folder" in error("--llm", str(tmp_path), "--text", "hello")
    assert not (tmp_path / "out").exists()
