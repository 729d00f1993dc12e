"""Offline attention-sink / massive-activation report (DESIGN.md section 2), as the trainer writes it.

A trained run, probed on the first batch of a shard split, exactly like the training-time probe
(same batch, same prompt assembly, same monitor settings unless overridden):

    python launch/analyze_sinks.py --run-dir runs/demo --out runs/demo/sinks/offline
    python launch/analyze_sinks.py --run-dir runs/demo --checkpoint export --shards data/synth \\
        --split test --num-samples 4 --out /tmp/sinks

Any local transformers causal LM (Llama-style: model.layers[i].self_attn / .mlp.down_proj) on text:

    python launch/analyze_sinks.py --llm /models/Llama-3.2-3B --text "The cat sat." --out /tmp/sinks

Writes into --out: report.json (per-layer detail), the PNG figures, metrics.json (the metrics the
trainer logs to MLflow), probe.json (what was probed) and summary.txt (the printed summary).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere in the checkout

import torch  # noqa: E402

from trainer.config_checks import OneLineParser, folder_problem, user_error  # noqa: E402
from trainer.model.roles import TokenRole  # noqa: E402
from trainer.monitor.analysis import SinkReport  # noqa: E402
from trainer.monitor.labels import token_labels  # noqa: E402

MAX_SINKS_SHOWN = 6      # intermediate sinks listed per layer in the summary
MAX_CARRIERS_SHOWN = 4   # tokens carrying massive values listed per group of layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="run folder of launch/train.py (experiment.json, checkpoints/, ...)")
    src.add_argument("--llm", help="text-only mode: local folder of a transformers causal LM + tokenizer")
    p.add_argument("--out", required=True, help="folder for report.json, the figures and the summary")
    p.add_argument("--checkpoint", default="latest",
                   help="run mode: 'latest' (newest checkpoint that verifies), 'export' (export/model.safetensors), or "
                        "a path: a checkpoint folder, a checkpoints/ folder, a .safetensors file (consolidated or "
                        "trainable weights), a .pt state dict (loaded with weights_only=True) (default: latest)")
    p.add_argument("--shards", help="run mode: shard folder, or s3://, https:// or pipe: location "
                                    "(default: the run's data.shard_dir)")
    p.add_argument("--split", help="run mode: split to probe (default: the run's data.eval_split)")
    p.add_argument("--num-samples", type=int,
                   help="run mode: clips probed, at most (the first ones of the split's first batch; "
                        "default: the run's monitor.probe_batch_size)")
    p.add_argument("--text", action="append", default=[], help="text-only mode: a sample (repeat for more)")
    p.add_argument("--text-file", help="text-only mode: a file with one sample per non-empty line")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="text-only mode: dtype the LLM is loaded in (default: float32)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:1' or 'auto' (default: cpu)")
    p.add_argument("--sink-epsilon", type=float, help="override the sink threshold epsilon (default 0.3)")
    p.add_argument("--layers", type=int, nargs="+",
                   help="decoder layers to analyse (negative = from the end; default: all)")
    p.add_argument("--figure-layers", type=int, nargs="+", help="layers drawn in the per-layer figures")
    p.add_argument("--no-figures", action="store_true", help="write report.json and the summary only")
    args = p.parse_args(argv)
    if args.llm is None and (args.text or args.text_file):
        p.error("--text/--text-file go with --llm")
    if args.llm is not None and not (args.text or args.text_file):
        p.error("--llm needs --text or --text-file")
    if args.run_dir is None and (args.shards or args.split or args.num_samples):
        p.error("--shards/--split/--num-samples go with --run-dir")
    if args.num_samples is not None and args.num_samples < 1:
        p.error("--num-samples must be >= 1")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: {err} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here")
    return device


def monitor_config(base, args: argparse.Namespace, probe_rows: int):
    from trainer.monitor.config import MonitorConfig

    changes: dict = {"probe_batch_size": probe_rows}
    if args.sink_epsilon is not None:
        changes["sink_epsilon"] = args.sink_epsilon
    if args.layers:
        changes["layers"] = tuple(args.layers)
    if args.figure_layers:
        changes["figure_layers"] = tuple(args.figure_layers)
    if args.no_figures:
        changes["figures"] = False
    return dataclasses.replace(base or MonitorConfig(), **changes)


# --------------------------------------------------------------------------- run mode
def probe_run(args: argparse.Namespace, out: Path, device: torch.device) -> tuple[SinkReport, dict]:
    from trainer.data import storage
    from trainer.data.shard_format import check_split
    from trainer.run_folder.load import load_run_config, load_trained_model
    from trainer.engine.probe import first_eval_batch, run_probe
    from trainer.model.avsr import build_tokenizer
    from trainer.monitor.monitor import SinkMonitor

    cfg = load_run_config(args.run_dir)          # fails early, before the model is built
    data = dataclasses.replace(cfg.data, shard_dir=args.shards or cfg.data.shard_dir)
    split = args.split or data.eval_split
    shards = data.shard_dir
    check_split(shards, split)
    model, cfg, src = load_trained_model(args.run_dir, args.checkpoint, device)
    tokenizer = build_tokenizer(cfg.model)
    rows = args.num_samples or cfg.monitor.probe_batch_size
    monitor = SinkMonitor(monitor_config(cfg.monitor, args, rows))
    batch = first_eval_batch(data, model.input_streams, split, rows)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    report, _ = run_probe(monitor, model, tokenizer, batch, step=src.step or 0, out_dir=out, step_subdir=False)
    labels = report.token_labels
    meta = {"mode": "run", "run_dir": str(args.run_dir), "weights": src.describe(), "step": src.step,
            "shards": storage.redact(shards), "split": split, "keys": list(batch.get("keys", [])),
            "text": list(batch.get("text", [])), "tokens": labels}
    return report, meta


# --------------------------------------------------------------------------- text-only mode
def read_texts(args: argparse.Namespace) -> list[str]:
    texts = [t for t in args.text if t.strip()]
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise FileNotFoundError(f"--text-file not found: {path}")
        texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError("no non-empty text to probe")
    return texts


def text_batch(tokenizer, texts: list[str]):
    """Right-padded ids [B, T], mask and roles: BOS at 0 (added when the tokenizer does not), text, EOS."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        rows.append(ids)
    if tokenizer.bos_token_id is None:
        logging.getLogger("analyze_sinks").warning("no BOS token in the tokenizer: position 0 taken as BOS")
    t = max(len(r) for r in rows)
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None))
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    roles = torch.full_like(ids, int(TokenRole.TRANSCRIPT))
    if tokenizer.eos_token_id is not None:
        roles[ids == tokenizer.eos_token_id] = int(TokenRole.EOS)
    roles[:, 0] = int(TokenRole.BOS)
    roles[mask == 0] = int(TokenRole.PAD)
    return ids, mask, roles


