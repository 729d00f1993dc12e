"""Shards in object storage and behind HTTP, against real servers on loopback.

A local S3 endpoint (moto's server) and Python's http.server, each started here and stopped by PID,
with the fault proxy (tests/support/fault_proxy.py) between the loader and them where faults are wanted:
connection resets mid-shard, 503 answers and stalls are retried and counted (data/retried/...), a
shard that keeps failing is skipped and counted like a corrupt one, an unreachable split is one
clear error at start. The shard writer writes straight to S3 with the old split kept until the new
one is complete.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import boto3
import pytest

from data_tools.shards import Sample, write_split
from data_tools.tones import tone_sample
from data_tools.validate import validate
from tests.constants import REPO
from tests.helpers import child_env
from tests.support.data_fixtures import have_ffmpeg
from tests.support.remote_servers import fault_events, s3_env, set_faults, start_http, start_moto, start_proxy
from trainer.data import DataConfig, build_eval_loader, build_train_loader
from trainer.data import storage
from trainer.data.shard_format import load_index
from trainer.data.skips import SHARD_SHORT, TAR_ERROR, metric_name
from trainer.model.config import ModelConfig

STREAMS = ModelConfig().streams()          # what the default (tiny, avsr) model reads

pytestmark = pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg binary needed to encode fixture mp4")
SHARDS, PER_SHARD = 3, 4
BUCKET = "avsr-test"


@dataclass(frozen=True)
class Clip:
    """A fixture clip for the shard writer (picklable: the writer may use processes)."""
    key: str
    frames: int
    seed: int


def make_clip_sample(item: Clip) -> Sample:
    if item.key == "boom":
        raise RuntimeError("producer bug")
    return tone_sample(item.key, item.frames, seed=item.seed, size=88 if item.seed % 2 else 96)


def clips(split: str) -> list[Clip]:
    return [Clip(f"{split}_{i:03d}", 8 + (7 * i) % 25, i) for i in range(SHARDS * PER_SHARD)]


def write(out: str, split: str, items=None, **kw):
    return write_split(items or clips(split), make_clip_sample, out, split, max_samples=PER_SHARD, workers=1,
                       progress=False, **kw)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """moto (S3) and http.server over a local copy, each with a fault proxy in front; env for boto3."""
    tmp = tmp_path_factory.mktemp("remote")
    local = tmp / "local"
    for split in ("train", "val"):
        write(str(local), split)
    started = []
    try:
        moto = start_moto(tmp)
        started.append(moto)
        web = start_http(local, tmp)
        started.append(web)
        s3_proxy = start_proxy(moto.url, tmp)
        started.append(s3_proxy)
        web_proxy = start_proxy(web.url, tmp)
        started.append(web_proxy)
        old = {k: os.environ.get(k) for k in s3_env("")}
        os.environ.update(s3_env(moto.url))
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        for split in ("train", "val"):
            write(f"s3://{BUCKET}/corpus", split)      # the writer, straight to object storage
        yield {"tmp": tmp, "local": local, "moto": moto, "web": web, "s3_proxy": s3_proxy, "web_proxy": web_proxy}
    finally:
        for server in reversed(started):
            server.stop()
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def via_s3_proxy(servers, monkeypatch):
    """boto3 talks to the fault proxy in front of moto (for this test only)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", servers["s3_proxy"].url)
    set_faults(servers["s3_proxy"], [])
    yield servers["s3_proxy"]
    set_faults(servers["s3_proxy"], [])


def _cfg(shard_dir, **kw):
    base = dict(shard_dir=str(shard_dir), num_workers=0, max_frames_per_batch=120, max_clip_frames=100,
                shuffle_buffer=8, sort_buffer=8, remote_attempts=4, remote_timeout_s=30)
    base.update(kw)
    return DataConfig(**base)


