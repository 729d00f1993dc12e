"""AV-HuBERT: official checkpoint key layout, exact loading, clear errors, padding invariance."""
import pytest
import torch

from trainer.model.avhubert import (AVHubertConfig, AVHubertVideoEncoder, config_from_official_state_dict,
                                    convert_official_state_dict, export_official_state_dict, official_to_local_key)
from trainer.model.loading import load_state_dict_exact

C, WIDTH, LAYERS, FFN, K, GROUPS = 4, 64, 2, 96, 8, 4     # tiny: ResNet width 4 -> 32-d frames; 1 head of 64


def official_tiny_state_dict() -> dict[str, torch.Tensor]:
    """Written from the official module structure (avhubert/hubert.py, avhubert/resnet.py and
    fairseq's wav2vec2 TransformerEncoder), not from the mapping under test."""
    g = torch.Generator().manual_seed(0)
    sd = {}

    def put(name, *shape):
        sd[name] = torch.randn(*shape, generator=g)

    def bn(prefix, n):
        put(f"{prefix}.weight", n)
        put(f"{prefix}.bias", n)
        put(f"{prefix}.running_mean", n)
        sd[f"{prefix}.running_var"] = torch.rand(n, generator=g) + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    r = "feature_extractor_video.resnet"
    put(f"{r}.frontend3D.0.weight", C, 1, 5, 7, 7)
    bn(f"{r}.frontend3D.1", C)
    put(f"{r}.frontend3D.2.weight", C)
    inplanes = C
    for layer, planes in zip((1, 2, 3, 4), (C, 2 * C, 4 * C, 8 * C)):
        for block in (0, 1):
            p = f"{r}.trunk.layer{layer}.{block}"
            cin = inplanes if block == 0 else planes
            put(f"{p}.conv1.weight", planes, cin, 3, 3)
            bn(f"{p}.bn1", planes)
            put(f"{p}.relu1.weight", planes)
            put(f"{p}.conv2.weight", planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            put(f"{p}.relu2.weight", planes)
            if block == 0 and layer > 1:
                put(f"{p}.downsample.0.weight", planes, cin, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    put("feature_extractor_video.proj.weight", WIDTH, 8 * C)
    put("feature_extractor_video.proj.bias", WIDTH)
    put("layer_norm.weight", 2 * WIDTH)
    put("layer_norm.bias", 2 * WIDTH)
    put("post_extract_proj.weight", WIDTH, 2 * WIDTH)
    put("post_extract_proj.bias", WIDTH)
    put("encoder.pos_conv.0.bias", WIDTH)
    sd["encoder.pos_conv.0.weight_g"] = torch.rand(1, 1, K, generator=g) + 0.5
    put("encoder.pos_conv.0.weight_v", WIDTH, WIDTH // GROUPS, K)
    for n in range(LAYERS):
        p = f"encoder.layers.{n}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            put(f"{p}.self_attn.{proj}.weight", WIDTH, WIDTH)
            put(f"{p}.self_attn.{proj}.bias", WIDTH)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            put(f"{p}.{ln}.weight", WIDTH)
            put(f"{p}.{ln}.bias", WIDTH)
        put(f"{p}.fc1.weight", FFN, WIDTH)
        put(f"{p}.fc1.bias", FFN)
        put(f"{p}.fc2.weight", WIDTH, FFN)
        put(f"{p}.fc2.bias", WIDTH)
    put("encoder.layer_norm.weight", WIDTH)
    put("encoder.layer_norm.bias", WIDTH)
    return sd


IGNORED = {  # audio front end and pretraining heads present in real checkpoints
    "feature_extractor_audio.proj.weight": (WIDTH, 104), "feature_extractor_audio.proj.bias": (WIDTH,),
    "mask_emb": (104,), "final_proj.weight": (256, WIDTH), "final_proj.bias": (256,),
    "label_embs_concat": (504, 256),
}


def _save(path, sd):
    torch.save({"model": sd, "cfg": {"model": {"encoder_layers": LAYERS}}}, path)
    return path


def test_official_layout_loads_exactly(tmp_path):
    from trainer.model.avsr import build_video_encoder
    from trainer.model.config import ModelConfig

    official = official_tiny_state_dict()
    full = dict(official, **{k: torch.zeros(s) for k, s in IGNORED.items()})
    path = _save(tmp_path / "avhubert_tiny.pt", full)

    cfg = config_from_official_state_dict(official)
    assert (cfg.layers, cfg.width, cfg.ffn, cfg.resnet_channels, cfg.conv_pos, cfg.conv_pos_groups, cfg.fuse) == \
        (LAYERS, WIDTH, FFN, C, K, GROUPS, "concat")

    encoder = build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(path)))
    local = encoder.state_dict()
    # Every official tensor landed where the mapping says, bit for bit; nothing left unset.
    assert len(local) == len(official)
    for key, value in official.items():
        assert torch.equal(local[official_to_local_key(key)], value), key
    # The inverse mapping reproduces the official key set exactly (independently written above).
    assert set(export_official_state_dict(encoder)) == set(official)

    # The fine-tuned (seq2seq) layout wraps the same keys under encoder.w2v_model.
    wrapped = {f"encoder.w2v_model.{k}": v for k, v in official.items()}
    wrapped["decoder.embed_tokens.weight"] = torch.zeros(3, 4)
    assert set(convert_official_state_dict(wrapped)) == set(local)

    # Weight norm: the effective conv weight is g * v / ||v|| over dims (0, 1).
    v, g = official["encoder.pos_conv.0.weight_v"], official["encoder.pos_conv.0.weight_g"]
    expected = g * v / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    assert torch.allclose(encoder.encoder.pos_conv.weight(), expected, atol=1e-6)


def test_wrong_keys_raise_clear_errors():
    official = official_tiny_state_dict()
    with pytest.raises(KeyError, match="encoder.layers.0.self_attn.bogus.weight"):
        convert_official_state_dict(dict(official, **{"encoder.layers.0.self_attn.bogus.weight": torch.zeros(1)}))
    encoder = AVHubertVideoEncoder(config_from_official_state_dict(official))
    local = convert_official_state_dict(official)
    del local["encoder.layers.1.ffn_in.weight"]
    with pytest.raises(KeyError, match=r"missing 1: \['encoder.layers.1.ffn_in.weight'\]"):
        load_state_dict_exact(encoder, local, "AV-HuBERT")
    local = convert_official_state_dict(official)
    local["frame_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(KeyError, match="shape mismatch 1: .*frame_proj.weight"):
        load_state_dict_exact(encoder, local, "AV-HuBERT")


@pytest.mark.parametrize("layer_norm_first", [True, False])
def test_padding_does_not_change_real_frames(layer_norm_first):
    torch.manual_seed(0)
    enc = AVHubertVideoEncoder(AVHubertConfig(layers=2, width=32, heads=2, ffn=64, resnet_channels=4, conv_pos=8,
                                              conv_pos_groups=4, layer_norm_first=layer_norm_first)).eval()
    clip = torch.randn(1, 5, 24, 24)
    padded = torch.cat([torch.cat([clip, torch.full((1, 3, 24, 24), 7.0)], 1), torch.randn(1, 8, 24, 24)])
    with torch.no_grad():
        alone, _ = enc(clip, torch.tensor([5]))
        batched, lengths = enc(padded, torch.tensor([5, 8]))
    assert batched.shape == (2, 8, 32) and lengths.tolist() == [5, 8]
    assert torch.allclose(alone[0], batched[0, :5], atol=1e-5)


# ----------------------------------------------------------------------------- files as users bring them

def _model_section(heads=4, layer_norm_first=False):
    from tests.support.fairseq_pickles import avhubert_model_section

    return avhubert_model_section(WIDTH, LAYERS, FFN, heads, layer_norm_first, K, GROUPS)


def _encode(encoder, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return encoder.eval()(torch.randn(2, 6, 24, 24, generator=g), torch.tensor([6, 4]))[0]


def _reference(heads, layer_norm_first):
    """The encoder built from the stated architecture with the same weights (the expected output)."""
    cfg = config_from_official_state_dict(official_tiny_state_dict(), layer_norm_first=layer_norm_first, heads=heads)
    enc = AVHubertVideoEncoder(cfg)
    enc.load_state_dict(convert_official_state_dict(official_tiny_state_dict()))
    return enc


@pytest.mark.parametrize("style", ["new", "old", "seq2seq", "ctc"])
def test_architecture_comes_from_the_checkpoints_own_config(tmp_path, style):
    """4 heads and post-LN, which no tensor shape shows (D / 64 would say 1 head, the flag's old
    default pre-LN): read from an omegaconf DictConfig or argparse Namespace holding fairseq enums,
    interpolations and numpy scalars, also from a fine-tuned file's w2v_args."""
    pytest.importorskip("omegaconf")
    from tests.support.fairseq_pickles import new_style, old_style
    from trainer.model.avsr import build_video_encoder
    from trainer.model.config import ModelConfig

    state = official_tiny_state_dict()
    if style == "seq2seq":
        state = {f"encoder.w2v_model.{k}": v for k, v in state.items()} | {"decoder.embed_tokens.weight": torch.zeros(9, 4)}
    if style == "ctc":
        state = {f"w2v_encoder.w2v_model.{k}": v for k, v in state.items()} | {
            "w2v_encoder.proj.weight": torch.zeros(30, WIDTH), "w2v_encoder.proj.bias": torch.zeros(30)}
    path = tmp_path / f"{style}.pt"
    if style == "old":
        old_style(path, state, _model_section())
    else:
        new_style(path, state, _model_section(), finetuned=style if style in ("seq2seq", "ctc") else None)

    from trainer.model.avhubert import read_official_checkpoint
    ckpt = read_official_checkpoint(path)
    assert ckpt.config["encoder_attention_heads"] == 4 and ckpt.config["extractor_mode"] == "default"
    assert ckpt.config["label_rate"] == "${task.label_rate}" and ckpt.config["dropout"] == 0.1
    assert type(ckpt.config["encoder_layers"]) is int and ckpt.config["encoder_layers"] == LAYERS   # numpy in "old"
    assert ckpt.config_place == {"new": "cfg.model", "old": "args", "seq2seq": "cfg.model.w2v_args.model",
                                 "ctc": "cfg.model.w2v_args.model"}[style]
    assert ckpt.layout == {"new": "pretrained", "old": "pretrained", "seq2seq": "fine-tuned seq2seq (av_hubert_seq2seq)",
                           "ctc": "fine-tuned CTC (av_hubert_ctc)"}[style]

    encoder = build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(path)))
    assert (encoder.cfg.heads, encoder.cfg.layer_norm_first) == (4, False)
    out = _encode(encoder)
    assert torch.allclose(out, _encode(_reference(4, False)), atol=1e-6)
    assert not torch.allclose(out, _encode(_reference(1, True)), atol=1e-3)     # the guess would differ
    # a flag that agrees is accepted; one that contradicts the file is refused, naming both
    agreeing = ModelConfig(modality="vsr", avhubert_path=str(path), avhubert_attention_heads=4, avhubert_layer_norm_first=False)
    assert build_video_encoder(agreeing).cfg.heads == 4
    with pytest.raises(ValueError, match=r"--model.avhubert-attention-heads 16 disagrees with the checkpoint's own config "
                                         r"\(heads=4 in " + ckpt.config_place.replace(".", r"\.")):
        build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(path), avhubert_attention_heads=16))
    with pytest.raises(ValueError, match=r"--model.avhubert-layer-norm-first True disagrees"):
        build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(path), avhubert_layer_norm_first=True))


