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
