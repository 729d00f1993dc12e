"""The whole Llama-AVSR model on tiny parts: builds per modality, loss, gradients, learning,
decoding, and loading pretrained parts from local folders."""
import pytest
import torch

from tests.constants import KERNEL_DEVICE
from trainer.model.avsr import build_model, build_tokenizer
from trainer.model.config import ModelConfig, TinyModelConfig
from trainer.model.prompt_text import decode_transcripts, with_transcript_ids
from trainer.model.roles import TokenRole, prefix_mask

TINY = dict(projector_hidden=32, measure_decorrelation_when_off=False,
            tiny=TinyModelConfig(llm_layers=3, llm_width=64, llm_heads=4, llm_ffn=128,
                                 whisper_width=32, whisper_heads=2, whisper_max_source_positions=40,
                                 avhubert_width=32, avhubert_heads=2, avhubert_ffn=64, avhubert_resnet_channels=4))


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


TOKENIZER = build_tokenizer(tiny_config())      # the tiny LLM's character tokenizer


def make_batch(n_mels: int = 80, texts=("place blue at f two now", "set red by g nine again"),
               tokenizer=TOKENIZER) -> dict:
    g = torch.Generator().manual_seed(1)
    video_lengths = torch.tensor([12, 9, 7])[: len(texts)]
    audio_lengths = 4 * video_lengths
    B, Tv = len(texts), int(video_lengths.max())
    return with_transcript_ids(tokenizer, {
        "keys": [f"k{i}" for i in range(B)], "text": list(texts),
        "audio": torch.randn(B, n_mels, 4 * Tv, generator=g), "audio_lengths": audio_lengths,
        "video": torch.randn(B, Tv, 24, 24, generator=g), "video_lengths": video_lengths, "skipped": {}})


@pytest.fixture(scope="module")
def avsr_model():
    torch.manual_seed(0)
    return build_model(tiny_config(modality="avsr"))


@pytest.mark.parametrize("modality", ["asr", "vsr"])
def test_single_modality_builds_and_runs(modality):
    torch.manual_seed(0)
    model = build_model(tiny_config(modality=modality))
    batch = make_batch()
    del batch["video" if modality == "asr" else "audio"]             # the disabled modality may be absent
    inputs = model.assemble(batch)
    roles = inputs.token_roles
    assert ((roles == TokenRole.AUDIO).any().item(), (roles == TokenRole.VIDEO).any().item()) == \
        ((True, False) if modality == "asr" else (False, True))
    assert (model.audio_encoder is None) == (modality == "vsr") and (model.video_encoder is None) == (modality == "asr")
    out = model(batch)
    assert torch.isfinite(out.loss)
    assert len(model.generate(batch, max_new_tokens=3)) == 2
    # the counts the trainer weights micro-batches with, known before the forward, are the forward's
    assert model.token_counts(batch) == (int(out.num_target_tokens), int(prefix_mask(roles).sum()))


def test_token_counts_before_the_forward_are_the_forwards(avsr_model):
    batch = make_batch(texts=("place blue at f two now", "set red by g nine again", "bin white"))
    out = avsr_model(batch)
    assert avsr_model.token_counts(batch) == (int(out.num_target_tokens), int(out.num_prefix_tokens))
    assert int(out.num_prefix_tokens) == int(prefix_mask(avsr_model.assemble(batch).token_roles).sum())


def test_avsr_layout_counts_and_instruction(avsr_model):
    batch = make_batch()
    x = avsr_model.assemble(batch)
    roles = x.token_roles
    # video 12 / 9 frames at rate 2 -> 6 / 5 tokens; audio 48 / 36 mel -> 24 / 18 frames at rate 3 -> 8 / 6 tokens
    assert (roles == TokenRole.VIDEO).sum(1).tolist() == [6, 5]
    assert (roles == TokenRole.AUDIO).sum(1).tolist() == [8, 6]
    assert (roles == TokenRole.DELIMITER).sum(1).tolist() == [4, 4]
    # the paper's order by default: BOS, <audio> A.. </audio>, <video> V.. </video>, instruction
    first_video = (roles[0] == TokenRole.VIDEO).nonzero()[0].item()
    first_audio = (roles[0] == TokenRole.AUDIO).nonzero()[0].item()
    assert first_audio < first_video
    specials = avsr_model.specials
    assert x.input_ids[0, :2].tolist() == [specials.bos, specials.audio_start]
    assert x.input_ids[0, first_video - 1].item() == specials.video_start
    assert x.input_ids[0, first_video - 2].item() == specials.audio_end
    tok = TOKENIZER
    instr = x.input_ids[0][roles[0] == TokenRole.INSTRUCTION].tolist()
    assert tok.decode(instr) == "transcribe speech and video to text."
    target = x.labels[1][x.labels[1] != -100].tolist()
    assert target[-1] == tok.eos_token_id and tok.decode(target[:-1]) == batch["text"][1]
    assert x.attention_mask.sum(1).tolist() == (roles != TokenRole.PAD).sum(1).tolist()


