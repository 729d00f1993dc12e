"""Whisper's encoder on the clip's own frames vs on its fixed 30 s window.

Real Whisper checkpoints are trained on 30 s windows (3000 mel frames), so a 2 s clip costs as
much as 30 s. `--model.whisper-pad-to-30s False` runs the encoder on the clip's own frames (the
position table sliced to them). Whisper has no attention mask, so the two differ: in the window,
every frame also attends to ~28 s of silence. This script measures, on speech from
`data_tools synth` and a converted Whisper folder (`python -m data_tools pretrained`):

  - encoder time per batch, both ways (median of --repeats);
  - how close the clip-length output is to the window's first frames (relative L2 error, mean
    per-frame cosine);
  - what it does to recognition: Whisper's own decoder, greedy, on either encoding (WER/CER).

  python bench/bench_whisper_window.py --whisper models/whisper-tiny.en
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--whisper", type=Path, default=Path("models/whisper-tiny.en"), help="converted Whisper folder")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import torch

    from data_tools.pretrained import synth_check_speech
    from data_tools.whisper_convert import WhisperTranscriber, spell_digits
    from trainer.data.features import log_mel
    from trainer.model.audio_encoder import WhisperAudioEncoder
    from trainer.model.metrics import error_counts

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        speech = synth_check_speech(Path(tmp))
    transcriber = WhisperTranscriber(args.whisper)
    encoder = transcriber.model.model.encoder
    mels = [log_mel(torch.from_numpy(w), encoder.config.num_mel_bins)[0] for w, _ in speech]
    lengths = torch.tensor([m.shape[1] for m in mels])
    mel = torch.zeros(len(mels), mels[0].shape[0], int(lengths.max()))
    for i, m in enumerate(mels):
        mel[i, :, :m.shape[1]] = m
    modes = {"30 s window": WhisperAudioEncoder(encoder, pad_to_window=True),
             "clip frames": WhisperAudioEncoder(encoder, pad_to_window=False)}
    out, times = {}, {}
    with torch.no_grad():
        for name, enc in modes.items():
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out[name], n_out = enc(mel, lengths)
                runs.append(time.perf_counter() - t0)
            times[name] = statistics.median(runs)
    a, b = out["30 s window"], out["clip frames"]
    rel, cos = [], []
    for i, n in enumerate(n_out.tolist()):
        rel.append(float((a[i, :n] - b[i, :n]).norm() / a[i, :n].norm()))
        cos.append(float(torch.nn.functional.cosine_similarity(a[i, :n], b[i, :n], dim=-1).mean()))
    refs = [t for _, t in speech]
    print(f"{len(speech)} clips of {lengths.float().mean() / 100:.1f} s on average (max {lengths.max() / 100:.1f} s), "
          f"{torch.get_num_threads()} threads")
    print(f"encoder time per batch: 30 s window {times['30 s window']:.2f} s, clip frames "
          f"{times['clip frames']:.2f} s ({times['30 s window'] / times['clip frames']:.1f}x)")
    print(f"clip-frame output vs the window's first frames: relative L2 error {statistics.mean(rel):.3f} "
          f"(min {min(rel):.3f}, max {max(rel):.3f}), mean cosine {statistics.mean(cos):.3f}")
    decodings = {"the full 30 s window (standard)": transcriber([w for w, _ in speech]),
                 "the window's first frames only": transcriber.decode(a, n_out),
                 "the clip frames (clip-length run)": transcriber.decode(b, n_out)}
    for name, hyps in decodings.items():
        hyps = [spell_digits(h) for h in hyps]
        c = error_counts(refs, hyps)
        # Without trailing silence Whisper's decoder does not stop (it repeats the sentence): the WER of
        # the hypothesis cut to the reference's word count says whether the content was read correctly.
        cut = error_counts(refs, [" ".join(h.split()[:len(r.split())]) for h, r in zip(hyps, refs)])
        print(f"Whisper's decoder on {name}: WER {c.wer:.1%} CER {c.cer:.1%}; cut to the reference length: "
              f"WER {cut.wer:.1%}   e.g. {hyps[1][:120]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
