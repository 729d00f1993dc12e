"""A synthetic mouth region whose movements follow the speech.

The mouth opening follows the audio envelope (per video frame) and the lip shape
follows the phonemes espeak-ng reports, mapped to viseme classes and spread over
the voiced frames. That gives VSR a real, learnable signal: the shape sequence
carries the phoneme identity that the envelope alone does not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.shard_format import FPS

FRAME_SIZE = 96      # rendered size; the loader random-crops 88x88


@dataclass(frozen=True)
class Viseme:
    name: str
    opening: float        # fraction of the speaker's full opening
    width: float          # factor on the speaker's mouth width
    teeth: float          # 0..1 visibility of the upper teeth
    weight: float         # relative duration when spreading phonemes over time


VISEMES: dict[str, Viseme] = {v.name: v for v in [
    Viseme("rest", 0.0, 1.00, 0.0, 1.0),
    Viseme("closed", 0.0, 0.95, 0.0, 1.0),        # p b m: lips pressed
    Viseme("labiodental", 0.12, 1.00, 1.0, 1.0),  # f v: upper teeth on the lower lip
    Viseme("dental", 0.30, 1.00, 0.8, 1.0),       # th: tongue between the teeth
    Viseme("sibilant", 0.22, 1.15, 1.0, 1.0),     # s z sh ch j: teeth together, spread
    Viseme("spread", 0.40, 1.22, 0.6, 1.8),       # i: I j
    Viseme("mid", 0.70, 1.05, 0.3, 1.8),          # e @ 3
    Viseme("open", 1.00, 1.00, 0.2, 2.0),         # a A V
    Viseme("rounded", 0.55, 0.62, 0.0, 1.8),      # u U o O w
    Viseme("other", 0.40, 1.00, 0.3, 0.8),        # t d n l k g h r ...
]}

STRESS_CHARS = "',%=_|"
# espeak-ng -x (Kirshenbaum-like) diphthongs: the lips move from the first shape to the second
DIPHTHONGS = {"aI": ("open", "spread"), "aU": ("open", "rounded"), "eI": ("mid", "spread"),
              "OI": ("rounded", "spread"), "oU": ("rounded", "rounded"), "e@": ("mid", "mid"),
              "i@": ("spread", "mid"), "I@": ("spread", "mid"), "U@": ("rounded", "mid"),
              "aI@": ("open", "mid"), "aU@": ("open", "mid")}


def viseme_of(phoneme: str) -> str:
    """The viseme class of one espeak-ng -x phoneme (stress marks already removed)."""
    p = phoneme
    if p[:2] in ("tS", "dZ") or p[0] in "szSZ":
        return "sibilant"
    if p[0] in "pbm":
        return "closed"
    if p[0] in "fv":
        return "labiodental"
    if p[0] in "TD":
        return "dental"
    if p[0] in "uUoO0w":
        return "rounded"
    if p[0] in "aAV":
        return "open"
    if p[0] in "@3eE":
        return "mid"
    if p[0] in "iIj":
        return "spread"
    return "other"


def parse_phonemes(text: str) -> list[str]:
    """Viseme names, in order, from `espeak-ng -x --sep=_` output ("p_l_'eI_s b_l_'u: ...")."""
    out: list[str] = []
    for word in text.split():
        for ph in word.split("_"):
            ph = ph.strip(STRESS_CHARS).replace("'", "").replace(",", "")
            if not ph or not (ph[0].isalnum() or ph[0] in "@"):
                continue
            if ph.rstrip(":#") in DIPHTHONGS:
                out.extend(DIPHTHONGS[ph.rstrip(":#")])
            else:
                out.append(viseme_of(ph))
    return out


def frame_envelope(audio: np.ndarray, sample_rate: int, num_frames: int, fps: float = FPS) -> np.ndarray:
    """RMS of the audio in each video frame's window, [num_frames]."""
    hop = sample_rate / fps
    env = np.zeros(num_frames, dtype=np.float32)
    for t in range(num_frames):
        seg = audio[int(round(t * hop)):int(round((t + 1) * hop))]
        env[t] = np.sqrt(np.mean(seg.astype(np.float64) ** 2)) if len(seg) else 0.0
    return env


def align_visemes(visemes: list[str], envelope: np.ndarray, threshold: float = 0.08) -> list[str]:
    """One viseme per frame: phonemes spread over the voiced frames in proportion to their weights.

    espeak-ng reports no timing on its command line, so this is an approximation: voiced
    frames are those whose envelope passes `threshold` x the peak; unvoiced frames rest.
    """
    n = len(envelope)
    peak = float(envelope.max()) if n else 0.0
    voiced = np.flatnonzero(envelope > threshold * peak) if peak > 0 else np.array([], dtype=int)
    out = ["rest"] * n
    if not visemes or len(voiced) == 0:
        return out
    bounds = np.cumsum([VISEMES[v].weight for v in visemes])
    for i, frame in enumerate(voiced):
        pos = (i + 0.5) / len(voiced) * bounds[-1]
        out[frame] = visemes[min(int(np.searchsorted(bounds, pos, side="right")), len(visemes) - 1)]
    return out


