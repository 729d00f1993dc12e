"""launch/study_report.py's choices that decide what the study claims: which run each run is compared
with (exactly one setting apart), when a validation curve counts as flat, and when CE takes over.
The report's numbers come from trainer/stats.py (tests/trainer/test_stats.py); an end-to-end check is the
STEPS=2 smoke in launch/study.sh's header."""
import importlib.util

from tests.constants import REPO

spec = importlib.util.spec_from_file_location("study_report", REPO / "launch" / "study_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def _run(name, seed=1, ln=True, lam=0.0, ramp=0, rate=32):
    model = {"modality": "asr", "audio_rate": rate, "video_rate": 2, "downsample": "avgpool", "decorrelation_weight": lam,
             "decorrelation_warmup_steps": ramp, "prefusion_layernorm": ln, "lora_alpha": 1, "lora_r": 8,
             "freeze_delimiters": True}
    exp = {"model": model, "train": {"seed": seed, "weight_decay": 0.1, "grad_clip": 10.0, "max_steps": 100},
           "data": {"seed": seed}}
    return {"name": name, "exp": exp, "enabled": ["audio"], "last": {"step": 100, "token_roles": [[0]] * 32}}


def test_each_run_is_compared_with_the_earlier_baseline_one_setting_away():
    runs = [_run("base_s1"), _run("base_s2", seed=2), _run("noln_s1", ln=False), _run("dec_s1", lam=1e4),
            _run("ramp_s1", lam=1e4, ramp=50), _run("dec_noln_s2", seed=2, ln=False, lam=1e4),
            _run("dec_rate16", lam=1e4, rate=16)]
    pick = {r["name"]: report.comparison_partner(r, runs[:i]) for i, r in enumerate(runs)}
    assert pick["base_s1"] is None
    assert [(pick[n][0]["name"], pick[n][1]) for n in ("base_s2", "noln_s1", "dec_s1", "ramp_s1")] == [
        ("base_s1", "seed"), ("base_s1", "prefusion_ln"), ("base_s1", "decorrelation"), ("base_s1", "decorrelation")]
    assert pick["dec_noln_s2"] is None          # two settings from every baseline: no comparison, no claim
    assert pick["dec_rate16"] is None           # another rate: not a comparison of one setting


def test_plateau_and_ce_takeover():
    assert report.plateau([(0, 10.0), (50, 2.0), (75, 1.0), (100, 0.99)])["met"] is True
    assert report.plateau([(0, 10.0), (50, 2.0), (75, 1.5), (100, 1.0)])["met"] is False
    assert report.plateau([(0, 10.0), (100, 1.0)])["met"] is None            # too few points to say
    curves = {"train/grad_norm_ce": [(1, 30.0), (10, 20.0), (20, 15.0)],
              "train/grad_norm_dec": [(1, 300.0), (10, 21.0), (20, 3.0)]}
    assert report.ce_takes_over(curves) == 20
    assert report.ce_takes_over({"train/grad_norm_ce": [(1, 1.0)], "train/grad_norm_dec": [(1, 2.0)]}) is None
