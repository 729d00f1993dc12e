"""The sink study's report (launch/study.sh): one markdown file, PNG figures, an MLflow parent run.

Reads each run folder of the study (experiment.json, results.json, the per-utterance test report
eval/test_step*.json, the validation-loss points eval/val_loss_step*.json, the sink monitor's
sinks/step_*/report.json at step 0 and at the end) and the training curves from MLflow, and writes:

  report.md             a paragraph saying what was shown and what was not; the runs and what each is compared
                        with (the earlier lambda-0 run that differs from it in exactly one setting); test WER and
                        loss per token with 95 % bootstrap intervals over utterances and paired differences to
                        the comparison run; intermediate sinks per probe clip with intervals over clips; the
                        per-layer sink tables at step 0 and at the end;
  val_loss.png          the validation loss curve of every run;
  grad_norms.png        CE and lambda * L_dec gradient norms over training (decorrelation runs);
  wer.png               test WER with its interval per run;
  cos_to_bos_by_role.png, intermediate_sinks.png, massive.png: the sink picture per layer;
  summary.json          the numbers behind the tables: per run `config`, `results` (test: wer_ci95,
                        loss_per_token_ci95, num_utterances), `vs_baseline` (wer_diff_ci95, loss_diff_ci95), `sinks`.

Every interval and difference is computed by trainer/stats.py (seeded percentile bootstrap, 10 000
resamples); this script gathers the inputs and formats.

  python launch/study_report.py --study-dir runs/study --runs base_s1 base_s2 noln_s1 dec1e4_s1
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

from trainer import stats  # noqa: E402
from trainer.model.config import ModelConfig  # noqa: E402
from trainer.model.roles import ROLE_NAMES  # noqa: E402

COS_ROLES = ("delimiter", "audio", "video", "instruction", "transcript")
SINK_ROLES = ("delimiter", "audio", "video", "instruction", "transcript", "eos")
EXPERIMENT = "mini_study"
# The settings an arm may change; two runs are compared when they differ in exactly one of them.
SETTINGS = ("seed", "prefusion_ln", "decorrelation")
PLATEAU = 0.02        # a validation curve has met a plateau when its last quarter fell by less than this (relative)


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
            "last": reports[-1], "enabled": enabled, "test_rows": _last_report(run_dir, "test_step"),
            "val_curve": _val_curve(run_dir, exp["data"]["eval_split"])}


def _step_of(path: Path) -> int:
    return int(path.stem.rsplit("step", 1)[1])


def _last_report(run_dir: Path, prefix: str) -> list[dict]:
    """The per-utterance rows of the run's last evaluation report named eval/<prefix>NNNNNNNN.json."""
    paths = sorted((run_dir / "eval").glob(f"{prefix}[0-9]*.json"), key=_step_of)
    return json.loads(paths[-1].read_text())["utterances"] if paths else []


def _val_curve(run_dir: Path, split: str) -> list[tuple[int, float]]:
    """(step, validation loss per token) of eval/<split>_loss_stepN.json (--train.val-loss-every)."""
    return [(_step_of(p), json.loads(p.read_text())["summary"]["loss_per_token"])
            for p in sorted((run_dir / "eval").glob(f"{split}_loss_step*.json"), key=_step_of)]


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


def describe(run: dict) -> dict:
    m, t = run["exp"]["model"], run["exp"]["train"]
    return {"order": ", ".join(["BOS"] + [f"`<{x}>`" for x in run["enabled"]] + ["instruction"]),
            "modality": m["modality"], "audio_rate": m["audio_rate"], "video_rate": m["video_rate"],
            "downsample": m["downsample"], "seed": t["seed"], "data_seed": run["exp"]["data"]["seed"],
            "lambda": m["decorrelation_weight"], "decorrelation_warmup_steps": m.get("decorrelation_warmup_steps", 0),
            "prefusion_ln": m["prefusion_layernorm"], "weight_decay": t["weight_decay"],
            "lora_scale": m["lora_alpha"] / m["lora_r"], "grad_clip": t["grad_clip"],
            "freeze_delimiters": m.get("freeze_delimiters", False), "steps": run["last"]["step"],
            "max_steps": t["max_steps"], "probe_clips": len(run["last"]["token_roles"])}