def _eval(cfg, split="val"):
    """(keys, texts, video sums, counts) of one eval pass: what the model would see, and the counts."""
    keys, texts, sums, counts = [], [], [], Counter()
    for b in build_eval_loader(cfg, STREAMS, split, 0, 1):
        keys += b["keys"]
        texts += b["text"]
        sums += [float(v) for v in b["video"].float().sum(dim=(1, 2, 3))]
        counts.update(b["skipped"])
    return keys, texts, sums, counts


def test_locations_are_checked_and_redacted():
    for bad in ("https://user:secret@host/shards", "s3://bucket/p?X-Amz-Signature=secret", "gs://b/p",
                "pipe:cat shards/train-000000.tar"):
        with pytest.raises(ValueError) as err:
            DataConfig(shard_dir=bad)
        assert "secret" not in str(err.value)
    assert storage.redact("fetch https://u:pw@h/p/x.tar?sig=abc failed") == "fetch https://***@h/p/x.tar?*** failed"
    assert storage.join("s3://b/p/", "a.tar") == "s3://b/p/a.tar"
    assert storage.join("pipe:cat /d/{name}", "a b.tar") == "pipe:cat /d/'a b.tar'"


def test_s3_and_http_and_pipe_stream_the_same_clips_as_local_files(servers):
    local = _eval(_cfg(servers["local"]))
    assert len(local[0]) == SHARDS * PER_SHARD and not local[3]
    for where in (f"s3://{BUCKET}/corpus", servers["web"].url, f"pipe:cat {servers['local']}/{{name}}"):
        assert _eval(_cfg(where)) == local, where
    # training streams too, the same batches as from local files (same seed, same shard order)
    train_local = [b["keys"] for b in build_train_loader(_cfg(servers["local"], batches_per_epoch=5), STREAMS, 0, 1)]
    train_s3 = [b["keys"]
                for b in build_train_loader(_cfg(f"s3://{BUCKET}/corpus", batches_per_epoch=5), STREAMS, 0, 1)]
    assert train_s3 == train_local


def test_s3_writer_keeps_the_old_split_until_the_new_one_is_complete(servers):
    s3 = boto3.client("s3")
    out = f"s3://{BUCKET}/rewrite"

    def objects():
        listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="rewrite/").get("Contents", [])
        return {o["Key"].split("/", 1)[1]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}

    first = write(out, "val")
    assert sorted(objects()) == ["val-000000.tar", "val-000001.tar", "val-000002.tar", "val.index.json"]
    assert first.index.urls[0] == f"{out}/val-000000.tar"
    with pytest.raises(FileExistsError):
        write(out, "val")
    before = objects()
    with pytest.raises(RuntimeError, match="producer bug"):
        write(out, "val", items=[Clip("val_000", 8, 0), Clip("boom", 8, 1)], overwrite=True)
    assert objects() == before             # no temporary object left, the old split untouched
    res = write(out, "val", items=clips("val")[:5], overwrite=True)
    assert sorted(objects()) == ["val-000000.tar", "val-000001.tar", "val.index.json"]
    assert load_index(out, "val").num_samples == res.index.num_samples == 5
    assert validate(out).ok


def test_resets_503s_and_stalls_are_retried_and_counted(servers, via_s3_proxy):
    local = _eval(_cfg(servers["local"]))
    set_faults(via_s3_proxy, [
        {"method": "GET", "path": "val-000000.tar", "action": "reset", "after": 30000, "times": 2},
        {"method": "GET", "path": "val-000001.tar", "action": "status", "status": 503, "times": 2},
        {"method": "GET", "path": "val-000002.tar", "action": "stall", "seconds": 8, "times": 1},
    ])
    keys, texts, sums, counts = _eval(_cfg(f"s3://{BUCKET}/corpus", remote_timeout_s=3))
    assert (keys, texts, sums) == local[:3]            # every clip, intact, despite the faults
    events = Counter(e["action"] for e in fault_events(via_s3_proxy))
    assert events == {"reset": 2, "status": 2, "stall": 1}
    retried = {metric_name(r): n for r, n in counts.items()}
    # a loaded machine may add a slow answer to the stall (more timeouts), never fewer retries
    assert retried.pop("data/retried/timeout") >= 1
    assert retried == {"data/retried/connection": 2, "data/retried/http_503": 2}