def test_flags_fill_in_what_a_file_without_config_does_not_say(tmp_path):
    from trainer.model.avsr import build_video_encoder
    from trainer.model.config import ModelConfig

    path = _save(tmp_path / "bare.pt", official_tiny_state_dict())      # cfg without a model section
    guessed = build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(path)))
    assert (guessed.cfg.heads, guessed.cfg.layer_norm_first) == (1, True)          # D / 64, pre-LN
    told = build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(path), avhubert_attention_heads=4,
                                           avhubert_layer_norm_first=False))
    assert torch.allclose(_encode(told), _encode(_reference(4, False)), atol=1e-6)


def test_parametrized_weight_norm_keys_load(tmp_path):
    """A file re-saved after torch >= 2.1's parametrized weight norm: the names come from a real
    torch module (parametrizations.weight.original0/1), the effective weight must be the same."""
    from torch.nn.utils.parametrizations import weight_norm

    from trainer.model.avsr import build_video_encoder
    from trainer.model.config import ModelConfig

    conv = weight_norm(torch.nn.Conv1d(WIDTH, WIDTH, K, padding=K // 2, groups=GROUPS), name="weight", dim=2)
    state = {k: v for k, v in official_tiny_state_dict().items() if not k.startswith("encoder.pos_conv.0.")}
    state |= {f"encoder.pos_conv.0.{k}": v.detach().clone() for k, v in conv.state_dict().items()}
    assert "encoder.pos_conv.0.parametrizations.weight.original1" in state
    encoder = build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(_save(tmp_path / "p.pt", state))))
    assert torch.allclose(encoder.encoder.pos_conv.weight(), conv.weight.detach(), atol=1e-6)