def _settings(d: dict) -> dict:
    return {"seed": (d["seed"], d["data_seed"]), "prefusion_ln": d["prefusion_ln"],
            "decorrelation": (d["lambda"], d["decorrelation_warmup_steps"] if d["lambda"] else 0)}


def comparison_partner(run: dict, earlier: list[dict]) -> tuple[dict, str] | None:
    """The first earlier lambda-0 run that differs from `run` in exactly one setting (the rest of the
    configuration equal), and that setting's name; None when there is none."""
    mine = describe(run)
    fixed = {k: v for k, v in mine.items() if k in ("modality", "audio_rate", "video_rate", "downsample", "max_steps")}
    for other in earlier:
        theirs = describe(other)
        if theirs["lambda"] or any(theirs[k] != v for k, v in fixed.items()):
            continue
        differ = [k for k in SETTINGS if _settings(mine)[k] != _settings(theirs)[k]]
        if len(differ) == 1:
            return other, differ[0]
    return None


# ---- statistics (trainer/stats.py) ------------------------------------------------------------------
def _column(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows]


def test_statistics(run: dict) -> dict:
    """Test WER and loss per token with their bootstrap intervals over the run's test utterances."""
    rows = run["test_rows"]
    if not rows or "word_errors" not in rows[0]:
        return {}
    wer = stats.bootstrap_ratio(_column(rows, "word_errors"), _column(rows, "ref_words"))
    out = {"num_utterances": len(rows), "wer": wer.value, "wer_ci95": wer.ci, "resamples": wer.resamples}
    if "nll" in rows[0]:
        loss = stats.bootstrap_ratio(_column(rows, "nll"), _column(rows, "target_tokens"))
        out.update(loss_per_token=loss.value, loss_per_token_ci95=loss.ci)
    return out


def paired_statistics(run: dict, base: dict) -> dict:
    """run - base on the same test utterances (WER, loss per token) and the same probe clips
    (intermediate sinks per clip, middle layers), each with its paired bootstrap interval."""
    out: dict = {}
    if run["test_rows"] and base["test_rows"] and "word_errors" in run["test_rows"][0]:
        b, r = stats.paired_rows(base["test_rows"], run["test_rows"])
        wer = stats.paired_difference(_column(b, "word_errors"), _column(r, "word_errors"), _column(b, "ref_words"))
        out.update(wer_diff=wer.value, wer_diff_ci95=wer.ci)
        if "nll" in r[0]:
            loss = stats.paired_ratio_difference(_column(b, "nll"), _column(b, "target_tokens"),
                                                 _column(r, "nll"), _column(r, "target_tokens"))
            out.update(loss_diff=loss.value, loss_diff_ci95=loss.ci)
    a, c = run["sink_clips"]["last"], base["sink_clips"]["last"]
    if len(a) == len(c):
        sinks = stats.paired_difference(c, a, [1.0] * len(a))
        out.update(mid_intermediate_diff=sinks.value, mid_intermediate_diff_ci95=sinks.ci)
    return out


def sink_clips(run: dict, key: str) -> list[float]:
    """Per probe clip: its intermediate sinks (non-BOS tokens that are a sink in >= 1 head), averaged over
    the middle layers (2 .. L-2). The probe clips are the same in every run (the first validation clips)."""
    rep = run[key]
    n = len(rep["token_roles"])
    layers = [lay for lay in rep["layers"] if 2 <= lay["layer"] < len(rep["layers"]) - 1] or rep["layers"]
    per_clip = [0.0] * n
    for lay in layers:
        for s in lay["sink_tokens"]:
            if s["token"] != 0:
                per_clip[s["batch"]] += 1.0 / len(layers)
    return per_clip


