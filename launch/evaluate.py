"""WER/CER of a trained run on a shard split, clean and under noise, on 1 or more processes.

    python launch/evaluate.py --run-dir runs/demo --shards data/synth --split test
    python launch/evaluate.py --run-dir runs/demo --checkpoint export --split test --beams 4 --max-samples 100
    python launch/evaluate.py --run-dir runs/demo --split test --snr clean 10 5 0 -5 --noise babble --mlflow
    deepspeed --num_gpus 2 --master_port 29611 launch/evaluate.py --run-dir runs/demo --split test

Prints a table (WER/CER per condition) and writes into --out (default: RUN/evaluate/<split>-<time>):
results.json (settings and every condition's figures), table.txt (the printed table) and
utterances_<condition>.json (key, reference, hypothesis per utterance). --mlflow also logs the
figures and that folder to the run's own MLflow run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere in the checkout

from trainer.config_checks import OneLineParser, user_error  # noqa: E402
from trainer.run_folder.evaluate import (NOISES, EvalRequest, check_request, evaluate_run,  # noqa: E402
                                         format_table, log_to_mlflow, parse_conditions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder of launch/train.py (experiment.json, checkpoints/)")
    p.add_argument("--checkpoint", default="latest",
                   help="'latest' (newest checkpoint that verifies), 'export' (the export written at the end), or a "
                        "path: a checkpoint folder, a checkpoints/ folder, a state-dict file (default: latest)")
    p.add_argument("--shards", help="shard folder, or s3://, https:// or pipe: location "
                                    "(default: the run's data.shard_dir)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--beams", type=int, help="beam width (default: the run's train.eval_beams; 1 = greedy)")
    p.add_argument("--max-new-tokens", type=int, help="longest transcript generated (default: the run's)")
    p.add_argument("--max-samples", type=int, help="evaluate at most this many utterances, over all processes")
    p.add_argument("--snr", nargs="+", metavar="DB",
                   help="conditions: 'clean' and/or signal-to-noise ratios in dB, e.g. --snr clean 10 5 0 -5 "
                        "(default: clean only)")
    p.add_argument("--noise", default="babble", choices=NOISES, help="noise added at each --snr (default: babble)")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: the run's)")
    p.add_argument("--out", help="output folder (default: RUN/evaluate/<split>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--mlflow", action="store_true", help="also log to the run's MLflow run")
    p.add_argument("--device", default="auto",
                   help="'auto' (this process's GPU, else CPU), 'cpu' or 'cuda' (default: auto)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)   # the deepspeed launcher's
    return p.parse_args(argv)


def pick_device(name: str, local_rank: int):
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: no CUDA device here")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "evaluate" / f"{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:        # every input checked before a model or a process group: a mistake is one line, exit 2
        req = EvalRequest(run_dir=run_dir, out_dir=out, checkpoint=args.checkpoint, shards=args.shards,
                          split=args.split, beams=args.beams, max_new_tokens=args.max_new_tokens,
                          max_samples=args.max_samples, conditions=tuple(parse_conditions(args.snr)),
                          noise=args.noise, workers=args.workers)
        check_request(req)
        device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    except (OSError, ValueError, RuntimeError) as err:
        return user_error(err) if rank == 0 else 2
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        results = evaluate_run(req, rank=rank, world_size=world, device=device)
        if rank == 0:
            print(format_table(results), end="", flush=True)
            print(f"written: {out}", flush=True)
            if args.mlflow:
                print(f"logged to MLflow run {log_to_mlflow(run_dir, results, out)}", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
