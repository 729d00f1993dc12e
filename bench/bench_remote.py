"""Clips per second streaming shards from a local S3 endpoint vs reading local files.

Builds fixture shards (as bench_data.py), starts moto's S3 server on loopback (or uses --endpoint),
uploads the shards with the project's shard writer path (OutFolder.put), then measures the eval
pass (tar read -> decode -> batch) from the folder and from s3:// with 0, 1 and 2 DataLoader
workers, interleaved, --rounds times (medians reported). To say where a difference comes from it
also measures the raw byte stream alone (no decoding: MB/s from disk vs from S3) and the CPU the
S3 server spends serving (it shares the machine's cores with the loader here; a real object store
does not).

  PYTHONPATH=. python bench/bench_remote.py --workers 0,1,2 --rounds 3 --csv bench_remote.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere in the checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import build_fixture, run_once  # noqa: E402
from trainer.data import DataConfig, storage  # noqa: E402
from trainer.data.shard_format import index_name, load_index  # noqa: E402
from trainer.model.config import MODALITIES  # noqa: E402


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process from /proc (the S3 server's CPU while it serves)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("moto server did not start")


def raw_read(urls: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds (this process) to stream every shard's bytes (no decoding), and the bytes."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for url in urls:
        with (open(url, "rb") if not storage.is_remote(url) else storage.open_stream(url)) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return time.perf_counter() - t0, time.process_time() - c0, n


def client_cpu_s() -> float:
    """CPU seconds to create the S3 client, which each DataLoader worker does once per loader."""
    storage._clients.clear()
    c0 = time.process_time()
    storage._s3_client(storage.RetryPolicy())
    return time.process_time() - c0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting (medians reported)")
    p.add_argument("--repeat", type=int, default=1, help="eval passes over the split per measurement")
    p.add_argument("--modality", default="avsr", choices=MODALITIES, help="which streams to decode")
    p.add_argument("--endpoint", help="an S3 endpoint already running (default: start moto's server here)")
    p.add_argument("--fixture-shards", type=int, default=4, help="fixture: number of shards")
    p.add_argument("--fixture-clips", type=int, default=12, help="fixture: clips per shard")
    p.add_argument("--fixture-frames", default="50,150", help="fixture: min,max frames per clip (25 fps)")
    p.add_argument("--csv", help="append the rows to this CSV file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    tmp = tempfile.TemporaryDirectory(prefix="bench_remote_")
    folder, split = Path(tmp.name), "bench"
    lo, hi = (int(x) for x in args.fixture_frames.split(","))
    build_fixture(folder, args.fixture_shards, args.fixture_clips, lo, hi)
    index = load_index(folder, split)

    proc = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        proc, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        import boto3
        boto3.client("s3").create_bucket(Bucket="bench")
        remote = "s3://bench/shards"
        out = storage.OutFolder(remote)
        for info in index.shards:
            out.put(folder / info.name, info.name)
        out.put(folder / index_name(split), index_name(split))

        rows = []
        for rnd in range(args.rounds):
            for workers in (int(w) for w in args.workers.split(",")):
                for source, where in (("local", str(folder)), ("s3", remote)):
                    cfg = DataConfig(shard_dir=where, train_split="-", eval_split=split, test_split="--",
                                     num_workers=workers, max_clip_frames=600)
                    server0 = proc_cpu_s(proc.pid) if proc else 0.0
                    row = run_once(cfg, args.modality, "eval", split, args.repeat)
                    row.update(source=source, round=rnd,
                               server_cpu_s=round(proc_cpu_s(proc.pid) - server0, 3) if proc else float("nan"))
                    rows.append(row)
                    print(f"# {row}", file=sys.stderr)
        raw = {}
        for source, urls in (("local", [str(folder / s.name) for s in index.shards]),
                             ("s3", [storage.join(remote, s.name) for s in index.shards])):
            server0 = proc_cpu_s(proc.pid) if proc else 0.0
            secs = [raw_read(urls) for _ in range(args.rounds)]
            raw[source] = (statistics.median(s for s, _, _ in secs), statistics.median(c for _, c, _ in secs),
                           secs[0][2], (proc_cpu_s(proc.pid) - server0) / args.rounds if proc else float("nan"))
        client_cpu = statistics.median(client_cpu_s() for _ in range(5))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()

    print(f"cpu cores: {os.cpu_count()}  load average: {os.getloadavg()[0]:.1f}  torch {torch.__version__}  "
          f"{index.num_samples} clips in {len(index.shards)} shards, "
          f"{sum((folder / s.name).stat().st_size for s in index.shards) / 1e6:.1f} MB  S3: {endpoint}")
    print(f"{'source':>8} {'workers':>8} {'clips/s':>9} {'cpu_s':>8} {'server_cpu_s':>13}   (medians of {args.rounds})")
    summary = []
    for workers in (int(w) for w in args.workers.split(",")):
        for source in ("local", "s3"):
            sel = [r for r in rows if r["source"] == source and r["workers"] == workers]
            med = {k: statistics.median(r[k] for r in sel) for k in ("clips_per_s", "cpu_s", "server_cpu_s")}
            summary.append({"source": source, "workers": workers, **med})
            print(f"{source:>8} {workers:>8} {med['clips_per_s']:>9.2f} {med['cpu_s']:>8.2f} "
                  f"{med['server_cpu_s']:>13.2f}")
    for source, (secs, cpu, nbytes, server_cpu) in raw.items():
        print(f"raw stream {source:>5}: {nbytes / secs / 1e6:8.1f} MB/s ({secs * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms "
              f"client CPU for {nbytes / 1e6:.1f} MB; server CPU {server_cpu * 1e3:.0f} ms)")
    print(f"S3 client creation (once per DataLoader worker per loader): {client_cpu * 1e3:.0f} ms CPU")
    if args.csv:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["source", "workers", "clips_per_s", "cpu_s", "server_cpu_s",
                                              "host_cpus", "load_avg"])
            if new:
                w.writeheader()
            for r in summary:
                w.writerow({**r, "host_cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 1)})
    tmp.cleanup()


if __name__ == "__main__":
    main()