def ce_takes_over(curves: dict) -> int | None:
    """The first logged step at which the CE gradient norm exceeds the lambda * L_dec one; None if never."""
    dec = dict(curves.get("train/grad_norm_dec", []))
    return next((step for step, ce in curves.get("train/grad_norm_ce", []) if step in dec and ce > dec[step]), None)


def plateau(curve: list[tuple[int, float]]) -> dict:
    """Whether the validation curve has flattened: its relative fall over the last quarter of the steps."""
    if len(curve) < 3:
        return {"met": None, "last_quarter_fall": None}
    last_step = curve[-1][0]
    earlier = [v for s, v in curve if s <= 0.75 * last_step][-1]
    fall = (earlier - curve[-1][1]) / max(abs(curve[-1][1]), 1e-12)
    return {"met": fall < PLATEAU, "last_quarter_fall": fall}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci(ci, scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    return "n/a" if not ci else f"[{fmt.format(scale * ci[0])}, {fmt.format(scale * ci[1])}]"


def _excludes_zero(ci) -> bool:
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)


def conclusion(runs: list[dict], table: dict) -> str:
    """The paragraph at the top: what the study shows and what it does not, from the numbers alone."""
    names = [r["name"] for r in runs]
    n_test = next((table[n]["test"].get("num_utterances") for n in names if table[n]["test"]), None)
    clips = describe(runs[0])["probe_clips"]
    parts = [f"{len(runs)} runs of {describe(runs[0])['max_steps']} steps, one corpus ({n_test} test utterances of "
             f"sentences not in train, {clips} probe clips); intervals are 95 % bootstrap intervals over utterances "
             f"(WER) or probe clips (sinks), differences paired on the same utterances/clips."]
    seed_pairs = [(n, table[n]["vs"]) for n in names if table[n]["vs"] and table[n]["vs"]["differs_in"] == "seed"]
    for n, vs in seed_pairs:
        parts.append(f"Seed alone ({n} vs {vs['run']}) moves test WER by {_pct(vs.get('wer_diff'))} points "
                     f"{_ci(vs.get('wer_diff_ci95'))} and intermediate sinks per clip by "
                     f"{_f(vs.get('mid_intermediate_diff'))} {_ci(vs.get('mid_intermediate_diff_ci95'), 1, '{:.2f}')}: "
                     "the spread every effect below is read against.")
    fewer, better, worse = [], [], []
    for n in names:
        vs = table[n]["vs"]
        if not vs:
            continue
        what = {"decorrelation": f"lambda {table[n]['config']['lambda']:g}"
                + (f" (ramp {table[n]['config']['decorrelation_warmup_steps']} steps)"
                   if table[n]['config']['decorrelation_warmup_steps'] else ""),
                "prefusion_ln": "the pre-fusion LayerNorm " + ("alone" if table[n]["config"]["prefusion_ln"] else "removed"),
                "seed": None}[vs["differs_in"]]
        if what is None:
            continue
        sink_ci, wer_ci = vs.get("mid_intermediate_diff_ci95"), vs.get("wer_diff_ci95")
        parts.append(f"{n} ({what}) vs {vs['run']}: intermediate sinks per clip {_f(table[n]['sinks']['mid_intermediate_end'])} "
                     f"vs {_f(table[vs['run']]['sinks']['mid_intermediate_end'])} (difference "
                     f"{_f(vs.get('mid_intermediate_diff'))} {_ci(sink_ci, 1, '{:.2f}')}); test WER "
                     f"{_pct(table[n]['test'].get('wer'))} % vs {_pct(table[vs['run']]['test'].get('wer'))} % (difference "
                     f"{_pct(vs.get('wer_diff'))} points {_ci(wer_ci)}"
                     + (", distinguishable from 0" if _excludes_zero(wer_ci) else ", not distinguishable from 0")
                     + f"); test loss per token difference {_f(vs.get('loss_diff'), '{:.3f}')} "
                     f"{_ci(vs.get('loss_diff_ci95'), 1, '{:.3f}')}.")
        if vs["differs_in"] == "decorrelation":
            curves = table[n]["curves"]
            if curves.get("train/grad_norm_dec"):
                step = table[n]["ce_takes_over_step"]
                parts.append(f"In {n} the CE gradient outgrows the lambda * L_dec one "
                             + (f"from step {step} on." if step is not None else "at no logged step."))
            if sink_ci and sink_ci[1] < 0:
                fewer.append(n)
            if wer_ci and wer_ci[1] < 0:
                better.append(n)
            if wer_ci and wer_ci[0] > 0:
                worse.append(n)
    dec = [n for n in names if table[n]["vs"] and table[n]["vs"]["differs_in"] == "decorrelation"]
    if dec:
        parts.append("The paper's direction at this scale: fewer intermediate sinks with the loss: "
                     f"{'yes for ' + ', '.join(fewer) if fewer else 'not shown'}; better WER at high compression: "
                     f"{'yes for ' + ', '.join(better) if better else 'not shown'}"
                     + (f" (worse for {', '.join(worse)})" if worse else "")
                     + "; stable WER at low compression: not tested (one rate, the paper's ASR rate).")
    flat = [n for n in names if table[n]["plateau"]["met"] is False]
    if flat:
        parts.append(f"The validation loss had not met a plateau in {', '.join(flat)} (it still fell by more than "
                     f"{100 * PLATEAU:.0f} % over the last quarter of training): their WER is that of an unfinished run.")
    elif any(table[n]["plateau"]["met"] for n in names):
        parts.append("Every validation loss curve had flattened (under "
                     f"{100 * PLATEAU:.0f} % fall over the last quarter of training).")
    parts.append("Not shown: anything at the paper's scale (a 135M LLM, LoRA r 8, a synthetic corpus, one compression "
                 "rate, audio only), and effects smaller than the intervals.")
    return " ".join(parts)