@dataclass(frozen=True)
class Face:
    """A synthetic "speaker's" look: drawn the same way in all of their utterances."""
    skin: float = 150.0          # gray level of the skin
    lip: float = 95.0            # gray level of the lips
    cx: float = 48.0             # mouth centre (pixels)
    cy: float = 50.0
    half_width: float = 22.0     # mouth half-width at rest
    max_open: float = 11.0       # inner half-height at full opening
    lip_thickness: float = 4.0
    shade: float = 20.0          # strength of the illumination gradient
    shade_angle: float = 0.0
    noise: float = 3.0           # per-pixel noise sigma

    @staticmethod
    def random(rng: np.random.Generator) -> "Face":
        skin = rng.uniform(110, 190)
        return Face(skin=skin, lip=max(75.0, skin - rng.uniform(35, 65)),  # lips stay lighter than the cavity
                    cx=48 + rng.uniform(-4, 4), cy=50 + rng.uniform(-4, 4),
                    half_width=rng.uniform(18, 25), max_open=rng.uniform(8, 13), lip_thickness=rng.uniform(3, 5.5),
                    shade=rng.uniform(5, 30), shade_angle=rng.uniform(0, 2 * np.pi), noise=rng.uniform(1.0, 3.0))


@dataclass
class MouthTrack:
    """Per-frame mouth parameters, [T] each, before drawing."""
    opening: np.ndarray     # inner half-height in pixels
    width: np.ndarray       # half-width in pixels
    teeth: np.ndarray       # 0..1
    visemes: list[str]


def mouth_track(envelope: np.ndarray, frame_visemes: list[str], face: Face) -> MouthTrack:
    """Opening from loudness x viseme, width and teeth from the viseme, smoothed over time."""
    peak = max(float(np.percentile(envelope, 95)), 1e-6)
    loud = np.clip(envelope / peak, 0.0, 1.0) ** 0.7
    shape = np.array([[VISEMES[v].opening, VISEMES[v].width, VISEMES[v].teeth] for v in frame_visemes])
    # opening = loudness x the viseme's opening; the lips never quite close on loud vowels
    opening = face.max_open * loud * (0.25 + 0.75 * shape[:, 0])
    opening[shape[:, 0] == 0.0] = 0.0            # bilabial closure and rest close the lips
    # coarticulation: lips move smoothly between targets
    def smooth(x: np.ndarray) -> np.ndarray:
        return np.convolve(np.pad(x, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")

    return MouthTrack(opening=smooth(opening), width=smooth(face.half_width * shape[:, 1]),
                      teeth=smooth(shape[:, 2]), visemes=frame_visemes)


def _soft_ellipse(dx: np.ndarray, dy: np.ndarray, a: float, b: float) -> np.ndarray:
    """Anti-aliased filled ellipse: 1 inside, 0 outside, ~1 pixel ramp at the edge."""
    a, b = max(a, 1e-3), max(b, 1e-3)
    r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    return np.clip((1.0 - r) * min(a, b) + 0.5, 0.0, 1.0)


def render(track: MouthTrack, face: Face, rng: np.random.Generator, size: int = FRAME_SIZE) -> np.ndarray:
    """Draw the track as uint8 grayscale frames [T, size, size]."""
    n = len(track.opening)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    grad = (np.cos(face.shade_angle) * (xx - size / 2) + np.sin(face.shade_angle) * (yy - size / 2)) / size
    base = face.skin + face.shade * grad
    # a darker chin shadow below the mouth gives the face some structure
    base -= 12.0 * np.exp(-(((yy - face.cy - 30) / 10) ** 2))
    frames = np.empty((n, size, size), dtype=np.uint8)
    jitter = np.cumsum(rng.normal(0, 0.15, size=(n, 2)), axis=0).clip(-1.5, 1.5)   # slight head motion
    for t in range(n):
        dx = xx - (face.cx + jitter[t, 0])
        dy = yy - (face.cy + jitter[t, 1])
        w, h, th = float(track.width[t]), float(track.opening[t]), face.lip_thickness
        img = base.copy()
        lips = _soft_ellipse(dx, dy, w + th * 0.6, h + th)
        img = img * (1 - lips) + face.lip * lips
        inner = _soft_ellipse(dx, dy, w * 0.92, h)
        if h < 0.8:      # closed lips: a dark line where they meet
            line = np.clip(1.0 - np.abs(dy) / 0.9, 0, 1) * (np.abs(dx) < w * 0.9)
            img = img * (1 - 0.6 * line) + 40.0 * 0.6 * line
        else:
            teeth_band = (dy < -h + max(2.0, 0.35 * h)) * float(track.teeth[t])
            cavity = 30.0 * (1 - teeth_band) + 205.0 * teeth_band
            img = img * (1 - inner) + cavity * inner
        img += rng.normal(0.0, face.noise, size=img.shape)
        frames[t] = np.clip(img, 0, 255).round().astype(np.uint8)
    return frames


def mouth_opening_from_frames(frames: np.ndarray, dark: float = 50.0) -> np.ndarray:
    """A measure of the visible opening per frame: the count of dark (cavity) pixels near the centre.

    Used by the tests to check that the rendered video follows the audio.
    """
    c = frames.shape[1] // 2
    roi = frames[:, c - 30:c + 30, c - 34:c + 34].astype(np.float32)
    return (roi < dark).sum(axis=(1, 2)).astype(np.float32)
