"""Writing media for the corpus builders: WAV through soundfile, H.264 mp4 and audio extraction
through the ffmpeg binary. Reading a sample back (decoding, grayscale, resampling, the rates) is the
shard format's: trainer/data/shard_format.py, shared with the loader.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from trainer.data.shard_format import FPS, SAMPLE_RATE


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


def _pixel_format(frames: np.ndarray) -> str:
    """ffmpeg's raw input format of uint8 frames: [T, H, W] gray or [T, H, W, 3] RGB."""
    if frames.dtype == np.uint8 and len(frames) > 0:
        if frames.ndim == 3:
            return "gray"
        if frames.ndim == 4 and frames.shape[3] == 3:
            return "rgb24"
    raise ValueError(f"expected uint8 frames [T>0, H, W] or [T>0, H, W, 3], got {frames.dtype} {frames.shape}")


def encode_mp4(frames: np.ndarray, fps: float = FPS, crf: int = 18) -> bytes:
    """uint8 frames, grayscale [T, H, W] or RGB [T, H, W, 3] -> H.264 mp4 bytes, the frames piped to
    ffmpeg's stdin."""
    pix = _pixel_format(frames)
    t, h, w = frames.shape[:3]
    with tempfile.TemporaryDirectory(prefix="avsr-mp4-") as tmp:
        out = Path(tmp) / "v.mp4"      # mp4 needs a seekable output for its index: a file, not a pipe
        run_ffmpeg(["-f", "rawvideo", "-pix_fmt", pix, "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "pipe:0",
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
    pixel_formats = [_pixel_format(v) for v in videos]
    with tempfile.TemporaryDirectory(prefix="avsr-mp4-") as tmp:
        inputs, outputs = [], []
        for i, v in enumerate(videos):
            raw = Path(tmp) / f"{i}.raw"
            raw.write_bytes(np.ascontiguousarray(v).tobytes())
            inputs += ["-f", "rawvideo", "-pix_fmt", pixel_formats[i], "-s", f"{v.shape[2]}x{v.shape[1]}", "-r", f"{fps:g}",
                       "-i", str(raw)]
            outputs += ["-map", f"{i}:v", *_x264_args(fps, crf), str(Path(tmp) / f"{i}.mp4")]
        run_ffmpeg(["-threads", "1", *inputs, *outputs])
        data = [(Path(tmp) / f"{i}.mp4").read_bytes() for i in range(len(videos))]
    if not all(data):
        raise MediaError("ffmpeg wrote an empty mp4")
    return data