def probe_text(args: argparse.Namespace, out: Path, device: torch.device) -> tuple[SinkReport, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model.llm import DTYPES
    from trainer.monitor.monitor import SinkMonitor

    folder = Path(args.llm)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--llm {folder}: not a transformers model folder (no config.json)")
    texts = read_texts(args)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=DTYPES[args.dtype])
    model.to(device).eval()
    ids, mask, roles = text_batch(tokenizer, texts)
    ids, mask, roles = ids.to(device), mask.to(device), roles.to(device)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    monitor = SinkMonitor(monitor_config(None, args, len(texts)))
    labels = token_labels(ids, roles, mask.sum(1), tokenizer)
    report = monitor.run(model, embeds, mask, roles, step=0, out_dir=out, step_subdir=False, token_labels=labels)
    meta = {"mode": "text", "llm": str(folder), "text": texts, "tokens": labels}
    return report, meta


# --------------------------------------------------------------------------- summary
def _f(x: float, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def summarize(report: SinkReport, labels: list[list[str]], header: str) -> str:
    lines = [header, f"sink: alpha > {report.sink_epsilon}; massive: |H| > 100 and > 1000 x median |H| "
                     f"(monitor thresholds); {len(report.lengths)} sample(s), "
                     f"lengths {report.lengths.tolist()}", ""]
    head = (f"{'layer':>5}  {'BOS sink':>8}  {'inter.':>6}  {'sinks by role':<28}  {'massive':>7}  "
            f"{'max|H|':>8}  {'x median':>8}  {'features':<14}  {'shared':>6}  {'MLP share':>9}  "
            f"{'cos->BOS sink/other':>19}")
    lines += [head, "-" * len(head)]
    for s in report.layers:
        roles = ", ".join(f"{k} {v}" for k, v in sorted(s.sinks_by_role.items())) or "-"
        feats = ",".join(map(str, s.massive_features[:6])) + ("..." if len(s.massive_features) > 6 else "")
        shared = "-" if s.sink_features_shared is None else ("yes" if s.sink_features_shared else "no")
        cos = f"{_f(s.cos_to_bos_sink)} / {_f(s.cos_to_bos_nonsink)}"
        lines.append(f"{s.layer:>5}  {s.bos_sink_head_frac:>8.2f}  {s.intermediate_sink_count:>6.1f}  "
                     f"{roles:<28}  {s.massive_count:>7}  {s.max_abs:>8.3g}  "
                     f"{_f(s.massive_ratio, '.3g'):>8}  {feats or '-':<14}  {shared:>6}  "
                     f"{_f(s.mlp_share):>9}  {cos:>19}")
    lines.append("")
    lines.append("columns: BOS sink = fraction of heads where BOS is a sink (mean over samples); "
                 "inter. = non-BOS sink tokens per sample; features = feature indices j of the massive "
                 "entries; shared = every sink token carries massive values in the same features; "
                 "MLP share = |MLP| / (|MLP| + |attention|) written at the massive entries "
                 "(1 = created by the MLP)")
    first = report.first_massive_layer
    if first < 0:
        lines.append("massive activations: none")
    else:
        s = report.layer(first)
        origin = "-" if math.isnan(s.mlp_share) else ("the MLP" if s.mlp_share > 0.5 else "attention")
        lines.append(f"massive activations: first in layer {first} (features {s.massive_features[:8]}, "
                     f"MLP share {_f(s.mlp_share)}: written by {origin}); present in "
                     f"{sum(x.massive_count > 0 for x in report.layers)} of {len(report.layers)} "
                     f"analysed layers")
    lines += massive_carriers(report)
    lines.append("intermediate sinks of sample 0 (token: role, fraction of heads):")
    any_sink = False
    for s in report.layers:
        toks = sorted((t for t in s.sink_tokens if t.batch == 0 and t.token > 0), key=lambda t: -t.head_frac)
        if not toks:
            continue
        any_sink = True
        shown = ", ".join(f"{t.token} {labels[0][t.token]!r} {t.role} {t.head_frac:.2f}"
                          for t in toks[:MAX_SINKS_SHOWN])
        more = f" (+{len(toks) - MAX_SINKS_SHOWN} more)" if len(toks) > MAX_SINKS_SHOWN else ""
        lines.append(f"  L{s.layer}: {shown}{more}")
    if not any_sink:
        lines.append("  none")
    return "\n".join(lines)


def massive_carriers(report: SinkReport) -> list[str]:
    """Which tokens carry the massive values: for sample 0, per run of layers with the same
    carriers, each token's position, label, role, massive features and largest |H| over the run;
    and, over all samples, how many carriers each role has."""
    groups: list[tuple[tuple, list]] = []            # (key, [LayerStats, ...])
    for s in report.layers:
        mine = [m for m in s.massive_tokens if m.batch == 0]
        if not mine:
            continue
        key = tuple(sorted((m.token, tuple(sorted(m.features)), m.is_sink) for m in mine))
        if groups and groups[-1][0] == key and groups[-1][1][-1].layer + 1 == s.layer:
            groups[-1][1].append(s)
        else:
            groups.append((key, [s]))
    if not groups:
        return []
    lines = ["tokens carrying the massive values, sample 0 (position 'token' role [features] largest |H| "
             "over the layers; * = also a sink there):"]
    for _, layers in groups:
        peak: dict[int, float] = {}
        for s in layers:
            for m in s.massive_tokens:
                if m.batch == 0:
                    peak[m.token] = max(peak.get(m.token, 0.0), m.max_abs)
        first = [m for m in layers[0].massive_tokens if m.batch == 0]
        first.sort(key=lambda m: -peak[m.token])
        shown = ", ".join(
            f"{m.token} {report.label(0, m.token)!r} {m.role}{'*' if m.is_sink else ''} "
            f"[{','.join(map(str, m.features[:4]))}{',...' if len(m.features) > 4 else ''}] {peak[m.token]:.3g}"
            for m in first[:MAX_CARRIERS_SHOWN])
        more = f" (+{len(first) - MAX_CARRIERS_SHOWN} more)" if len(first) > MAX_CARRIERS_SHOWN else ""
        span = f"L{layers[0].layer}" + (f"-L{layers[-1].layer}" if len(layers) > 1 else "")
        lines.append(f"  {span}: {shown}{more}")
    if len(report.lengths) > 1:
        by_role = Counter(m.role for s in report.layers for m in s.massive_tokens)
        lines.append(f"  all {len(report.lengths)} samples, carriers summed over layers by role: "
                     + ", ".join(f"{k} {v}" for k, v in by_role.most_common()))
    return lines


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = Path(args.out)
    try:            # the inputs, before any model is built: a mistake is one line, exit 2
        problem = folder_problem("--out", out)
        if problem:
            raise ValueError(problem)
        device = pick_device(args.device)
        report, meta = (probe_run if args.run_dir else probe_text)(args, out, device)
    except (OSError, ValueError) as err:      # a missing/unfit input (a RuntimeError is a bug: its traceback)
        return user_error(err)
    if meta["mode"] == "run":
        header = (f"sink report: run {meta['run_dir']}, {meta['weights']}, split {meta['split']} of "
                  f"{meta['shards']} -> {out}")
    else:
        header = f"sink report: {meta['llm']} on {len(meta['text'])} text sample(s) -> {out}"
    text = summarize(report, meta["tokens"], header)
    (out / "probe.json").write_text(json.dumps(meta, indent=1))
    (out / "metrics.json").write_text(json.dumps(report.to_metrics(), indent=1, sort_keys=True))
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {', '.join(sorted(p.name for p in report.files))}, metrics.json, probe.json, summary.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