def test_http_resets_resume_mid_shard(servers):
    proxy = servers["web_proxy"]
    set_faults(proxy, [{"method": "GET", "path": "val-000001.tar", "action": "reset", "after": 40000, "times": 1},
                       {"method": "GET", "path": "val-000002.tar", "action": "status", "status": 503, "times": 1}])
    try:
        keys, texts, sums, counts = _eval(_cfg(proxy.url))
    finally:
        set_faults(proxy, [])
    assert (keys, texts, sums) == _eval(_cfg(servers["local"]))[:3]
    assert counts == {"retried/connection": 1, "retried/http_503": 1}


def test_a_shard_that_keeps_failing_is_skipped_like_a_corrupt_one(servers, via_s3_proxy):
    set_faults(via_s3_proxy, [{"method": "GET", "path": "val-000001.tar", "action": "status", "status": 503,
                               "times": -1}])
    keys, _, _, counts = _eval(_cfg(f"s3://{BUCKET}/corpus", remote_attempts=3))
    assert len(keys) == (SHARDS - 1) * PER_SHARD
    assert not set(keys) & {f"val_{i:03d}" for i in range(PER_SHARD, 2 * PER_SHARD)}    # the second shard's
    assert counts[TAR_ERROR] == 1 and counts[SHARD_SHORT] == PER_SHARD
    assert counts["retried/http_503"] == 2             # 3 attempts: 2 retries, then given up


def test_an_unreachable_split_is_one_clear_error_at_start(servers, monkeypatch):
    from trainer.config import ConfigError, parse_args
    config = ["--config", str(REPO / "ds_configs" / "zero3.json"), "--data.remote-attempts", "2",
              "--train.final-eval-splits", "val", "--train.eval-untrained", "False"]     # train and val only
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")      # nothing listens there
    with pytest.raises(storage.RemoteError, match=r"cannot read the 'val' shard index s3://avsr-test/corpus/val"):
        build_eval_loader(_cfg(f"s3://{BUCKET}/corpus", remote_attempts=2), STREAMS, "val", 0, 1)
    # the trainer's parse step, before any process starts: one line
    with pytest.raises(ConfigError, match=r"--data.shard-dir s3://avsr-test/corpus: .*gave up after 2 attempts"):
        parse_args([*config, "--data.shard-dir", f"s3://{BUCKET}/corpus"])
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", servers["moto"].url)
    with pytest.raises(ConfigError, match=r"s3://avsr-test/corpus: no shard index for split\(s\) \['nope'\]"):
        parse_args([*config, "--data.shard-dir", f"s3://{BUCKET}/corpus", "--data.eval-split", "nope"])
    assert parse_args([*config, "--data.shard-dir", f"s3://{BUCKET}/corpus"]).data.shard_dir.startswith("s3://")
    with pytest.raises(FileNotFoundError, match=r"no shard index for split 'val' at s3://avsr-test/nothing"):
        build_eval_loader(_cfg(f"s3://{BUCKET}/nothing"), STREAMS, "val", 0, 1)
    # an index whose shards are not all there: named at start, not found shard by shard later
    s3 = boto3.client("s3")
    s3.copy_object(Bucket=BUCKET, Key="partial/val.index.json", CopySource=f"{BUCKET}/corpus/val.index.json")
    with pytest.raises(FileNotFoundError, match="3 of 3 shards listed in the 'val' index are missing"):
        build_eval_loader(_cfg(f"s3://{BUCKET}/partial"), STREAMS, "val", 0, 1)


