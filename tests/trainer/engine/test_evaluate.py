"""trainer/engine/evaluate.py with a stand-in model: WER and the per-utterance report, the loss per token,
a stop signal during an evaluation, and when the periodic evaluation runs."""
import json

import pytest
import torch

from trainer.engine.evaluate import PeriodicEval


class _EchoModel(torch.nn.Module):
    """Decodes every utterance as its reference except keys listed in `wrong`."""

    def __init__(self, wrong=()):
        super().__init__()
        self.wrong = set(wrong)

    def generate(self, batch, **_):
        """Token ids, as the model returns them: here the UTF-8 bytes of the text (BYTES decodes them)."""
        return [list(("x" if k in self.wrong else t).encode()) for k, t in zip(batch["keys"], batch["text"])]


class BYTES:
    """A tokenizer stand-in whose ids are UTF-8 bytes."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return bytes(ids).decode()


def test_evaluate_wer_caps_samples_and_writes_report(tmp_path):
    from trainer.engine.evaluate import evaluate_wer

    batches = [{"keys": [f"u{i}{j}" for j in range(4)], "text": ["a b"] * 4} for i in range(3)]
    model = _EchoModel(wrong={"u00"})
    model.train()
    report = tmp_path / "eval.json"
    res = evaluate_wer(model, batches, tokenizer=BYTES, device=torch.device("cpu"), to_device=lambda b: b, num_beams=1,
                       max_new_tokens=8, synced_gpus=False, max_samples=6, report_path=report)
    assert res["num_utterances"] == 6 and res["ref_words"] == 12
    assert res["wer"] == pytest.approx(2 / 12)              # "x" for "a b": one substitution, one deletion
    assert model.training                                    # train mode restored
    rows = json.loads(report.read_text())["utterances"]
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows) and len(rows) == 6
    full = evaluate_wer(_EchoModel(), batches, tokenizer=BYTES, device=torch.device("cpu"), to_device=lambda b: b, num_beams=1,
                        max_new_tokens=8, synced_gpus=False)
    assert full["num_utterances"] == 12 and full["wer"] == 0


class _NllEcho(_EchoModel):
    """Echo decoding plus a teacher-forced pass: each utterance's summed CE is its key's last digit,
    over len(transcript_ids) + 1 target tokens."""

    def target_nll(self, batch):
        assert "transcript_ids" in batch          # the references are tokenized for the loss pass
        return (torch.tensor([float(k[-1]) for k in batch["keys"]]),
                torch.tensor([len(t) + 1 for t in batch["transcript_ids"]]))


def test_evaluation_reports_per_utterance_counts_and_the_loss_per_token(tmp_path, monkeypatch):
    from trainer.engine import evaluate
    from trainer.model import prompt_text

    monkeypatch.setattr(prompt_text, "with_transcript_ids",
                        lambda tok, b: {**b, "transcript_ids": [list(t.encode()) for t in b["text"]]})
    batches = [{"keys": [f"u{i}{j}" for j in range(2)], "text": ["a b", "c d e"]} for i in range(2)]
    report = tmp_path / "eval.json"
    res = evaluate.evaluate_wer(_NllEcho(wrong={"u01"}), batches, tokenizer=BYTES, device=torch.device("cpu"),
                                to_device=lambda b: b, num_beams=1, max_new_tokens=8, synced_gpus=False,
                                report_path=report, loss=True)
    rows = {r["key"]: r for r in json.loads(report.read_text())["utterances"]}
    assert rows["u01"]["word_errors"] == 3 and rows["u01"]["ref_words"] == 3       # "x" for "c d e"
    assert rows["u00"]["word_errors"] == 0 and rows["u00"]["ref_words"] == 2
    assert sum(r["word_errors"] for r in rows.values()) / sum(r["ref_words"] for r in rows.values()) == res["wer"]
    assert rows["u11"]["nll"] == 1.0 and rows["u11"]["target_tokens"] == 6
    # CE sums 0 + 1 + 0 + 1 over 4 + 6 + 4 + 6 target tokens
    assert res["loss_per_token"] == pytest.approx(2 / 20) and res["target_tokens"] == 20
    only = evaluate.evaluate_loss(_NllEcho(), batches, tokenizer=BYTES, device=torch.device("cpu"),
                                  to_device=lambda b: b, max_samples=2)
    assert only["loss_per_token"] == pytest.approx(1 / 10) and "wer" not in only and only["num_utterances"] == 2


def test_evaluate_wer_stops_at_once_on_a_stop_signal(tmp_path):
    """A SLURM time-limit signal during a long eval: the next batch is not decoded, nothing is reported,
    train mode is restored, and the trainer gets EvalInterrupted to checkpoint and exit."""
    from trainer.engine.evaluate import EvalInterrupted, evaluate_wer

    batches = [{"keys": [f"u{i}{j}" for j in range(4)], "text": ["a b"] * 4} for i in range(3)]
    model = _EchoModel()
    model.train()
    calls = []
    original = model.generate
    model.generate = lambda batch, **kw: calls.append(batch["keys"][0]) or original(batch, **kw)
    report = tmp_path / "eval.json"
    with pytest.raises(EvalInterrupted, match="after 4 utterances"):
        evaluate_wer(model, batches, tokenizer=BYTES, device=torch.device("cpu"), to_device=lambda b: b, num_beams=1,
                     max_new_tokens=8, synced_gpus=False, report_path=report,
                     stop_requested=lambda: len(calls) >= 1)     # the signal lands during batch 1
    assert calls == ["u00"] and model.training and not report.exists()


def test_a_complete_evaluation_is_kept_when_the_stop_comes_after_the_last_batch():
    from trainer.engine.evaluate import evaluate_wer

    class Echo(torch.nn.Module):
        def generate(self, batch, **_):
            return [list(t.encode()) for t in batch["text"]]          # ids: UTF-8 bytes

    class Bytes:
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return bytes(ids).decode()

    batches = [{"keys": [f"u{i}{j}" for j in range(2)], "text": ["a b"] * 2} for i in range(3)]
    calls = []
    result = evaluate_wer(Echo(), batches, tokenizer=Bytes, device=torch.device("cpu"), to_device=lambda b: calls.append(1) or b,
                          num_beams=1, max_new_tokens=4, synced_gpus=False,
                          stop_requested=lambda: len(calls) >= 3)    # the signal lands during the last batch
    assert result["num_utterances"] == 6 and result["wer"] == 0


def test_the_periodic_evaluation_decides_when_it_is_due():
    ev = PeriodicEval(every=4, max_steps=12)
    assert [s for s in range(1, 13) if ev.should_run(s)] == [4, 8]     # step 12: the final evaluation's
    assert not any(PeriodicEval(every=0, max_steps=12).should_run(s) for s in range(1, 13))
