"""A trained run folder read back, without DeepSpeed's engine: the model (`load.py`) and its WER on a
shard split, clean and under noise (`evaluate.py`, the library of launch/evaluate.py)."""
