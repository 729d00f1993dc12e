"""The sink study's report (launch/study.sh): one markdown file, PNG figures, an MLflow parent run.

Reads each run folder of the study (experiment.json, results.json, the sink monitor's
sinks/step_*/report.json at step 0 and at the end) and writes, in the study folder:

  report.md                    the runs (prompt order, rates, lambda, pre-fusion LayerNorm), WER/CER with
                               the untrained WER, a summary of the sink picture at step 0 and at the end,
                               and per run a per-layer table at both steps: BOS sink fraction,
                               intermediate sinks by role, max |H| and its ratio to the median, the
                               massive features and which tokens carry them, cosine to BOS by role;
  cos_to_bos_by_role.png       per run, per layer: mean cosine to BOS of audio, video, delimiter,
                               instruction and transcript tokens, step 0 (dashed) and end (solid);
  intermediate_sinks.png       per run, per layer: intermediate sinks per sample by role at both steps;
  massive.png                  per run, per layer: max |H| (log scale) at both steps;
  wer.png                      untrained and trained test WER per run;
  summary.json                 the numbers behind the tables.

With MLflow on, it is logged as a parent run ("study") of the study's experiment, and each training
run is tagged as its child (mlflow.parentRunId), so the MLflow UI nests and compares them.

  python launch/study_report.py --study-dir runs/study --runs baseline_high decorr_high baseline_low decorr_low
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.model.config import ModelConfig  # noqa: E402
from trainer.model.roles import ROLE_NAMES  # noqa: E402

COS_ROLES = ("delimiter", "audio", "video", "instruction", "transcript")
SINK_ROLES = ("delimiter", "audio", "video", "instruction", "transcript", "eos")
EXPERIMENT = "mini_study"


# ---- reading a run ------------------------------------------------------------------------------------
def load_run(run_dir: Path) -> dict:
    exp = json.loads((run_dir / "experiment.json").read_text())
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    reports = []
    for path in (run_dir / "sinks").glob("step_*/report.json"):
        reports.append(json.loads(path.read_text()))
    if not reports:
        raise FileNotFoundError(f"{run_dir}: no sink reports (sinks/step_*/report.json): was the monitor on?")
    reports.sort(key=lambda r: r["step"])
    model = exp["model"]
    enabled = list(ModelConfig(modality=model["modality"], modality_order=model["modality_order"]).enabled_modalities)
    return {"name": run_dir.name, "dir": run_dir, "exp": exp, "results": results, "first": reports[0],
            "last": reports[-1], "enabled": enabled}


def token_labels(roles: list[int], enabled: list[str]) -> list[str]:
    """Readable names of a sample's tokens: BOS, <audio>, audio[3], </audio>, instr[0], text[2], EOS."""
    delimiters = [d for m in enabled for d in (f"<{m}>", f"</{m}>")]
    counts: Counter = Counter()
    out = []
    for r in roles:
        name = ROLE_NAMES.get(r, "?")
        if name == "delimiter":
            k = counts[name]
            out.append(delimiters[k] if k < len(delimiters) else f"delim[{k}]")
        elif name in ("bos", "eos"):
            out.append(name.upper())
        else:
            short = {"instruction": "instr", "transcript": "text"}.get(name, name)
            out.append(f"{short}[{counts[name]}]")
        counts[name] += 1
    return out


def _massive_entries(layer: dict, monitor: dict) -> list[dict]:
    entries = layer.get("massive_entries") or layer.get("massive")
    if entries is None:          # older reports: the top-k entries that pass the massive test
        entries = [e for e in layer.get("top_k", []) if abs(e["value"]) > monitor["massive_abs"]
                   and e["ratio"] > monitor["massive_ratio"]]
    return entries