def test_the_cache_keeps_shards_read_again(servers, tmp_path):
    """With a cache folder, a second pass reads the shards from disk: the server could refuse them all."""
    proxy = servers["web_proxy"]
    cache = tmp_path / "cache"
    set_faults(proxy, [])
    first = _eval(_cfg(proxy.url, cache_dir=str(cache)))
    cached = sorted(cache.iterdir())
    assert len(cached) == SHARDS and all(p.stat().st_size > 10000 for p in cached)
    set_faults(proxy, [{"method": "GET", "path": ".tar", "action": "status", "status": 503, "times": -1}])
    try:
        again = _eval(_cfg(proxy.url, cache_dir=str(cache), remote_attempts=1))
    finally:
        set_faults(proxy, [])
    assert again == first and fault_events(proxy) == []
    # bounded: room for one shard keeps one (the most recently read)
    small = tmp_path / "small"
    one = max(p.stat().st_size for p in cached)
    _eval(_cfg(f"s3://{BUCKET}/corpus", cache_dir=str(small), cache_max_gb=1.5 * one / 1e9))
    assert len(list(small.iterdir())) == 1


def test_validate_cli_checks_remote_shard_sets(servers):
    env = child_env()
    for args in ([f"s3://{BUCKET}/corpus"], [servers["web"].url, "--split", "val"]):
        p = subprocess.run([sys.executable, "-m", "data_tools", "validate", *args], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.strip().endswith("OK") and " 12 samples" in " ".join(p.stdout.split())


def test_synth_writes_straight_to_s3(servers):
    """The converters' output: `data_tools synth --out s3://...` (credentials from the environment)."""
    out = f"s3://{BUCKET}/synth-cli"
    p = subprocess.run([sys.executable, "-m", "data_tools", "synth", "--out", out, "--num", "6", "--workers", "1",
                        "--samples-per-shard", "2", "--quiet"], env=child_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sum(load_index(out, split).num_samples for split in ("train", "val", "test")) == 6
    assert validate(out).ok


def test_analyze_sinks_takes_a_remote_shard_location(servers, tmp_path, capsys):
    """--shards https://...: the split check reads the remote index (then stops at the missing checkpoint)."""
    import importlib.util

    from trainer.config import ExperimentConfig
    spec = importlib.util.spec_from_file_location("analyze_sinks", REPO / "launch" / "analyze_sinks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = tmp_path / "run"
    run.mkdir()
    cfg = ExperimentConfig(config=str(REPO / "ds_configs" / "zero3.json")).to_dict()
    cfg["train"]["run_dir"] = str(run)
    (run / "experiment.json").write_text(json.dumps(cfg))
    web = servers["web"].url
    assert module.main(["--run-dir", str(run), "--shards", web, "--split", "test", "--out", str(tmp_path / "o")]) == 2
    assert f"no split 'test' at {web}" in capsys.readouterr().err
    assert module.main(["--run-dir", str(run), "--shards", web, "--out", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err          # past the shard check


def test_a_run_folder_never_chooses_a_command_to_run(tmp_path, capsys):
    """A run folder may come from someone else: a pipe: shard location in its experiment.json is not run."""
    import importlib.util

    from trainer.config import ExperimentConfig
    from trainer.run_folder.load import load_run_config
    spec = importlib.util.spec_from_file_location("analyze_sinks", REPO / "launch" / "analyze_sinks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run, marker = tmp_path / "run", tmp_path / "ran"
    run.mkdir()
    cfg = ExperimentConfig(config=str(REPO / "ds_configs" / "zero3.json")).to_dict()
    cfg["train"]["run_dir"] = str(run)
    cfg["data"]["shard_dir"] = f"pipe:touch {marker}; cat /dev/null/{{name}}"
    (run / "experiment.json").write_text(json.dumps(cfg))
    assert load_run_config(run).data.shard_dir == ""
    assert module.main(["--run-dir", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "pass --shards" in capsys.readouterr().err
    assert not marker.exists()
