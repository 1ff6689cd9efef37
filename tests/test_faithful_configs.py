"""Faithful comparisons (issue 10): an EPIC config differs from its baseline only under `epic.` and `run.`, the
paper's ablation scale and METER's own recipe are packaged, and reported retrieval is exhaustive everywhere."""
from __future__ import annotations

import pytest

from epic.config import CONFIG_DIR, EvalConfig, config_to_dict, load_config, read_config_data

EPIC_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("epic_*.yaml"))
ALLOWED_SECTIONS = ("epic", "run")


def flatten(tree, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists stay values (a changed source list is one difference)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved_differences(a: dict, b: dict) -> dict:
    fa, fb = flatten(a), flatten(b)
    return {key: (fa.get(key, "<absent>"), fb.get(key, "<absent>")) for key in sorted(set(fa) | set(fb))
            if fa.get(key, "<absent>") != fb.get(key, "<absent>")}


def test_every_family_has_its_epic_configs():
    assert {"epic_meter_4m", "epic_meter_16m", "epic_shapes_tiny", "epic_meter_4m_ablation"} <= set(EPIC_CONFIGS)


@pytest.mark.parametrize("epic_name", EPIC_CONFIGS)
def test_epic_config_differs_from_its_baseline_only_in_epic_and_run(epic_name):
    baseline_name = epic_name[len("epic_"):]
    assert (CONFIG_DIR / f"{baseline_name}.yaml").is_file(), (
        f"{epic_name} has no baseline config {baseline_name}.yaml: every EPIC config needs the vanilla run it is "
        f"compared with")
    epic = config_to_dict(load_config(epic_name, ["epic.teacher=/some/teacher"]))
    baseline = config_to_dict(load_config(baseline_name))
    assert baseline["epic"]["enabled"] is False and epic["epic"]["enabled"] is True
    outside = {key: diff for key, diff in resolved_differences(epic, baseline).items()
               if key.split(".")[0] not in ALLOWED_SECTIONS}
    assert not outside, f"{epic_name} vs {baseline_name} differ outside epic./run.: {outside}"


def test_the_rule_catches_a_recipe_difference(tmp_path):
    """The comparison itself can fail: an EPIC config with its own schedule is caught."""
    path = tmp_path / "epic_bad.yaml"
    path.write_text("extends: epic_meter_4m\ntrain:\n  schedule: linear\n")
    diff = resolved_differences(config_to_dict(load_config(str(path))), config_to_dict(load_config("meter_4m")))
    assert "train.schedule" in diff and all(k.split(".")[0] in ("train", "epic", "run") for k in diff)


def test_the_baseline_is_the_papers_reproduction():
    """App. F: METER reproduced with RandAugment (no colour ops) and the tri-stage schedule, 10/80/10, to 1%."""
    for name in ("meter_4m", "meter_16m", "meter_4m_ablation"):
        cfg = load_config(name)
        assert cfg.data.randaugment, name
        assert (cfg.train.schedule, cfg.train.warmup_ratio, cfg.train.hold_ratio, cfg.train.final_lr_scale) == (
            "tri_stage", 0.1, 0.8, 0.01), name


def test_meter_official_recipe_is_kept():
    official, ours = load_config("meter_4m_official"), load_config("meter_4m")
    assert official.train.schedule == "linear" and official.train.warmup_ratio == 0.1
    assert official.data.randaugment is False and official.train.grad_clip == 0.0
    diff = resolved_differences(config_to_dict(official), config_to_dict(ours))
    assert {k for k in diff if not k.startswith("run.")} == {"data.randaugment", "train.schedule", "train.grad_clip"}
    assert "fp32" in (CONFIG_DIR / "meter_4m_official.yaml").read_text()


def test_ablation_scale():
    """Sec. 5.3 / App. A: 4M, CLIP-ViT-B/32 at 224 px, 50k steps, otherwise the 4M recipe."""
    cfg, full = load_config("meter_4m_ablation"), load_config("meter_4m")
    assert (cfg.model.patch_size, cfg.model.image_size, cfg.data.image_size, cfg.train.max_steps) == (32, 224, 224,
                                                                                                     50_000)
    assert cfg.model.vit_pretrained.endswith("clip-vit-b32.pt")
    diff = resolved_differences(config_to_dict(cfg), config_to_dict(full))
    assert {k for k in diff if not k.startswith("run.")} == {
        "model.patch_size", "model.image_size", "data.image_size", "train.max_steps", "model.vit_pretrained"}


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_reports_exhaustive_retrieval(name):
    """Reported numbers use exhaustive scoring; a shortlist is an explicit eval.k_test=N."""
    data = read_config_data(name)
    assert data.get("eval", {}).get("k_test", EvalConfig().k_test) == 0


def test_ablation_epic_section_is_the_full_scale_one():
    """Tables 4-6 and 8 vary one EPIC switch at the ablation scale: its default EPIC section is epic_meter_4m's."""
    small = config_to_dict(load_config("epic_meter_4m_ablation", ["epic.teacher=/t"]))["epic"]
    full = config_to_dict(load_config("epic_meter_4m", ["epic.teacher=/t"]))["epic"]
    assert small == full