def layer_summary(layer: dict, report: dict, run: dict) -> dict:
    roles = report["token_roles"]
    labels = [token_labels(r, run["enabled"]) for r in roles]
    samples = len(roles)
    # cosine to BOS by role (every real token after BOS of every probe sample)
    by_role: dict[str, list[float]] = defaultdict(list)
    for b, row in enumerate(layer["cos_to_bos"]):
        for t, c in enumerate(row[: len(roles[b])]):
            if t and c is not None and not (isinstance(c, float) and math.isnan(c)):
                by_role[ROLE_NAMES.get(roles[b][t], "?")].append(c)
    cos = {r: (statistics.mean(by_role[r]) if by_role[r] else None) for r in COS_ROLES}
    # intermediate sinks by role, per sample, and the most frequent ones by name
    inter = [s for s in layer["sink_tokens"] if s["token"] != 0]
    sinks = {r: sum(1 for s in inter if s["role"] == r) / samples for r in SINK_ROLES}
    named = Counter(labels[s["batch"]][s["token"]] for s in inter)
    # massive activations: features, and the tokens that carry them
    massive = _massive_entries(layer, run["exp"]["monitor"])
    carriers = Counter(labels[e["batch"]][e["token"]] for e in massive)
    feats = Counter(e["feature"] for e in massive)
    return {
        "layer": layer["layer"], "bos_sink_head_frac": layer["bos_sink_head_frac"],
        "intermediate_sinks": sinks, "intermediate_total": sum(sinks.values()),
        "top_sinks": [f"`{name}` ({n}/{samples})" for name, n in named.most_common(3)],
        "max_abs": layer["max_abs"], "massive_ratio": layer["massive_ratio"],
        "massive_count": layer["massive_count"], "massive_features": [f for f, _ in feats.most_common(4)],
        "massive_carriers": [f"`{name}` x{n}" for name, n in carriers.most_common(3)],
        "cos": cos,
    }


def summarise(run: dict) -> dict:
    out = {}
    for key in ("first", "last"):
        rep = run[key]
        layers = [layer_summary(layer, rep, run) for layer in rep["layers"]]
        mid = [s for s in layers if 2 <= s["layer"] < len(layers) - 1] or layers
        out[key] = {
            "step": rep["step"], "layers": layers,
            "mid_cos": {r: _mean([s["cos"][r] for s in mid]) for r in COS_ROLES},
            "mid_intermediate": _mean([s["intermediate_total"] for s in mid]),
            "mid_bos_sink": _mean([s["bos_sink_head_frac"] for s in mid]),
            "max_abs": max(s["max_abs"] for s in layers),
            "massive_features": Counter(f for s in layers for f in s["massive_features"]).most_common(3),
            "massive_carriers": Counter(c.rsplit(" x", 1)[0] for s in layers for c in s["massive_carriers"]).most_common(3),
        }
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


# ---- writing ------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}"):
    return "n/a" if x is None else fmt.format(x)


def _pct(result: dict | None, key: str = "wer") -> str:
    return "n/a" if not result else f"{100 * result[key]:.1f} %"


def describe(run: dict) -> dict:
    m, t = run["exp"]["model"], run["exp"]["train"]
    return {"order": ", ".join(["BOS"] + [f"`<{x}>`" for x in run["enabled"]] + ["instruction"]),
            "audio_rate": m["audio_rate"], "video_rate": m["video_rate"], "lambda": m["decorrelation_weight"],
            "prefusion_ln": m["prefusion_layernorm"], "steps": run["last"]["step"], "max_steps": t["max_steps"]}


