"""Model building blocks on hand-checked inputs: prompt layout, projectors, metrics, config, tokenizer."""
import pytest
import torch

from trainer.model.config import ModelConfig
from trainer.model.metrics import ErrorCounts, error_counts, normalize_text, utterance_counts
from trainer.model.projector import Projector, downsampled_lengths
from trainer.model.prompt import assemble
from trainer.model.roles import TokenRole, prefix_mask
from trainer.model.tokenizer import (DELIMITERS, SpecialTokenIds, add_avsr_special_tokens, encode_text,
                                     load_tokenizer, special_token_ids, train_bpe_tokenizer)

P, B_, DL, V, A, I, T, E = (TokenRole.PAD, TokenRole.BOS, TokenRole.DELIMITER, TokenRole.VIDEO, TokenRole.AUDIO,
                            TokenRole.INSTRUCTION, TokenRole.TRANSCRIPT, TokenRole.EOS)
SPECIALS = SpecialTokenIds(bos=1, eos=2, pad=0, audio_start=4, audio_end=5, video_start=6, video_end=7)
D = 3


def _features():
    # Values identify the source: video 200 + 10*b + t, audio 100 + 10*b + t; padding rows are 999.
    video = torch.full((2, 2, D), 999.0)
    video[0, 0], video[1, 0] = 200.0, 210.0
    audio = torch.full((2, 2, D), 999.0)
    audio[0, 0], audio[0, 1], audio[1, 0] = 100.0, 101.0, 110.0
    return {"video": (video, torch.tensor([1, 1])), "audio": (audio, torch.tensor([2, 1]))}


def _assemble(transcripts):
    return assemble(
        features=_features(), modality_order=("video", "audio"), specials=SPECIALS, instruction_ids=[10, 11],
        transcripts=transcripts,
        embed_tokens=lambda ids: ids[..., None].float().expand(*ids.shape, D),
        embed_delimiters=lambda idx: (1000.0 + idx.float())[:, None].expand(-1, D),
    )


def test_training_prompt_layout_is_exact():
    x = _assemble([[20, 21, 22], [23]])
    assert x.input_ids.tolist() == [
        [1, 6, 0, 7, 4, 0, 0, 5, 10, 11, 20, 21, 22, 2],
        [1, 6, 0, 7, 4, 0, 5, 10, 11, 23, 2, 0, 0, 0],
    ]
    assert x.token_roles.tolist() == [
        [B_, DL, V, DL, DL, A, A, DL, I, I, T, T, T, E],
        [B_, DL, V, DL, DL, A, DL, I, I, T, E, P, P, P],
    ]
    assert x.labels.tolist() == [
        [-100] * 10 + [20, 21, 22, 2],
        [-100] * 9 + [23, 2] + [-100] * 3,
    ]
    assert x.attention_mask.tolist() == [[1] * 14, [1] * 11 + [0] * 3]
    assert x.position_ids.tolist() == [list(range(14)), list(range(11)) + [0, 0, 0]]
    e = x.inputs_embeds[..., 0]
    # delimiter table index order: <audio>=0, </audio>=1, <video>=2, </video>=3
    assert e[0].tolist() == [1, 1002, 200, 1003, 1000, 100, 101, 1001, 10, 11, 20, 21, 22, 2]
    assert e[1].tolist() == [1, 1002, 210, 1003, 1000, 110, 1001, 10, 11, 23, 2, 0, 0, 0]
    assert prefix_mask(x.token_roles)[1].tolist() == [False] + [True] * 8 + [False] * 5


def test_generation_prompt_is_left_padded():
    x = _assemble(None)
    assert x.input_ids.tolist() == [[1, 6, 0, 7, 4, 0, 0, 5, 10, 11], [0, 1, 6, 0, 7, 4, 0, 5, 10, 11]]
    assert x.token_roles[1].tolist() == [P, B_, DL, V, DL, DL, A, DL, I, I]
    assert (x.labels == -100).all()
    assert x.attention_mask.tolist() == [[1] * 10, [0] + [1] * 9]
    assert x.position_ids.tolist() == [list(range(10)), [0] + list(range(9))]
    assert x.inputs_embeds[1, :, 0].tolist() == [0, 1, 1002, 210, 1003, 1000, 110, 1001, 10, 11]


def test_modality_order_audio_first():
    x = assemble(features=_features(), modality_order=("audio", "video"), specials=SPECIALS, instruction_ids=[10],
                 transcripts=[[20], [21]], embed_tokens=lambda ids: ids[..., None].float().expand(*ids.shape, D),
                 embed_delimiters=lambda idx: idx[:, None].float().expand(-1, D))
    assert x.input_ids[1].tolist() == [1, 4, 0, 5, 6, 0, 7, 10, 21, 2, 0]   # padded to sample 0


