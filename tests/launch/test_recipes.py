"""launch/recipes/: the paper's recipes (LRS3) carry its settings, the decorrelation recipe differs from
its baseline only where it should, demo.yaml is what launch/demo.sh trains. (The CPU-sized mini_* recipes are run by
tests/e2e/test_train_real_parts.py and tests/e2e/test_exports_real.py.)"""
import pytest

from tests.constants import REPO

RECIPES = sorted(r for r in (REPO / "launch" / "recipes").glob("lrs3_*.yaml"))
DEMO_RECIPE = REPO / "launch" / "recipes" / "demo.yaml"


def test_demo_script_trains_the_demo_recipe():
    """launch/demo.sh and the SLURM example train the same thing: demo.yaml, on the corpus demo.sh builds."""
    from trainer.config import load_recipe
    script = (REPO / "launch" / "demo.sh").read_text()
    assert "--recipe launch/recipes/demo.yaml" in script
    cfg = load_recipe(DEMO_RECIPE)
    assert cfg.data.shard_dir == "data/synth" and "--out data/synth" in script
    assert cfg.model.whisper_path is None and cfg.model.avhubert_path is None and cfg.model.modality == "avsr"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_load_with_the_papers_settings(recipe):
    from trainer.config import load_recipe
    cfg = load_recipe(recipe)
    m, t = cfg.model, cfg.train
    assert m.modality in recipe.stem and m.llm_path and m.load_dtype == "bfloat16"
    assert list(m.lora_targets) == ["q_proj", "v_proj"] and t.eval_beams == 15
    assert (m.whisper_path is not None) == (m.modality != "vsr")
    assert (m.avhubert_path is not None) == (m.modality != "asr")
    assert (m.decorrelation_weight > 0) == ("decorr" in recipe.stem)
    assert t.precision == "bf16" and t.max_steps > t.warmup_steps > 0


def test_decorrelation_recipe_differs_from_the_baseline_only_where_it_should():
    from trainer.config import load_recipe
    base = load_recipe(REPO / "launch" / "recipes" / "lrs3_avsr.yaml").to_dict()
    dec = load_recipe(REPO / "launch" / "recipes" / "lrs3_avsr_decorr.yaml").to_dict()
    diff = {(section, k) for section in base if isinstance(base[section], dict)
            for k in base[section] if base[section][k] != dec[section][k]}
    assert ("model", "decorrelation_weight") in diff
    assert diff <= {("model", "decorrelation_weight"), ("model", "prefusion_layernorm"),
                    ("train", "run_dir"), ("tracking", "run_name")}, diff
