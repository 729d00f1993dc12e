"""LRS3/LRS2 (auto_avsr layout) -> shards, on a tiny fake tree built here with ffmpeg."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_tools.lrs3 import convert, sample_key
from data_tools.media import encode_wav, run_ffmpeg
from data_tools.validate import iter_samples, validate
from tests.constants import REPO
from tests.helpers import child_env
from trainer.data.shard_format import SAMPLES_PER_FRAME, decode_audio, load_index

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")


def make_mp4(path: Path, seconds: float, with_audio: bool, size: int = 96) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    args = ["-f", "lavfi", "-i", f"testsrc=size={size}x{size}:rate=25:duration={seconds}"]
    if with_audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}",
                 "-c:a", "aac", "-shortest"]
    run_ffmpeg([*args, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-threads", "1",
                str(path)])


def write_txt(path: Path, text: str) -> None:
    path.write_text(f"Text:  {text}\nConf:  4\n\nWORD START END ASDSCORE\n", encoding="utf-8")


@pytest.fixture(scope="module")
def lrs3_tree(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("lrs3") / "trainval"
    t = np.arange(int(1.2 * 16000)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    # spkA/00001: mp4 + 16 kHz wav; spkA/00002: mp4 with audio, no wav (extracted)
    make_mp4(src / "spkA" / "00001.mp4", 1.2, with_audio=False)
    (src / "spkA" / "00001.wav").write_bytes(encode_wav(tone))
    write_txt(src / "spkA" / "00001.txt", "HELLO WORLD")
    make_mp4(src / "spkA" / "00002.mp4", 1.0, with_audio=True)
    write_txt(src / "spkA" / "00002.txt", "NO WAV HERE")
    # spkB/00001: a 44.1 kHz stereo wav, resampled; a plain first line without "Text:"
    make_mp4(src / "spkB" / "00001.mp4", 1.2, with_audio=False)
    stereo = np.stack([np.sin(2 * np.pi * 200 * np.arange(int(1.2 * 44100)) / 44100)] * 2, axis=1) * 0.2
    sf.write(src / "spkB" / "00001.wav", stereo, 44100, subtype="PCM_16")
    (src / "spkB" / "00001.txt").write_text("PLAIN FIRST LINE\n", encoding="utf-8")
    # broken inputs
    (src / "spkB" / "00002.mp4").write_bytes(os.urandom(3000))                  # not a video
    write_txt(src / "spkB" / "00002.txt", "BROKEN VIDEO")
    shutil.copy(src / "spkA" / "00001.mp4", src / "spkB" / "00003.mp4")         # no transcript
    (src / "spkC").mkdir()
    shutil.copy(src / "spkA" / "00001.mp4", src / "spkC" / "00001.mp4")
    write_txt(src / "spkC" / "00001.txt", "")                                   # empty transcript
    make_mp4(src / "spkC" / "00002.mp4", 1.0, with_audio=False)                 # no audio anywhere
    write_txt(src / "spkC" / "00002.txt", "SILENT FILM")
    shutil.copy(src / "spkA" / "00001.mp4", src / "spkC" / "00003.mp4")         # audio far too short
    (src / "spkC" / "00003.wav").write_bytes(encode_wav(tone[:3000]))
    write_txt(src / "spkC" / "00003.txt", "TOO SHORT")
    return src


def test_convert_lrs3_tree(lrs3_tree, tmp_path):
    result = convert(lrs3_tree, tmp_path, "train", workers=2, samples_per_shard=2, progress=False)
    index = load_index(tmp_path, "train")
    assert index.num_samples == 3 and [s.samples for s in index.shards] == [2, 1]
    assert result.skip_counts == {"video does not decode": 1, "no transcript": 1, "empty transcript": 1,
                                  "audio does not decode (mp4)": 1, "audio/video length mismatch": 1}
    assert index.meta["skipped"] == 5

    samples = {k: p for url in index.urls for k, p in iter_samples(Path(url))}
    assert set(samples) == {"spkA_00001", "spkA_00002", "spkB_00001"}
    texts = {k: p["txt"].decode() for k, p in samples.items()}
    assert texts == {"spkA_00001": "HELLO WORLD", "spkA_00002": "NO WAV HERE", "spkB_00001": "PLAIN FIRST LINE"}
    for key, parts in samples.items():
        meta = json.loads(parts["json"])
        audio, info = decode_audio(parts["wav"])
        assert (info.sample_rate, info.channels) == (16000, 1)
        assert info.num_samples == meta["num_frames"] * SAMPLES_PER_FRAME
        assert meta["speaker"] == key.split("_")[0] and meta["dataset"] == "lrs3" and meta["split"] == "train"
        assert meta["source"] == key.replace("_", "/") + ".mp4"
        assert np.abs(audio[:8000]).max() > 0.1                   # the real signal, not padding
    assert json.loads(samples["spkA_00002"]["json"])["audio_from"] == "mp4"
    assert json.loads(samples["spkB_00001"]["json"])["audio_from"] == "wav"
    assert samples["spkA_00001"]["mp4"] == (lrs3_tree / "spkA" / "00001.mp4").read_bytes()   # video copied as is

    report = validate(tmp_path)
    assert report.ok, report.format()


def test_lrs3_cli_reports_skips(lrs3_tree, tmp_path):
    env = child_env()
    cmd = [sys.executable, "-m", "data_tools", "lrs3", str(lrs3_tree), str(tmp_path), "--split", "test",
           "--workers", "1", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "test: 3 utterances" in out.stdout and "skipped 5 inputs" in out.stdout and "no transcript" in out.stdout
    # a second run into the same folder refuses to overwrite, with one clear line
    again = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, cwd=REPO)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_sample_key_has_no_dots_or_slashes():
    assert sample_key("pretrain/0Fi83BHQsMA/00002") == "pretrain_0Fi83BHQsMA_00002"
    assert sample_key("spk.1/00001") == "spk_1_00001"


def test_zero_clip_conversion_writes_nothing_and_the_rerun_works(lrs3_tree, tmp_path):
    """A conversion in which every clip is skipped leaves no index behind (an empty one blocked the
    rerun with "already holds split 'train' (0 shards, an index)"); fixed inputs then convert."""
    src = tmp_path / "src"
    (src / "spk").mkdir(parents=True)
    shutil.copy(lrs3_tree / "spkA" / "00001.mp4", src / "spk" / "00001.mp4")
    out = tmp_path / "shards"
    env = child_env()
    cmd = [sys.executable, "-m", "data_tools", "lrs3", str(src), str(out), "--split", "train",
           "--workers", "1", "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, cwd=REPO)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "no usable utterance of 1 inputs; nothing written" in first.stdout and "no transcript" in first.stdout
    assert not list(out.glob("train*")) and not list(out.glob(".tmp-*"))
    # an empty index written by an older version blocks nothing either
    (out / "train.index.json").write_text(json.dumps({"split": "train", "shards": [], "version": 1}))
    shutil.copy(lrs3_tree / "spkA" / "00001.wav", src / "spk" / "00001.wav")
    write_txt(src / "spk" / "00001.txt", "FIXED NOW")
    second = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    assert load_index(out, "train").num_samples == 1


def test_lrs3_cli_writes_straight_to_s3(lrs3_tree, tmp_path):
    """`data_tools lrs3 SRC s3://bucket/prefix`: a local S3 endpoint (moto's server) started here and
    stopped by PID; credentials and endpoint from the environment, as a user sets them."""
    import boto3

    from tests.support.remote_servers import s3_env, start_moto
    moto = start_moto(tmp_path)
    try:
        env = child_env(**s3_env(moto.url))
        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="lrs3")
        cmd = [sys.executable, "-m", "data_tools", "lrs3", str(lrs3_tree), "s3://lrs3/shards", "--split", "test",
               "--workers", "2", "--samples-per-shard", "2", "--quiet"]
        out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert "test: 3 utterances" in out.stdout and "in s3://lrs3/shards" in out.stdout
        check = subprocess.run([sys.executable, "-m", "data_tools", "validate", "s3://lrs3/shards"],
                               capture_output=True, text=True, env=env, cwd=REPO)
        assert check.returncode == 0 and check.stdout.strip().endswith("OK"), check.stdout + check.stderr
        again = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, cwd=REPO)
        assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    finally:
        moto.stop()
