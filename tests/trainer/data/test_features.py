"""Whisper log-mel at natural length vs transformers' WhisperFeatureExtractor, and decoding."""
import io

import numpy as np
import pytest
import torch

from data_tools.media import encode_mp4, encode_wav
from tests.support.data_fixtures import have_ffmpeg, make_clip, make_sample
from trainer.data.config import DataConfig
from trainer.data.decode import VIDEO_MEAN, VIDEO_STD, decode_clip, mix_at_snr
from trainer.data.features import log_mel
from trainer.data.shard_format import fit_length
from trainer.data.skips import SkipCounter
from trainer.model.config import ModelConfig

STREAMS = ModelConfig().streams()          # what the default (tiny, avsr) model reads

pytestmark = pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg binary needed to encode fixture mp4")


@pytest.mark.parametrize("n_mels,frames", [(80, 37), (128, 11), (80, 1)])
def test_log_mel_matches_whisper_feature_extractor(n_mels, frames):
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(n_mels + frames)
    n = frames * 640
    t = np.arange(n) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 330 * t) * np.linspace(0.2, 1, n)
           + 0.05 * rng.standard_normal(n)).astype(np.float32)
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    ref = fe(wav, sampling_rate=16000, return_tensors="np").input_features[0]
    mine, silence = log_mel(torch.from_numpy(wav), n_mels)
    assert mine.shape == (n_mels, 4 * frames)
    np.testing.assert_allclose(mine.numpy(), ref[:, :4 * frames], atol=1e-4, rtol=0)
    # Whisper's zero padding beyond the clip is exactly the silence level we pad batches with.
    np.testing.assert_allclose(ref[:, 4 * frames + 2:4 * frames + 10], silence, atol=1e-5)


def _cfg(**kw):
    return DataConfig(shard_dir="unused", **kw)


def test_decode_shapes_and_normalisation():
    sample = make_sample("k", 20, size=96, rgb=True, seed=3)
    clip = decode_clip(sample, _cfg(), STREAMS, SkipCounter(), train=False, rng=np.random.default_rng(0), noise=None)
    assert clip.frames == 20 and clip.key == "k" and clip.text
    assert clip.video.shape == (20, 88, 88) and clip.video.dtype == torch.float32
    assert clip.audio.shape == (80, 80)
    # center crop of a known uniform-colour RGB video: gray = torchvision weights, then auto_avsr norm
    rgb = np.zeros((5, 96, 96, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[:, :4], rgb[:, -4:], rgb[:, :, :4], rgb[:, :, -4:] = 255, 255, 255, 255   # border outside the crop
    s = dict(sample, mp4=encode_mp4(rgb), wav=encode_wav(np.zeros(5 * 640, np.float32) + 0.1))
    clip = decode_clip(s, _cfg(), STREAMS, SkipCounter(), train=False, rng=np.random.default_rng(0), noise=None)
    expected = ((0.2989 * 200 + 0.587 * 100 + 0.114 * 50) / 255 - VIDEO_MEAN) / VIDEO_STD
    center = clip.video[:, 8:-8, 8:-8]          # away from the crop edge (codec ringing at the border)
    assert abs(float(center.mean()) - expected) < 0.06, (float(center.mean()), expected)
    assert float(clip.video.max()) < (1.0 - VIDEO_MEAN) / VIDEO_STD - 0.2   # the white border was cropped


def test_train_crop_is_random_and_flip_flips():
    sample = make_sample("k", 10, size=96, seed=5)
    cfg = _cfg(horizontal_flip=False)
    crops = {tuple(decode_clip(sample, cfg, STREAMS, SkipCounter(), train=True, rng=np.random.default_rng(i),
                               noise=None).video[0, :2, :2].flatten().tolist()) for i in range(6)}
    assert len(crops) > 1
    # 88x88 input leaves no crop freedom: a train clip is the eval clip or its mirror image
    small = make_sample("k", 6, size=88, seed=6)

    def video(train, seed):
        return decode_clip(small, _cfg(), STREAMS, SkipCounter(), train=train, rng=np.random.default_rng(seed),
                           noise=None).video

    ev = video(False, 0)
    outs = [video(True, i) for i in range(8)]
    assert all(torch.equal(o, ev) or torch.equal(o, ev.flip(-1)) for o in outs)
    assert any(torch.equal(o, ev.flip(-1)) for o in outs) and any(torch.equal(o, ev) for o in outs)


def test_audio_trimmed_or_padded_to_video_length():
    video, audio = make_clip(12, seed=1)
    for n_audio in (12 * 640 - 900, 12 * 640 + 3000):
        s = {"__key__": "k", "txt": b"a b", "mp4": encode_mp4(video),
             "wav": encode_wav(fit_length(audio, n_audio))}
        clip = decode_clip(s, _cfg(), STREAMS, SkipCounter(), train=False, rng=np.random.default_rng(0), noise=None)
        assert clip.frames == 12 and clip.audio.shape == (80, 48) and len(clip.wave) == 12 * 640
    assert np.array_equal(fit_length(np.ones(3, np.float32), 5), [1, 1, 1, 0, 0])


def test_asr_only_uses_audio_length_and_skips_video():
    _, audio = make_clip(15, seed=2)
    s = {"__key__": "k", "txt": b"x", "wav": encode_wav(audio)}      # no mp4 at all: fine for ASR
    asr = ModelConfig(modality="asr").streams()
    clip = decode_clip(s, _cfg(), asr, SkipCounter(), train=False, rng=np.random.default_rng(0), noise=None)
    assert clip.video is None and clip.frames == 15 and clip.audio.shape == (80, 60)


def test_resample_non_16k_audio_and_count_it():
    video, _ = make_clip(10, seed=4)
    _, audio8k = make_clip(10, seed=4, sr=8000)
    buf = io.BytesIO()
    import soundfile as sf
    sf.write(buf, audio8k, 8000, format="WAV")
    s = {"__key__": "k", "txt": b"x", "mp4": encode_mp4(video), "wav": buf.getvalue()}
    counter = SkipCounter()
    clip = decode_clip(s, _cfg(), STREAMS, counter, train=False, rng=np.random.default_rng(0), noise=None)
    assert clip.audio.shape == (80, 40) and counter.counts["resampled_audio"] == 1 and counter.total == 0


def test_audio_at_a_rate_coprime_with_16k_resamples_correctly():
    """15999 Hz has no common factor with 16 kHz (the case that made torchaudio's kernel 5 GB)."""
    import soundfile as sf

    from trainer.data.decode import read_audio

    t = np.arange(15999) / 15999
    buf = io.BytesIO()
    sf.write(buf, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 15999, format="WAV")
    counter = SkipCounter()
    wav = read_audio({"wav": buf.getvalue()}, _cfg(), counter)
    assert wav.dtype == np.float32 and abs(len(wav) - 16000) <= 1 and counter.counts["resampled_audio"] == 1
    spectrum = np.abs(np.fft.rfft(wav[:16000]))
    assert abs(int(spectrum.argmax()) - 440) <= 1                    # the tone survives, at 440 Hz


def test_mix_at_snr_hits_the_requested_snr():
    rng = np.random.default_rng(0)
    clean = rng.standard_normal(16000).astype(np.float32)
    noise = rng.standard_normal(16000).astype(np.float32) * 3
    noisy = mix_at_snr(clean, noise, 5.0)
    snr = 10 * np.log10(np.mean(clean ** 2) / np.mean((noisy - clean) ** 2))
    assert abs(snr - 5.0) < 1e-3