def test_missing_modality_raises(avsr_model):
    batch = make_batch()
    del batch["audio"]
    with pytest.raises(KeyError, match="batch\\['audio'\\]"):
        avsr_model(batch)


@pytest.mark.parametrize("freeze_delimiters", [True, False])
def test_gradients_only_on_trainable_parts(freeze_delimiters):
    torch.manual_seed(0)
    model = build_model(tiny_config(modality="avsr", freeze_delimiters=freeze_delimiters))
    trainable = set(model.trainable_parameter_names())
    assert trainable and all("lora_" in n or n.startswith(("audio_projector.", "video_projector.",
                                                            "delimiter_embeddings.")) for n in trainable)
    assert any(n.startswith("audio_projector.") for n in trainable) and any("lora_B" in n for n in trainable)
    assert ("delimiter_embeddings.weight" in trainable) is not freeze_delimiters     # frozen: the paper's code
    model(make_batch()).loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"frozen parameter {name} got a gradient"
    for name in ("audio_projector.fc1.weight", "video_projector.fc1.weight",
                 "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
                 *(() if freeze_delimiters else ("delimiter_embeddings.weight",))):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_target_nll_sums_the_training_cross_entropy_per_sample():
    """The test-loss pass: per sample, the summed CE of its targets; over the batch it gives back the
    forward's mean CE (the training loss), and each sample's count is its transcript + EOS."""
    torch.manual_seed(0)
    model = build_model(tiny_config(modality="avsr")).eval()
    batch = make_batch(texts=("place blue at f two now", "set red", "bin"))
    nll, tokens = model.target_nll(batch)
    assert tokens.tolist() == [len(t) + 1 for t in batch["transcript_ids"]]
    with torch.no_grad():
        out = model(batch)
    assert float(nll.sum() / tokens.sum()) == pytest.approx(float(out.ce_loss), rel=1e-5)
    alone, n_alone = model.target_nll({k: (v[1:2] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()})
    assert int(n_alone) == int(tokens[1]) and float(alone) == pytest.approx(float(nll[1]), rel=1e-4)


def test_video_lora_makes_only_adapters_trainable():
    torch.manual_seed(0)
    model = build_model(tiny_config(modality="vsr", video_lora=True))
    video_trainable = [n for n in model.trainable_parameter_names() if n.startswith("video_encoder.")]
    assert video_trainable and all(".attn." in n and "lora_" in n for n in video_trainable)
    assert any(".q_proj." in n for n in video_trainable) and any(".v_proj." in n for n in video_trainable)
    model(make_batch()).loss.backward()
    grads = dict(model.named_parameters())
    assert all(grads[n].grad is not None for n in video_trainable)
    assert grads["video_encoder.encoder.layers.0.attn.k_proj.weight"].grad is None


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model(tiny_config(modality="avsr"))
    batch = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert out.num_target_tokens.item() == sum(len(t) + 2 for t in batch["text"])   # "▁"+chars per text, + EOS
    assert losses[-1] < 0.6 * losses[0], losses


def test_greedy_decoding_is_batch_invariant_and_matches_argmax(avsr_model):
    model = avsr_model.eval()
    batch = make_batch(texts=("a", "b", "c"))
    hyps = decode_transcripts(TOKENIZER, model.generate(batch, num_beams=1, max_new_tokens=6))
    assert len(hyps) == 3 and all(isinstance(h, str) for h in hyps)
    for b in (1, 2):                               # samples that get left padding in the batch
        single = {k: (v[b:b + 1] if torch.is_tensor(v) else v[b:b + 1] if isinstance(v, list) else v)
                  for k, v in batch.items()}
        assert decode_transcripts(TOKENIZER, model.generate(single, num_beams=1, max_new_tokens=6)) == [hyps[b]]

    # Step-by-step argmax with full forwards over the growing sequence (no cache, no padding).
    single = {k: (v[:1] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
    prompt = model.assemble(single, for_generation=True)
    embeds, new = prompt.inputs_embeds, []
    suppressed = {model.specials.bos, model.specials.pad, *model.specials.delimiters}
    with torch.no_grad():
        for _ in range(6):
            h = model.decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
            logits = model.base_llm.get_output_embeddings()(h)[0]
            logits[list(suppressed)] = float("-inf")
            nxt = int(logits.argmax())
            if nxt == model.specials.eos:
                break
            new.append(nxt)
            embeds = torch.cat([embeds, model.base_llm.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
    assert model.generate(single, num_beams=1, max_new_tokens=6) == [new]
    assert hyps[0] == TOKENIZER.decode(new, skip_special_tokens=True).strip()
    model.train()


def _sequence_log_probs(model, batch: dict, hyps: list[list[int]], max_new_tokens: int) -> list[float]:
    """Sum of log p over each hypothesis's tokens, plus its EOS where it stopped before the cap, teacher-forced
    through the model's own prompt: what beam search (length_penalty 0) maximises."""
    inputs = model.assemble({**batch, "transcript_ids": hyps})
    logits = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                       position_ids=inputs.position_ids).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    targets = inputs.labels[:, 1:]
    scores = []
    for b, hyp in enumerate(hyps):
        rows = (targets[b] != -100).nonzero().flatten()
        rows = rows if len(hyp) < max_new_tokens else rows[:-1]          # capped: no EOS was chosen
        scores.append(float(logp[b, rows, targets[b, rows]].sum()))
    return scores


@torch.no_grad()
def test_beam_search_finds_sequences_at_least_as_likely_as_greedy(avsr_model):
    model = avsr_model.eval()
    batch = make_batch()
    n = 6
    greedy = model.generate(batch, max_new_tokens=n)
    assert model.generate(batch, num_beams=1, max_new_tokens=n) == greedy
    beams = model.generate(batch, num_beams=5, max_new_tokens=n, length_penalty=0.0)
    assert len(beams) == 2 and all(len(h) <= n for h in beams)
    assert beams != greedy                        # a model on which the two differ, else this proves nothing
    g, b = _sequence_log_probs(model, batch, greedy, n), _sequence_log_probs(model, batch, beams, n)
    assert all(sb >= sg - 1e-6 for sb, sg in zip(b, g)), (b, g)
    assert sum(b) > sum(g)
    model.train()


def test_encoders_stay_in_eval_mode(avsr_model):
    avsr_model.train()
    assert avsr_model.training and not avsr_model.audio_encoder.training and not avsr_model.video_encoder.training


def test_whisper_padding_and_length_checks(avsr_model):
    enc = avsr_model.audio_encoder                 # window = 2 x 40 = 80 mel frames
    clip = torch.randn(1, 80, 30)
    padded = torch.cat([torch.cat([clip, torch.full((1, 80, 18), 5.0)], 2), torch.randn(1, 80, 48)])
    with torch.no_grad():
        alone, n_alone = enc(clip, torch.tensor([30]))
        batched, n = enc(padded, torch.tensor([30, 48]))
    assert n_alone.tolist() == [15] and n.tolist() == [15, 24] and batched.shape == (2, 24, 32)
    assert torch.allclose(alone[0], batched[0, :15], atol=1e-5)
    with pytest.raises(ValueError, match="longer than the Whisper window"):
        enc(torch.randn(1, 80, 81), torch.tensor([81]))
    with pytest.raises(ValueError, match="mel bins"):
        enc(torch.randn(1, 128, 20), torch.tensor([20]))


def test_whisper_natural_length_mode():
    torch.manual_seed(0)
    model = build_model(tiny_config(modality="asr", whisper_pad_to_30s=False))
    frames, lengths = model.audio_encoder(torch.randn(2, 80, 21), torch.tensor([21, 10]))
    assert frames.shape == (2, 11, 32) and lengths.tolist() == [11, 5]


def test_decorrelation_loss_matches_reference():
    torch.manual_seed(0)
    lam = 10.0
    model = build_model(tiny_config(modality="avsr", decorrelation_weight=lam, decorrelation_impl="torch"))
    batch = make_batch()
    out = model(batch)
    inputs = model.assemble(batch)
    with torch.no_grad():
        hs = model.decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           position_ids=inputs.position_ids, output_hidden_states=True).hidden_states
    assert len(hs) == model.base_llm.config.num_hidden_layers + 1 and model.decorrelation_layers == (1, 2)
    mask = prefix_mask(inputs.token_roles)
    per_layer = []
    for h in hs[1:3]:                                # reference: mean over prefix tokens of cos^2 to BOS
        cos = torch.nn.functional.cosine_similarity(h[:, :1], h, dim=-1)
        per_layer.append((cos.square() * mask).sum() / mask.sum())
    expected = torch.stack(per_layer).mean()
    assert torch.allclose(out.dec_loss_raw, expected, rtol=1e-4)
    assert torch.allclose(out.loss, out.ce_loss + lam * expected, rtol=1e-4)
    out.loss.backward()
    assert model.audio_projector.fc1.weight.grad is not None


def test_training_loss_is_the_same_with_the_triton_kernel_and_the_reference():
    """The model's loss and every trainable gradient agree between decorrelation implementations
    (the Triton kernel runs on CPU under TRITON_INTERPRET=1, or compiled on a GPU: tests/constants.py)."""
    results = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = build_model(tiny_config(modality="avsr", decorrelation_weight=100.0, decorrelation_impl=impl))
        model.to(KERNEL_DEVICE)
        batch = {k: v.to(KERNEL_DEVICE) if torch.is_tensor(v) else v for k, v in make_batch().items()}
        out = model(batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results[impl] = (out.loss.detach(), out.dec_loss_raw, grads)
    (loss_t, dec_t, g_t), (loss_k, dec_k, g_k) = results["torch"], results["triton"]
    assert dec_t > 0
    torch.testing.assert_close(dec_k, dec_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    assert g_t.keys() == g_k.keys() and len(g_t) > 0
    for name in g_t:
        torch.testing.assert_close(g_k[name], g_t[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pretrained_parts_load_from_local_folders(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, WhisperConfig,
                              WhisperModel)

    from tests.trainer.model.test_avhubert import official_tiny_state_dict

    torch.manual_seed(0)
    # A "pretrained" tokenizer without the AVSR tokens: building must add them and resize the LLM.
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "transcribe", "speech", "and", "video",
                                         "to", "text.", "place", "blue", "set", "red"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    llm_dir, whisper_dir = tmp_path / "llm", tmp_path / "whisper"
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    whisper = WhisperModel(WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                         decoder_ffn_dim=64, max_source_positions=40))
    whisper.save_pretrained(whisper_dir)
    av_path = tmp_path / "avhubert.pt"
    official = official_tiny_state_dict()
    torch.save({"model": official}, av_path)

    cfg = tiny_config(modality="avsr", llm_path=str(llm_dir), whisper_path=str(whisper_dir),
                      avhubert_path=str(av_path))
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer=tokenizer)
    assert len(tokenizer) == len(vocab) + 5                      # pad + 4 delimiters
    emb = model.base_llm.get_input_embeddings().weight
    assert emb.shape[0] >= len(tokenizer)
    assert torch.equal(emb[: len(vocab)], llm.get_input_embeddings().weight)
    assert torch.allclose(model.delimiter_embeddings.weight, emb[list(model.specials.delimiters)])
    mean_row = llm.get_input_embeddings().weight.mean(0)
    assert torch.allclose(emb[len(vocab):], mean_row.expand(emb.shape[0] - len(vocab), -1), atol=1e-6)
    head = model.base_llm.get_output_embeddings().weight
    assert torch.allclose(head[len(vocab):], llm.get_output_embeddings().weight.mean(0).expand_as(head[len(vocab):]))
    assert torch.equal(model.audio_encoder.encoder.conv1.weight, whisper.encoder.conv1.weight)
    assert torch.equal(model.video_encoder.encoder.layers[1].ffn_in.weight, official["encoder.layers.1.fc1.weight"])
    lora_q = model.llm.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(lora_q.base_layer.weight, llm.model.layers[0].self_attn.q_proj.weight)

    batch = make_batch(texts=("place blue", "set red"), tokenizer=tokenizer)
    out = model(batch)
    assert torch.isfinite(out.loss)
    assert len(model.generate(batch, num_beams=2, max_new_tokens=3)) == 2
    model.llm.save_pretrained(tmp_path / "adapters")                    # what the trainer exports
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()


def test_the_pipeline_decodes_what_the_model_reads(tmp_path):
    """The model alone decides the streams: its modality, and the mel bins of its Whisper (a pretrained
    one's num_mel_bins, e.g. 128 as in large-v3, whatever --model.tiny.n-mels says)."""
    from transformers import WhisperConfig, WhisperModel

    from trainer.data.config import Streams

    WhisperModel(WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_source_positions=40)).save_pretrained(tmp_path / "whisper")
    model = build_model(tiny_config(modality="asr", whisper_path=str(tmp_path / "whisper")))
    assert model.input_streams == Streams(audio=True, video=False, n_mels=128)
    assert model.cfg.tiny.n_mels == 80
    out = model(make_batch(n_mels=128))                          # the bins it asked for are the bins it reads
    assert torch.isfinite(out.loss)
    assert build_model(tiny_config(modality="vsr")).input_streams == Streams(audio=False, video=True, n_mels=80)