def test_files_that_are_not_an_avhubert_video_encoder_say_what_they_are(tmp_path):
    pytest.importorskip("omegaconf")
    from tests.support.fairseq_pickles import new_style
    from trainer.model.avsr import build_video_encoder
    from trainer.model.config import ModelConfig

    audio_hubert = {"encoder.layer_norm.weight": torch.zeros(WIDTH), "encoder.layers.0.fc1.weight": torch.zeros(FFN, WIDTH),
                    "feature_extractor.conv_layers.0.0.weight": torch.zeros(8, 1, 10)}
    model = dict(_model_section(), _name="hubert")
    path = new_style(tmp_path / "hubert.pt", audio_hubert, model)
    with pytest.raises(KeyError, match=r"hubert\.pt: a pretrained fairseq checkpoint of model 'hubert', not an "
                                       r"AV-HuBERT video encoder"):
        build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(path)))
    ctc_audio = {f"w2v_encoder.w2v_model.{k}": v for k, v in audio_hubert.items()}
    path = new_style(tmp_path / "ctc.pt", ctc_audio, dict(model), finetuned="ctc")
    with pytest.raises(KeyError, match=r"a fine-tuned CTC \(av_hubert_ctc\) fairseq checkpoint of model 'av_hubert_ctc'"):
        build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(path)))
    lying = new_style(tmp_path / "lying.pt", official_tiny_state_dict(), dict(_model_section(), encoder_layers=24))
    with pytest.raises(ValueError, match=r"contradicts itself .*layers: 24 in the config, 2 in the tensors"):
        build_video_encoder(ModelConfig(modality="vsr", avhubert_path=str(lying)))


def test_a_contradicting_flag_is_one_error_before_any_process_group(tmp_path):
    pytest.importorskip("omegaconf")
    from tests.support.fairseq_pickles import new_style
    from trainer.config import ConfigError, parse_args

    path = str(new_style(tmp_path / "av.pt", official_tiny_state_dict(), _model_section()))
    cfg = parse_args(["--model.modality", "vsr", "--model.avhubert-path", path,
                      "--model.avhubert-layer-norm-first", "False", "--model.avhubert-attention-heads", "4"])
    assert (cfg.model.avhubert_layer_norm_first, cfg.model.avhubert_attention_heads) == (False, 4)
    with pytest.raises(ConfigError, match=r"--model.avhubert-path: --model.avhubert-attention-heads 16 disagrees with the "
                                          r"checkpoint's own config \(heads=4 in cfg.model of .*av.pt\)"):
        parse_args(["--model.modality", "vsr", "--model.avhubert-path", path, "--model.avhubert-attention-heads", "16"])
