"""trainer/data/stream.py: the training stream rolls over epochs, counts skipped samples, and resumes
at the same micro-batch (or at the next epoch without fast-forward)."""
from trainer.data.stream import TrainStream


def _loader_factory(sizes):
    def make(epoch):   # epoch e yields sizes[e % len] batches, each tagged with (epoch, i)
        return iter([{"id": (epoch, i), "skipped": {"bad_video": 1}} for i in range(sizes[epoch % len(sizes)])])
    return make


def test_train_stream_rolls_epochs_and_resumes_exactly():
    make = _loader_factory([3, 2])
    full = TrainStream(make)
    seen = [next(full)["id"] for _ in range(7)]
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert full.pop_skipped() == {"bad_video": 7} and full.pop_skipped() == {}

    part = TrainStream(make)
    for _ in range(4):
        next(part)
    resumed = TrainStream.from_state(make, part.state())
    assert [next(resumed)["id"] for _ in range(3)] == seen[4:]

    fresh = TrainStream.from_state(make, part.state(), fast_forward=False)
    assert next(fresh)["id"] == (2, 0)      # next epoch, not a replay