@pytest.mark.parametrize("mode", ["stack", "avgpool"])
def test_projector_lengths_and_remainder(mode):
    torch.manual_seed(0)
    k, lengths = 3, torch.tensor([7, 5, 1])
    frames = torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2).repeat(3, 1, 1)
    frames[1, 5:] = 1e6                       # padding content must never reach a token
    frames[2, 1:] = 1e6
    proj = Projector(2, 8, rate=k, mode=mode, hidden=16)
    merged = proj.downsample(frames, lengths)
    assert downsampled_lengths(lengths, k).tolist() == [3, 2, 1]
    f = frames[1]
    if mode == "stack":
        assert merged.shape == (3, 3, 6)
        assert merged[1, 1].tolist() == torch.cat([f[3], f[4], torch.zeros(2)]).tolist()
        assert merged[0, 2].tolist() == torch.cat([frames[0, 6], torch.zeros(4)]).tolist()
    else:
        assert merged.shape == (3, 3, 2)
        assert merged[1, 1].tolist() == ((f[3] + f[4]) / 2).tolist()
        assert merged[2, 0].tolist() == frames[2, 0].tolist()
    tokens, out_len = proj(frames, lengths)
    assert tokens.shape == (3, 3, 8) and out_len.tolist() == [3, 2, 1]
    assert torch.isfinite(tokens).all()


def test_projector_prefusion_layernorm():
    proj = Projector(4, 8, rate=2, hidden=16, layernorm=True)
    tokens, _ = proj(torch.randn(2, 5, 4), torch.tensor([5, 3]))
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 3), atol=1e-5)


def test_text_normalisation_and_error_counts():
    assert normalize_text("  Hello, World!  It's  well-known.\n") == "hello world it's well known"
    assert error_counts(["The cat sat."], ["the CAT, sat"]).word_errors == 0
    c = error_counts(["a b c d", "x y"], ["a z c", "x y"])
    assert (c.word_errors, c.ref_words, c.utterances) == (2, 6, 2)
    assert c.wer == pytest.approx(2 / 6)
    c = error_counts(["abcd"], ["abd"])
    assert (c.char_errors, c.ref_chars) == (1, 4) and c.cer == pytest.approx(0.25)
    empty = error_counts([""], ["two words"])
    assert (empty.word_errors, empty.ref_words) == (2, 0)
    total = c + empty
    assert ErrorCounts.from_tensor(total.to_tensor()) == total
    # per utterance: what the bootstrap resamples; they add up to the corpus counts
    each = utterance_counts(["a b c d", "x y", ""], ["a z c", "x y", "one"])
    assert [(u.word_errors, u.ref_words, u.utterances) for u in each] == [(2, 4, 1), (0, 2, 1), (1, 0, 1)]
    assert sum(each, ErrorCounts()) == error_counts(["a b c d", "x y", ""], ["a z c", "x y", "one"])


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--model.modality must be one of"):
        ModelConfig(modality="audio")
    with pytest.raises(ValueError, match="--model.modality-order"):
        ModelConfig(modality_order=("video", "video"))
    with pytest.raises(ValueError, match="--model.video-lora needs video"):
        ModelConfig(modality="asr", video_lora=True)
    with pytest.raises(ValueError, match="--model.audio-rate"):
        ModelConfig(audio_rate=0)
    with pytest.raises(ValueError, match=r"--model.tiny.llm-width \(100\) must be divisible by --model.tiny.llm-heads"):
        ModelConfig(tiny={"llm_width": 100, "llm_heads": 3})
    assert ModelConfig(modality="vsr").enabled_modalities == ("video",)
    assert ModelConfig(modality_order=["video", "audio"]).enabled_modalities == ("video", "audio")
    assert ModelConfig().enabled_modalities == ("audio", "video")        # the paper's order by default


def test_trained_tokenizer_roundtrip(tmp_path):
    tok = train_bpe_tokenizer(["place blue at f two now", "set red by g nine again"] * 10, vocab_size=80)
    tok = add_avsr_special_tokens(tok)
    ids = encode_text(tok, "Place blue at G nine")
    assert tok.decode(ids) == "place blue at g nine"
    tok.save_pretrained(tmp_path)
    loaded = add_avsr_special_tokens(load_tokenizer(tmp_path))
    assert special_token_ids(loaded) == special_token_ids(tok)
    assert encode_text(loaded, "set red") == encode_text(tok, "set red")
    assert all(loaded.convert_tokens_to_ids(t) != loaded.unk_token_id for t in DELIMITERS)