def write_markdown(runs: list[dict], sums: dict, table: dict, out: Path, wall_s: float | None) -> str:
    d0 = describe(runs[0])
    lines = ["# Attention sinks in the mini Llama-AVSR: does the decorrelation loss help?", "",
             conclusion(runs, table), ""]
    lines.append(f"Model: Whisper tiny.en encoder (frozen, clip-length frames) + SmolLM2-135M-Instruct (frozen, LoRA "
                 f"r 8, scale {d0['lora_scale']:g}, on q/v), {d0['modality']} at audio rate {d0['audio_rate']} "
                 f"({d0['downsample']}); AdamW weight decay {d0['weight_decay']:g}, gradient clip {d0['grad_clip']:g}, "
                 f"delimiter rows {'frozen' if d0['freeze_delimiters'] else 'trained'}; synthetic GRID-style corpus "
                 "(`launch/recipes/mini_study.yaml`). Sink probe: the first "
                 f"{d0['probe_clips']} validation clips in the training prompt, at step 0 and at the end. Intervals: "
                 f"trainer/stats.py, percentile bootstrap, {stats.RESAMPLES} resamples, seed 0.")
    if wall_s:
        lines.append(f"Whole study: {wall_s / 60:.1f} min wall time.")
    lines += ["", "## Runs and recognition", "",
              "| run | seed | pre-fusion LN | lambda | ramp steps | compared with (differs in) | test WER % [95 % CI] | "
              "WER diff, points [95 % CI] | test loss/token [95 % CI] | loss diff [95 % CI] | val loss plateau |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        t = table[run["name"]]
        c, te, vs = t["config"], t["test"], t["vs"]
        lines.append(f"| {run['name']} | {c['seed']} | {c['prefusion_ln']} | {c['lambda']:g} | "
                     f"{c['decorrelation_warmup_steps']} | {vs['run'] + ' (' + vs['differs_in'] + ')' if vs else '-'} | "
                     f"**{_pct(te.get('wer'))}** {_ci(te.get('wer_ci95'))} | "
                     f"{_pct(vs.get('wer_diff')) if vs else '-'} {_ci(vs.get('wer_diff_ci95')) if vs else ''} | "
                     f"{_f(te.get('loss_per_token'), '{:.3f}')} {_ci(te.get('loss_per_token_ci95'), 1, '{:.3f}')} | "
                     f"{_f(vs.get('loss_diff'), '{:.3f}') if vs else '-'} "
                     f"{_ci(vs.get('loss_diff_ci95'), 1, '{:.3f}') if vs else ''} | "
                     f"{ {True: 'yes', False: 'no', None: 'n/a'}[t['plateau']['met']] } |")
    lines += ["", "![validation loss](val_loss.png)", "", "![gradient norms](grad_norms.png)", "",
              "![WER](wer.png)", "", "## The sink picture, step 0 -> end", "",
              "Means over the middle layers (2 .. L-2). Intermediate sinks: non-BOS tokens that are a sink (alpha > 0.3) "
              "in at least one head, per probe clip, with the 95 % interval over clips. cos(X, BOS): mean cosine "
              "between BOS's hidden state and the X tokens'.", "",
              "| run | step | BOS sink heads | intermediate sinks / clip [95 % CI] | cos delim | cos audio | cos instr | "
              "cos transcript | max abs(H) | top massive features | carried by |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for key in ("first", "last"):
            s = sums[run["name"]][key]
            c = s["mid_cos"]
            est = stats.bootstrap_mean(run["sink_clips"][key])
            lines.append(f"| {run['name']} | {s['step']} | {_f(s['mid_bos_sink'])} | {est.value:.2f} "
                         f"{_ci(est.ci, 1, '{:.2f}')} | "
                         f"{_f(c['delimiter'])} | {_f(c['audio'])} | {_f(c['instruction'])} | "
                         f"{_f(c['transcript'])} | {s['max_abs']:.3g} | "
                         f"{', '.join(str(f) for f, _ in s['massive_features']) or '-'} | "
                         f"{', '.join(n for n, _ in s['massive_carriers']) or '-'} |")
    lines += ["", "![cosine to BOS by role](cos_to_bos_by_role.png)", "",
              "![intermediate sinks by role](intermediate_sinks.png)", "", "![massive activations](massive.png)", "",
              "## Per layer", ""]
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


def draw(runs: list[dict], sums: dict, table: dict, out: Path) -> list[Path]:
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
    for i, name in enumerate(names):
        te = table[name]["test"]
        if not te:
            continue
        y, (lo, hi) = 100 * te["wer"], te["wer_ci95"]
        ax.errorbar([i], [y], yerr=[[y - 100 * lo], [100 * hi - y]], fmt="o", capsize=4, color=f"C{i}")
        ax.text(i + 0.08, y, f"{y:.1f}", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
    ax.set_ylabel("test WER (%)")
    ax.set_title("Test WER (greedy) with 95 % bootstrap intervals over utterances")
    ax.grid(alpha=0.3)
    files.append(_save(fig, out / "wer.png"))

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, run in enumerate(runs):
        if run["val_curve"]:
            ax.plot(*zip(*run["val_curve"]), "o-", ms=3, color=f"C{i}", label=run["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss per token (teacher-forced)")
    ax.set_yscale("log")
    ax.set_title("Validation loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    files.append(_save(fig, out / "val_loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, run in enumerate(runs):
        curves = run["curves"]
        for key, style, label in (("train/grad_norm_ce", "-", "CE"), ("train/grad_norm_dec", "--", "lambda*L_dec")):
            points = [(s_, v) for s_, v in curves.get(key, []) if v > 0]
            if points and (key.endswith("ce") or describe(run)["lambda"]):
                ax.plot(*zip(*points), style, color=f"C{i}", label=f"{run['name']}: {label}")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (before clipping)")
    ax.set_yscale("log")
    ax.set_title("Gradient norm of each term alone: where CE takes over")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    files.append(_save(fig, out / "grad_norms.png"))
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


def training_curves(run_dir: Path, use_mlflow: bool) -> dict[str, list[tuple[int, float]]]:
    """The run's logged training metrics (CE, lambda * L_dec, their gradient norms, lambda) from MLflow."""
    id_file = run_dir / "mlflow_run.json"
    if not use_mlflow or not id_file.is_file():
        return {}
    client, run_id = _client(), json.loads(id_file.read_text())["run_id"]
    keys = ("train/ce_loss", "train/dec_loss", "train/grad_norm_ce", "train/grad_norm_dec", "train/decorrelation_weight")
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def init_experiment(study_dir: Path) -> None:
    client = _client()
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=(study_dir / "mlartifacts").resolve().as_uri())


def log_parent(runs: list[dict], sums: dict, table: dict, files: list[Path], text: str, study_dir: Path,
               wall_s) -> str:
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
        te, vs = table[run["name"]]["test"], table[run["name"]]["vs"]
        for key in ("wer", "loss_per_token"):
            if key in te:
                client.log_metric(pid, f"{run['name']}/test_{key}", te[key])
                client.log_metric(pid, f"{run['name']}/test_{key}_ci95_low", te[f"{key}_ci95"][0])
                client.log_metric(pid, f"{run['name']}/test_{key}_ci95_high", te[f"{key}_ci95"][1])
        for key in ("wer_diff", "loss_diff"):
            if vs and key in vs:
                client.log_metric(pid, f"{run['name']}/{key}_vs_{vs['run']}", vs[key])
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


def build_table(runs: list[dict], sums: dict) -> dict:
    """Per run: its configuration, test statistics, comparison run with the paired differences, sink
    counts per clip with intervals, and whether its validation curve met a plateau."""
    table = {}
    for i, run in enumerate(runs):
        partner = comparison_partner(run, runs[:i])
        vs = None
        if partner is not None:
            base, differs = partner
            vs = {"run": base["name"], "differs_in": differs, **paired_statistics(run, base)}
        ends = {key: stats.bootstrap_mean(run["sink_clips"][key]) for key in ("first", "last")}
        table[run["name"]] = {
            "config": describe(run), "test": test_statistics(run), "vs": vs, "plateau": plateau(run["val_curve"]),
            "val_curve": run["val_curve"], "curves": run["curves"],
            "ce_takes_over_step": ce_takes_over(run["curves"]) if describe(run)["lambda"] else None,
            "sinks": {"mid_intermediate_start": ends["first"].value, "mid_intermediate_start_ci95": ends["first"].ci,
                      "mid_intermediate_end": ends["last"].value, "mid_intermediate_end_ci95": ends["last"].ci,
                      "probe_clips": len(run["sink_clips"]["last"])}}
    return table


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
    for run in runs:
        run["sink_clips"] = {key: sink_clips(run, key) for key in ("first", "last")}
        run["curves"] = training_curves(run["dir"], use_mlflow)
    sums = {r["name"]: summarise(r) for r in runs}
    table = build_table(runs, sums)
    text = write_markdown(runs, sums, table, args.study_dir, args.wall_s)
    summary = {}
    for r in runs:
        t = table[r["name"]]
        summary[r["name"]] = {
            "config": t["config"], "results": {**r["results"], "test": {**r["results"].get("test", {}), **t["test"]}},
            "vs_baseline": t["vs"], "val_curve": t["val_curve"], "plateau": t["plateau"], "curves": t["curves"],
            "ce_takes_over_step": t["ce_takes_over_step"],
            "sinks": {**t["sinks"], **sums[r["name"]]}}
    (args.study_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    files = draw(runs, sums, table, args.study_dir)
    if use_mlflow:
        pid = log_parent(runs, sums, table, files, text, args.study_dir, args.wall_s)
        print(f"MLflow parent run {pid} ({len(runs)} children) at {os.environ['MLFLOW_TRACKING_URI']}")
    print(f"wrote {args.study_dir / 'report.md'} and {len(files)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
