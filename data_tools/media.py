"""Audio and video helpers shared by the corpus builders and the validator.

Audio goes through soundfile (torchaudio.load needs torchcodec in 2.11), video
through ffmpeg (encode, extract) and decord (decode from bytes, as the loader does).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
FPS = 25.0
SAMPLES_PER_FRAME = 640          # 16000 / 25: one video frame's worth of audio


class MediaError(RuntimeError):
    """A media file could not be read or written; the message says which and why."""


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MediaError(f"`{name}` not found on PATH; install it (Debian: apt-get install -y {name})")
    return path


def run_ffmpeg(args: list[str], stdin: bytes | None = None) -> bytes:
    """Run ffmpeg quietly; a failure raises MediaError with ffmpeg's last error line."""
    cmd = [require_binary("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", *args]
    if stdin is None:
        cmd.insert(1, "-nostdin")   # else ffmpeg in a worker may steal the terminal's input
    proc = subprocess.run(cmd, input=stdin, capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise MediaError(f"ffmpeg failed ({proc.returncode}): {err[-1] if err else 'no message'}")
    return proc.stdout


# ---------------------------------------------------------------- audio

def encode_wav(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono float audio in [-1, 1] (or int16) -> PCM16 WAV bytes."""
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio of shape [n], got {audio.shape}")
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@dataclass
class AudioInfo:
    sample_rate: int
    channels: int
    num_samples: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


def decode_wav(data: bytes) -> tuple[np.ndarray, AudioInfo]:
    """WAV/FLAC bytes -> float32 array [n] or [n, channels], and its info."""
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for bad data
        raise MediaError(f"audio does not decode: {err}") from err
    info = AudioInfo(sample_rate=int(sr), channels=audio.shape[1], num_samples=audio.shape[0])
    return (audio[:, 0] if info.channels == 1 else audio), info


def fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad to exactly num_samples, so audio and video frames line up."""
    if len(audio) >= num_samples:
        return audio[:num_samples]
    return np.concatenate([audio, np.zeros(num_samples - len(audio), dtype=audio.dtype)])


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE, zero_crossings: int = 16) -> np.ndarray:
    """Band-limited resampling of mono audio (Kaiser-windowed sinc, polyphase), in numpy.

    In-process on purpose: an ffmpeg call costs ~100 ms of start-up per utterance here.
    """
    if sr_in == sr_out or len(audio) == 0:
        return audio.astype(np.float32)
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g                # output n sits at input position n * down / up
    fc = min(1.0, up / down) * 0.97                   # cutoff, as a fraction of the input Nyquist
    half = int(np.ceil(zero_crossings / fc))          # kernel half-width in input samples
    taps = np.arange(-half + 1, half + 1)
    # the fractional position repeats every `up` outputs: one kernel per phase
    frac = (np.arange(up) * down % up) / up
    t = frac[:, None] - taps[None, :]
    window = np.i0(8.6 * np.sqrt(np.clip(1 - (t / half) ** 2, 0, 1))) / np.i0(8.6)
    kernels = (fc * np.sinc(fc * t) * window).astype(np.float32)       # [up, 2 * half]
    x = np.pad(audio.astype(np.float32), (half, half + 1))
    n_out = int(np.ceil(len(audio) * up / down))
    out = np.empty(n_out, dtype=np.float32)
    for start in range(0, n_out, 8192):               # chunks bound the [chunk, taps] temporaries
        n = np.arange(start, min(start + 8192, n_out))
        idx = (n * down // up)[:, None] + taps[None, :] + half
        out[n] = np.einsum("ij,ij->i", x[idx], kernels[n % up])
    return out


def load_audio_16k(path: str | Path) -> np.ndarray:
    """Any audio (or the audio stream of a video) -> float32 mono 16 kHz, via ffmpeg's resampler."""
    raw = run_ffmpeg(["-i", str(path), "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", "pipe:1"])
    if not raw:
        raise MediaError(f"{path}: no audio samples")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


# ---------------------------------------------------------------- video

def _x264_args(fps: float, crf: int) -> list[str]:
    # yuv420p: the most widely decodable; +faststart puts the index first, so a truncated file
    # fails loudly at open. Same frames, same bytes: one encoder thread (callers parallelise with
    # processes; x264's frame threads would make its rate control depend on timing), x264's
    # deterministic mode, and bitexact muxing (no libavformat version tag, no metadata copied).
    return ["-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-threads", "1", "-x264-params", "deterministic=1", "-an", "-map_metadata", "-1",
            "-fflags", "+bitexact", "-flags:v", "+bitexact", "-movflags", "+faststart", "-r", f"{fps:g}"]


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [T>0, H, W], got {frames.dtype} {frames.shape}")


def encode_mp4(frames: np.ndarray, fps: float = FPS, crf: int = 18) -> bytes:
    """uint8 grayscale frames [T, H, W] -> H.264 mp4 bytes, the frames piped to ffmpeg's stdin."""
    _check_frames(frames)
    t, h, w = frames.shape
    with tempfile.TemporaryDirectory(prefix="avsr-mp4-") as tmp:
        out = Path(tmp) / "v.mp4"      # mp4 needs a seekable output for its index: a file, not a pipe
        run_ffmpeg(["-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "pipe:0",
                    *_x264_args(fps, crf), str(out)], stdin=np.ascontiguousarray(frames).tobytes())
        data = out.read_bytes()
    if not data:
        raise MediaError("ffmpeg wrote an empty mp4")
    return data


def encode_mp4_batch(videos: list[np.ndarray], fps: float = FPS, crf: int = 18) -> list[bytes]:
    """Several videos in one ffmpeg run (N inputs -> N outputs, each with its own encoder).

    ffmpeg's start-up costs more CPU than encoding a short 96x96 clip, so batching halves
    the synthesis time; each output is byte-identical to encoding it alone.
    """
    if not videos:
        return []
    for v in videos:
        _check_frames(v)
    with tempfile.TemporaryDirectory(prefix="avsr-mp4-") as tmp:
        inputs, outputs = [], []
        for i, v in enumerate(videos):
            raw = Path(tmp) / f"{i}.gray"
            raw.write_bytes(np.ascontiguousarray(v).tobytes())
            inputs += ["-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{v.shape[2]}x{v.shape[1]}", "-r", f"{fps:g}",
                       "-i", str(raw)]
            outputs += ["-map", f"{i}:v", *_x264_args(fps, crf), str(Path(tmp) / f"{i}.mp4")]
        run_ffmpeg(["-threads", "1", *inputs, *outputs])
        data = [(Path(tmp) / f"{i}.mp4").read_bytes() for i in range(len(videos))]
    if not all(data):
        raise MediaError("ffmpeg wrote an empty mp4")
    return data


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: decord's C++ logger prints the whole input (binary bytes) on failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _clean_error(err: Exception) -> str:
    msg = str(err)
    if "ERROR opening" in msg:          # "... ERROR opening: <the input bytes>, <FFmpeg's reason>"
        msg = "cannot open: " + msg.rsplit(", ", 1)[-1]
    lines = msg.strip().splitlines()
    msg = "".join(c if c.isprintable() else "?" for c in (lines[-1] if lines else ""))
    return msg[:300] or type(err).__name__


def decode_video(data: bytes, read_frames: bool = True) -> tuple[np.ndarray | None, VideoInfo]:
    """mp4 bytes -> (uint8 gray frames [T, H, W] or None, info), decoded by decord like the loader."""
    import decord  # imported late: its FFmpeg libraries are heavy and only some tools need them

    try:
        with quiet_stderr():
            vr = decord.VideoReader(io.BytesIO(data))
            info = VideoInfo(num_frames=len(vr), fps=float(vr.get_avg_fps()), height=0, width=0)
            if info.num_frames == 0:
                raise MediaError("video has no frames")
            first = vr[0].asnumpy()
            info.height, info.width = first.shape[:2]
            frames = None
            if read_frames:
                rgb = vr.get_batch(list(range(info.num_frames))).asnumpy()
                frames = rgb.mean(axis=-1).round().astype(np.uint8) if rgb.ndim == 4 else rgb
    except MediaError:
        raise
    except Exception as err:  # decord raises DECORDError / RuntimeError with FFmpeg text
        raise MediaError(f"video does not decode: {_clean_error(err)}") from err
    return frames, info
