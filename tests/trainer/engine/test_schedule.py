"""The learning-rate schedule: no step at lr 0, the logged lr is the one the step used.

Pinned values for warmup 0, 1 and 10 (peak 1e-3, 100 steps, floor 0.1), first as the factor function,
then read from a real DeepSpeed engine (one process, gloo) exactly where the trainer reads it: before
engine.step(), with every step checked to change the weights by the lr it claims (SGD, so the change is
lr x gradient). A resumed schedule: its position from the checkpoint, its curve from the current config.
"""
import math

import pytest
import torch

from trainer.engine.schedule import lr_factor, warmup_cosine

PEAK, TOTAL, FLOOR = 1e-3, 100, 0.1


def _cos(step, warmup):
    progress = (step - warmup) / (TOTAL - 1 - warmup)
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


EXPECTED = {   # lr of optimizer steps 1, 2, 3, ... (index = completed steps before it)
    0: [PEAK, PEAK * _cos(1, 0), PEAK * _cos(2, 0)],
    1: [PEAK / 2, PEAK, PEAK * _cos(2, 1)],
    10: [PEAK * k / 11 for k in range(1, 11)] + [PEAK, PEAK * _cos(11, 10)],
}


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_first_steps_follow_the_warmup(warmup):
    got = [PEAK * lr_factor(i, warmup_steps=warmup, total_steps=TOTAL, min_lr_ratio=FLOOR)
           for i in range(len(EXPECTED[warmup]))]
    assert got == pytest.approx(EXPECTED[warmup], rel=1e-12)
    assert all(v > 0 for v in got)


def test_schedule_ends_at_the_floor_and_never_rises_after_warmup():
    f = [lr_factor(i, warmup_steps=10, total_steps=TOTAL, min_lr_ratio=FLOOR) for i in range(TOTAL)]
    assert f[TOTAL - 1] == pytest.approx(FLOOR)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(TOTAL + 5, warmup_steps=10, total_steps=TOTAL, min_lr_ratio=FLOOR) == pytest.approx(FLOOR)


def test_a_resumed_schedule_takes_its_position_from_the_checkpoint_and_its_shape_from_the_config():
    """What a checkpoint keeps of the schedule is its position: resumed with another max-steps, the next
    lr is the current config's curve at that position (the factor's settings are not saved)."""
    def schedule(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
        return opt, warmup_cosine(opt, warmup_steps=10, total_steps=total, min_lr_ratio=FLOOR)

    opt, first = schedule(TOTAL)
    for _ in range(30):
        opt.step()
        first.step()
    saved = first.state_dict()
    opt, resumed = schedule(2 * TOTAL)
    resumed.load_state_dict(saved)
    assert resumed.last_epoch == 30
    opt.step()
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(PEAK * lr_factor(31, warmup_steps=10, total_steps=2 * TOTAL,
                                                                      min_lr_ratio=FLOOR), rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_a_deepspeed_engine_trains_every_step_with_the_logged_lr(gloo_world_of_one, warmup):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "optimizer": {"type": "SGD", "params": {"lr": PEAK}}, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=config,
        lr_scheduler=lambda opt: warmup_cosine(opt, warmup_steps=warmup, total_steps=TOTAL, min_lr_ratio=FLOOR))
    x = torch.ones(1, 4)
    for expected in EXPECTED[warmup]:
        used = engine.get_lr()[0]                    # what the trainer logs for this step
        before = model.weight.detach().clone()
        loss = model(x).sum()                        # d loss / d w = 1 for every weight
        engine.backward(loss)
        engine.step()
        assert used == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(before - model.weight.detach(), torch.full_like(before, expected))
