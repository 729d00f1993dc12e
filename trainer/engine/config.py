"""Training-loop options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from trainer.config_checks import Problems


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    """Folder for checkpoints, exports, the MLflow store (by default) and reports."""
    max_steps: int = 400
    """Optimizer steps to train for."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate (LoRA and projectors)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 40
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a fraction of `lr`."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    seed: int = 1234
    """Seed for model init and dropout (the data order has its own: --data.seed)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto = the GPUs when any are visible (nvidia-smi, an NVIDIA driver, SLURM's GPU variables), else
    the CPU; GPUs visible but unusable (an inherited DS_ACCELERATOR=cpu, a CPU-only torch, an old driver)
    stop the run with one line naming the cause. cpu = train on the CPU even where GPUs are (the trainer
    sets DS_ACCELERATOR=cpu for DeepSpeed). cuda = the GPUs or an error."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = the DeepSpeed JSON's explicit bf16.enabled, else bf16 on a GPU that supports it and fp32 on
    CPU. bf16 (GPU or CPU) = DeepSpeed's bf16 mode: every trainable weight in bf16, fp32 master weights and
    Adam moments in the optimizer, losses summed in fp32; frozen parts keep --model.load-dtype."""
    log_every: int = 10
    """Steps between metric logs (the first and the last step are logged too)."""
    eval_every: int = 0
    """Steps between WER evaluations on the validation split (0 = only at the end)."""
    eval_max_samples: Optional[int] = None
    """Cap on validation samples per periodic evaluation, over all ranks (None = the whole split)."""
    eval_beams: int = 1
    """Beam width for evaluation decoding (1 = greedy; the paper uses 15)."""
    eval_max_new_tokens: int = 32
    """Longest transcript generated in evaluation."""
    eval_loss: bool = True
    """With every WER evaluation, the teacher-forced loss per target token on the same utterances (the
    training cross-entropy, one forward per batch, no generation): continuous where WER counts words."""
    val_loss_every: int = 0
    """Steps between teacher-forced loss passes over the validation split (no generation; at most
    eval_max_samples utterances), from step 0 of a fresh run: the validation loss curve. 0 = never."""
    eval_untrained: bool = True
    """Before the first step of a fresh run, report the untrained model's WER on the test split
    (the baseline in results.json)."""
    final_eval_splits: Optional[tuple[str, ...]] = None
    """Splits whose WER is evaluated when training finishes, in order, e.g. `val test` (None =
    data.eval_split then data.test_split; an empty list = no end-of-run evaluation). results.json has
    one entry per split."""
    final_eval_max_samples: Optional[int] = None
    """Cap on samples per split in the end-of-run evaluation, over all ranks (None = whole splits)."""
    final_eval_beams: Optional[int] = None
    """Beam width of the end-of-run evaluation (None = eval_beams)."""
    save_every: int = 200
    """Steps between checkpoints (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    resume: str = "auto"
    """'auto' = resume from the run folder's latest complete checkpoint if any; 'never'; or a checkpoint path."""
    stop_after: Optional[int] = None
    """Stop (with a checkpoint) after this many steps in this invocation: for time-sliced jobs
    that resume in the next allocation."""
    fast_forward_data: bool = True
    """On resume, skip the micro-batches already consumed in the current data epoch, so the resumed
    run sees exactly the batches an uninterrupted run would (costs decoding them once more)."""
    export_on_finish: bool = True
    """Write the LoRA adapters (peft format), the projector weights and a consolidated model at the end."""

    def __post_init__(self):
        p = Problems("train")
        p.at_least(self, ("max_steps", "grad_accum", "log_every", "keep_last", "eval_beams"), 1, integer=True)
        p.at_least(self, ("eval_every", "save_every", "val_loss_every"), 0, integer=True)
        p.one_of(self, "device", ("auto", "cuda", "cpu"))
        p.check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        p.at_least(self, ("seed", "weight_decay"), 0, integer=False)
        p.at_least(self, ("eval_max_new_tokens",), 1, integer=True)
        p.check(0 <= self.warmup_steps <= self.max_steps, "warmup_steps",
                f"must be in [0, {p.flag('max_steps')}] = [0, {self.max_steps}], got {self.warmup_steps}")
        p.check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        p.check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        for name in ("final_eval_beams", "eval_max_samples", "final_eval_max_samples", "stop_after"):
            if getattr(self, name) is not None:
                p.at_least(self, (name,), 1, integer=True)
        p.check(self.final_eval_splits is None or all(self.final_eval_splits), "final_eval_splits",
                f"has an empty split name: {self.final_eval_splits}")
        p.raise_any()
        if self.final_eval_splits is not None:
            self.final_eval_splits = tuple(dict.fromkeys(self.final_eval_splits))    # a recipe's list; no repeats