def write_markdown(runs: list[dict], sums: dict, out: Path, wall_s: float | None) -> str:
    lines = ["# Attention sinks in the mini Llama-AVSR: baseline vs decorrelation loss", ""]
    lines.append("Model: Whisper tiny.en encoder (frozen, clip-length frames) + tiny AV-HuBERT (random, frozen) + "
                 "SmolLM2-135M-Instruct (frozen, LoRA r 8 on q/v), synthetic GRID-style corpus "
                 "(`launch/recipes/mini_avsr*.yaml`). Sink probe: the first val batch (4 clips) in the training "
                 "prompt, at step 0 (the pretrained LLM with untrained projectors) and at the end.")
    if wall_s:
        lines.append(f"Whole study: {wall_s / 60:.1f} min wall time.")
    lines += ["", "## Runs and recognition", "",
              "| run | prompt order | audio / video rate | lambda | pre-fusion LN | steps | untrained test WER | test WER | test CER |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        d, r = describe(run), run["results"]
        lines.append(f"| {run['name']} | {d['order']} | {d['audio_rate']} / {d['video_rate']} | {d['lambda']:g} | "
                     f"{d['prefusion_ln']} | {d['steps']} | {_pct(r.get('test_untrained'))} | "
                     f"**{_pct(r.get('test'))}** | {_pct(r.get('test'), 'cer')} |")
    lines += ["", "## The sink picture, step 0 -> end", "",
              "Means over the middle layers (2 .. L-2). cos(X, BOS): mean cosine between BOS's hidden state and "
              "the X tokens'. Intermediate sinks: non-BOS tokens that are a sink (alpha > 0.3) in at least one head, "
              "per sample.", "",
              "| run | step | BOS sink heads | intermediate sinks | cos delim | cos audio | cos video | cos instr | "
              "cos transcript | max abs(H) | top massive features | carried by |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for key in ("first", "last"):
            s = sums[run["name"]][key]
            c = s["mid_cos"]
            lines.append(f"| {run['name']} | {s['step']} | {_f(s['mid_bos_sink'])} | {_f(s['mid_intermediate'], '{:.1f}')} | "
                         f"{_f(c['delimiter'])} | {_f(c['audio'])} | {_f(c['video'])} | {_f(c['instruction'])} | "
                         f"{_f(c['transcript'])} | {s['max_abs']:.3g} | "
                         f"{', '.join(str(f) for f, _ in s['massive_features']) or '-'} | "
                         f"{', '.join(n for n, _ in s['massive_carriers']) or '-'} |")
    lines += ["", "![cosine to BOS by role](cos_to_bos_by_role.png)", "",
              "![intermediate sinks by role](intermediate_sinks.png)", "", "![massive activations](massive.png)", "",
              "![WER](wer.png)", "", "## Per layer", ""]
    for run in runs:
        for key in ("first", "last"):
            s = sums[run["name"]][key]
            lines += [f"<details><summary>{run['name']}, step {s['step']}</summary>", "",
                      "| layer | BOS sink heads | intermediate sinks / sample by role | most frequent | max abs(H) | ratio | "
                      "massive features | carried by | cos delim | cos audio | cos video | cos instr | cos text |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for lay in s["layers"]:
                roles = ", ".join(f"{r} {v:.2g}" for r, v in lay["intermediate_sinks"].items() if v) or "-"
                c = lay["cos"]
                lines.append(f"| {lay['layer']} | {lay['bos_sink_head_frac']:.2f} | {roles} | "
                             f"{'; '.join(lay['top_sinks']) or '-'} | {lay['max_abs']:.3g} | {_f(lay['massive_ratio'], '{:.3g}')} | "
                             f"{', '.join(map(str, lay['massive_features'])) or '-'} | {', '.join(lay['massive_carriers']) or '-'} | "
                             f"{_f(c['delimiter'])} | {_f(c['audio'])} | {_f(c['video'])} | {_f(c['instruction'])} | "
                             f"{_f(c['transcript'])} |")
            lines += ["", "</details>", ""]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def draw(runs: list[dict], sums: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    colors = {"delimiter": "tab:red", "audio": "tab:blue", "video": "tab:green", "instruction": "tab:orange",
              "transcript": "tab:gray", "eos": "tab:purple"}
    files = []

    def grid(title: str):
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.8 * rows), squeeze=False, sharey=True)
        fig.suptitle(title)
        return fig, axes.flatten()

    fig, axes = grid("Cosine to BOS by token role (mean over the probe's tokens)\ndashed: step 0, solid: end")
    for ax, run in zip(axes, runs):
        for key, style in (("first", "--"), ("last", "-")):
            layers = sums[run["name"]][key]["layers"]
            for role in COS_ROLES:
                ys = [lay["cos"][role] for lay in layers]
                if all(y is None for y in ys):
                    continue
                ax.plot([lay["layer"] for lay in layers], [math.nan if y is None else y for y in ys], style,
                        color=colors[role], label=role if key == "last" else None)
        d = describe(run)
        ax.set_title(f"{run['name']}: rates {d['audio_rate']}/{d['video_rate']}, lambda {d['lambda']:g}", fontsize=9)
        ax.set_xlabel("layer (block output)")
        ax.set_ylabel("cos(H[token], H[BOS])")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    files.append(_save(fig, out / "cos_to_bos_by_role.png"))

    fig, axes = grid("Intermediate sinks per sample by role (alpha > 0.3 in >= 1 head)\nleft bar: step 0, right bar: end")
    for ax, run in zip(axes, runs):
        for key, shift, alpha in (("first", -0.2, 0.45), ("last", 0.2, 0.95)):
            layers = sums[run["name"]][key]["layers"]
            x = [lay["layer"] + shift for lay in layers]
            bottom = [0.0] * len(layers)
            for role in SINK_ROLES:
                ys = [lay["intermediate_sinks"][role] for lay in layers]
                ax.bar(x, ys, width=0.4, bottom=bottom, color=colors[role], alpha=alpha,
                       label=role if key == "last" and any(ys) else None)
                bottom = [b + y for b, y in zip(bottom, ys)]
        ax.set_title(run["name"], fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("sink tokens per sample")
        ax.legend(fontsize=7)
    files.append(_save(fig, out / "intermediate_sinks.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, run in enumerate(runs):
        color = f"C{i}"
        for key, style in (("first", "--"), ("last", "-")):
            layers = sums[run["name"]][key]["layers"]
            ax.plot([lay["layer"] for lay in layers], [lay["max_abs"] for lay in layers], style, color=color,
                    label=f"{run['name']} ({'step 0' if key == 'first' else 'end'})")
    ax.set_yscale("log")
    ax.set_xlabel("layer (block output)")
    ax.set_ylabel("max |H| over the probe's tokens")
    ax.set_title("Largest residual-stream activation per layer; dashed: step 0, solid: end")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    files.append(_save(fig, out / "massive.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["name"] for r in runs]
    for j, (key, label) in enumerate((("test_untrained", "untrained"), ("test", "trained"))):
        ys = [100 * r["results"][key]["wer"] if key in r["results"] else math.nan for r in runs]
        ax.bar([i + 0.4 * j - 0.2 for i in range(len(runs))], ys, width=0.4, label=label)
        for i, y in enumerate(ys):
            ax.text(i + 0.4 * j - 0.2, y, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(runs)), names, fontsize=8)
    ax.set_ylabel("test WER (%)")
    ax.set_title("Test WER (greedy) before and after training")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "wer.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


# ---- MLflow ---------------------------------------------------------------------------------------------
def _client():
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def init_experiment(study_dir: Path) -> None:
    client = _client()
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=(study_dir / "mlartifacts").resolve().as_uri())


def log_parent(runs: list[dict], sums: dict, files: list[Path], text: str, study_dir: Path, wall_s) -> str:
    client = _client()
    exp = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(
        client.create_experiment(EXPERIMENT, artifact_location=(study_dir / "mlartifacts").resolve().as_uri()))
    parent = client.create_run(exp.experiment_id, run_name="study", tags={"mlflow.note.content": text[:60000]})
    pid = parent.info.run_id
    client.log_param(pid, "runs", ",".join(r["name"] for r in runs))
    if wall_s:
        client.log_metric(pid, "study/wall_min", wall_s / 60)
    for run in runs:
        d = describe(run)
        client.log_param(pid, f"{run['name']}.order", d["order"])
        for key in ("test", "test_untrained"):
            if key in run["results"]:
                client.log_metric(pid, f"{run['name']}/{key}_wer", run["results"][key]["wer"])
        for key, step in (("first", 0), ("last", 1)):
            for role, v in sums[run["name"]][key]["mid_cos"].items():
                if v is not None:
                    client.log_metric(pid, f"{run['name']}/mid_cos_{role}", v, step=step)
        id_file = run["dir"] / "mlflow_run.json"
        if id_file.is_file():
            child = json.loads(id_file.read_text())["run_id"]
            client.set_tag(child, "mlflow.parentRunId", pid)
    for path in [study_dir / "report.md", study_dir / "summary.json", *files]:
        client.log_artifact(pid, str(path))
    client.set_terminated(pid, "FINISHED")
    return pid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study-dir", type=Path, required=True, help="the study folder (one sub-folder per run)")
    p.add_argument("--runs", nargs="+", default=None, help="run folder names in report order (default: all)")
    p.add_argument("--init", action="store_true", help="only create the MLflow experiment (artefacts in the study folder)")
    p.add_argument("--wall-s", type=float, default=None, help="the study's wall time, for the report")
    p.add_argument("--no-mlflow", action="store_true", help="write the files only")
    args = p.parse_args()
    use_mlflow = not args.no_mlflow and bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if args.init:
        if use_mlflow:
            init_experiment(args.study_dir)
        return 0
    names = args.runs or sorted(d.name for d in args.study_dir.iterdir() if (d / "experiment.json").is_file())
    runs = [load_run(args.study_dir / n) for n in names]
    sums = {r["name"]: summarise(r) for r in runs}
    text = write_markdown(runs, sums, args.study_dir, args.wall_s)
    (args.study_dir / "summary.json").write_text(json.dumps(
        {r["name"]: {"config": describe(r), "results": r["results"], "sinks": sums[r["name"]]} for r in runs},
        indent=1, default=str))
    files = draw(runs, sums, args.study_dir)
    if use_mlflow:
        pid = log_parent(runs, sums, files, text, args.study_dir, args.wall_s)
        print(f"MLflow parent run {pid} ({len(runs)} children) at {os.environ['MLFLOW_TRACKING_URI']}")
    print(f"wrote {args.study_dir / 'report.md'} and {len(files)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
