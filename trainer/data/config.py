"""Configuration of the streaming audio-visual data pipeline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config_checks import Problems

from . import storage

NOISE_KINDS = ("none", "white", "babble")

# where the synthetic demo corpus lives: launch/train.py builds it there (data_tools.demo) when the
# run reads this folder and it has no indexes yet
DEMO_SHARD_DIR = "data/synth"


@dataclass
class DataConfig:
    shard_dir: str = DEMO_SHARD_DIR
    """Folder with `{split}-NNNNNN.tar` shards and their `{split}.index.json` indexes, or the same
    under `s3://bucket/prefix`, `https://host/prefix` or `pipe:COMMAND` writing `{name}` to stdout
    (streamed; credentials from the environment, ~/.aws or ~/.netrc, never here). The default is the
    synthetic demo corpus, which launch/train.py builds there on first use."""
    cache_dir: str = ""
    """Remote shards only: a local folder that keeps shards once read, so later epochs read them from
    disk; least recently used shards go first beyond cache_max_gb. Empty: no cache (pure streaming)."""
    cache_max_gb: float = 50.0
    """Size bound of cache_dir, in GB (1e9 bytes)."""
    remote_attempts: int = 5
    """Remote shards only: tries in a row without progress (connection reset, 5xx, timeout) before a
    shard is given up and skipped (counted as tar_error); retries are counted as data/retried/<reason>."""
    remote_timeout_s: float = 60.0
    """Remote shards only: connect and read timeout of one request, in seconds."""
    train_split: str = "train"
    """Split name of the training shards."""
    eval_split: str = "val"
    """Split name used for validation during training."""
    test_split: str = "test"
    """Split name of the held-out test set."""

    max_frames_per_batch: int = 1500
    """Padded video-frame budget per batch: max clip frames in the batch x batch size <= this
    (25 fps, so 1500 = 60 s of padded video). Audio cost follows (4 mel frames per video frame)."""
    max_batch_size: int = 64
    """Hard cap on clips per batch, whatever the budget allows."""
    eval_max_frames_per_batch: Optional[int] = None
    """max_frames_per_batch of evaluation batches (validation, test, the sink probe); None = the training
    value. Greedy decoding on a CPU reads every weight once per generated token whatever the batch size,
    so larger eval batches decode many times faster and change no result."""
    eval_max_batch_size: Optional[int] = None
    """max_batch_size of evaluation batches; None = the training value. The sink probe takes its clips
    from the first validation batch, so --monitor.probe-batch-size N needs eval batches of >= N clips."""
    max_clip_frames: int = 600
    """Clips longer than this (video frames; 600 = 24 s) are skipped and counted as "too_long"."""
    min_clip_frames: int = 2
    """Clips shorter than this are skipped as "too_short" (a 3-D conv stem needs a few frames)."""
    sort_buffer: int = 64
    """Training only: clips gathered and sorted by length before batching, to cut padding;
    batches formed from one buffer are emitted in random order. 0 or 1 disables sorting."""

    shuffle_shards: bool = True
    """Training only: draw shards as random permutations (else cycle in index order)."""
    shuffle_buffer: int = 256
    """Training only: clips held in the sample shuffle buffer (raw bytes, before decoding)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    samples_per_epoch: int = 0
    """Training: clips per rank per epoch; 0 = the index's sample count / world size."""
    batches_per_epoch: int = 0
    """Training: batches per rank per epoch; 0 = derived from samples_per_epoch and the index's mean
    clip length. Every rank yields exactly this many batches, so all ranks step together."""
    seed: int = 0
    """Base seed; shard order, shuffles, crops, flips and noise derive from (seed, rank, worker, epoch)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""

    crop_size: int = 88
    """Side of the square mouth crop (center crop in eval, random crop in training)."""
    horizontal_flip: bool = True
    """Training only: flip clips horizontally with probability 0.5."""
    noise: str = "none"
    """Additive audio noise: "none", "white", or "babble" (a sum of earlier clips from the stream)."""
    snr_db: float = 5.0
    """Signal-to-noise ratio of the added noise, in dB."""
    noise_prob: float = 0.5
    """Probability that a clip gets noise (when noise != "none")."""
    noise_in_eval: bool = False
    """Also add noise to eval/test clips (noise-robustness evaluation; deterministic per seed)."""
    babble_speakers: int = 4
    """Babble noise: number of earlier clips summed."""
    babble_reservoir: int = 32
    """Babble noise: clips kept in the per-worker reservoir of earlier audio."""

    strict_sample_rate: bool = False
    """Skip audio that is not 16 kHz (reason "audio_sample_rate") instead of resampling it."""
    max_initial_failures: int = 200
    """A worker that sees this many failures before its first good clip raises: the shard set
    is unusable (wrong format, wrong folder), and failing loudly beats an endless empty stream."""

    @property
    def retry_policy(self) -> storage.RetryPolicy:
        return storage.RetryPolicy(attempts=self.remote_attempts, timeout_s=self.remote_timeout_s)

    def __post_init__(self) -> None:
        p = Problems("data")
        try:
            storage.check_location(self.shard_dir)
        except ValueError as err:
            p.check(False, "shard_dir", str(err))
        p.check(self.cache_max_gb > 0, "cache_max_gb", f"must be > 0, got {self.cache_max_gb}")
        p.at_least(self, ("remote_attempts",), 1, integer=True)
        p.check(self.remote_timeout_s > 0, "remote_timeout_s", f"must be > 0, got {self.remote_timeout_s}")
        p.one_of(self, "noise", NOISE_KINDS)
        p.at_least(self, ("max_frames_per_batch", "max_batch_size", "max_clip_frames", "min_clip_frames",
                          "crop_size", "prefetch_factor", "max_initial_failures"), 1, integer=True)
        p.at_least(self, ("sort_buffer", "shuffle_buffer", "num_workers", "samples_per_epoch",
                          "batches_per_epoch", "babble_reservoir"), 0, integer=True)
        p.at_least(self, [n for n in ("eval_max_frames_per_batch", "eval_max_batch_size")
                          if getattr(self, n) is not None], 1, integer=True)
        if not p.found:                # the relations below assume numbers
            p.check(self.max_clip_frames <= (self.eval_max_frames_per_batch or self.max_frames_per_batch),
                    "max_clip_frames", f"({self.max_clip_frames}) must be <= {p.flag('eval_max_frames_per_batch')} "
                    f"({self.eval_max_frames_per_batch}), or the longest allowed clip could not form an eval batch")
            p.check(self.max_clip_frames <= self.max_frames_per_batch, "max_clip_frames",
                    f"({self.max_clip_frames}) must be <= {p.flag('max_frames_per_batch')} "
                    f"({self.max_frames_per_batch}), or the longest allowed clip could not form a batch")
            p.check(self.min_clip_frames <= self.max_clip_frames, "min_clip_frames",
                    f"({self.min_clip_frames}) must be <= {p.flag('max_clip_frames')} ({self.max_clip_frames})")
        p.check(0.0 <= self.noise_prob <= 1.0, "noise_prob", f"must be in [0, 1], got {self.noise_prob}")
        p.at_least(self, ("seed",), 0, integer=True)
        p.at_least(self, ("babble_speakers",), 1, integer=True)
        p.check(abs(self.snr_db) < float("inf"), "snr_db", f"must be a finite number of dB, got {self.snr_db}")
        if self.noise == "babble":
            p.at_least(self, ("babble_speakers", "babble_reservoir"), 1, integer=True)
        p.check(self.train_split not in (self.eval_split, self.test_split), "train_split",
                f"{self.train_split!r} must differ from {p.flag('eval_split')} and {p.flag('test_split')}")
        p.raise_any()


@dataclass(frozen=True)
class Streams:
    """What the model reads, hence what the pipeline decodes. It is not a data option: the caller
    takes it from the model (`LlamaAVSR.input_streams`: its modality and its Whisper's mel bins),
    so the two can never disagree."""

    audio: bool
    """Decode audio into log-mels (modality asr or avsr)."""
    video: bool
    """Decode the mouth-crop video (modality vsr or avsr)."""
    n_mels: int = 0
    """Log-mel bins (the Whisper encoder's num_mel_bins); unused without audio."""

    def __post_init__(self) -> None:
        if not (self.audio or self.video):
            raise ValueError("Streams: neither audio nor video to decode")
        if self.audio and self.n_mels < 1:
            raise ValueError(f"Streams: audio needs n_mels >= 1, got {self.n_mels}")
