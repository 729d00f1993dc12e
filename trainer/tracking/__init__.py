"""Experiment tracking: MLflow on rank 0, off the training thread, never lost.

`tracker.py` is what the trainer calls (a no-op on other ranks), `courier.py` delivers its calls in
order and keeps what a down store could not take, `store.py` checks the store before a run and tidies
runs left RUNNING by a process that died, `config.py` holds the options.
"""
