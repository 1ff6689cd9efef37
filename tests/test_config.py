"""Config loading: packaged configs, extends, overrides, and the errors users get for mistakes."""
import pytest

from epic.config import ConfigError, load_config


@pytest.mark.parametrize("name", ["shapes_tiny", "meter_4m", "meter_16m"])
def test_packaged_configs_load(name):
    cfg = load_config(name)
    assert cfg.train.max_steps > 0


@pytest.mark.parametrize("name", ["epic_shapes_tiny", "epic_meter_4m", "epic_meter_16m"])
def test_epic_configs_load_with_teacher(name):
    cfg = load_config(name, ["epic.teacher=/some/teacher"])
    assert cfg.epic.enabled and cfg.epic.mask_ratio == 0.35 and cfg.epic.lambda_itc == 8.0


def test_paper_settings_of_meter_4m():
    cfg = load_config("meter_4m")
    assert (cfg.model.image_size, cfg.model.patch_size, cfg.model.vit_layers) == (288, 16, 11)
    assert cfg.model.num_fusion_layers == 6 and cfg.data.max_text_len == 50
    assert cfg.train.global_batch_size == 4096 and cfg.train.max_steps == 100_000
    assert cfg.train.betas == [0.9, 0.98] and cfg.train.eps == 1e-8 and cfg.train.weight_decay == 0.01
    assert cfg.train.lr == 1e-5 and cfg.train.lr_mult_fusion == 5 and cfg.train.lr_mult_head == 5
    assert cfg.train.warmup_ratio == 0.1
    assert [s.name for s in cfg.data.sources] == ["coco", "vg", "sbu", "cc3m"]
    # per caption, weights = caption counts from the shards' counts.json (App. E Table 7), not typed image counts
    assert cfg.data.sample_unit == "caption" and all(s.weight == "auto" for s in cfg.data.sources)


def test_extends_merges_sections():
    cfg = load_config("meter_16m")
    assert [s.name for s in cfg.data.sources][-1] == "cc12m"
    assert cfg.model.vit_layers == 11  # inherited from meter_4m
    epic16 = load_config("epic_meter_16m", ["epic.teacher=x"])
    assert epic16.train.schedule == "tri_stage" and len(epic16.data.sources) == 5


def test_overrides_are_typed():
    cfg = load_config("shapes_tiny", ["train.lr=2e-5", "data.micro_batch_size=8", "train.betas=[0.8, 0.9]",
                                      "model.vit_pretrained=null", "train.max_steps=10"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.micro_batch_size == 8 and cfg.train.betas == [0.8, 0.9] and cfg.train.max_steps == 10


def test_local_yaml_extends_packaged(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: shapes_tiny\ntrain:\n  lr: 0.5\n")
    cfg = load_config(str(path))
    assert cfg.train.lr == 0.5 and cfg.model.vit_width == 64


@pytest.mark.parametrize("overrides, needle", [
    (["train.lrr=1"], "Did you mean 'train.lr'"),
    (["trian.lr=1"], "Did you mean 'train'"),
    (["train.lr=fast"], "'train.lr' must be a number"),
    (["train.max_steps=1.5"], "'train.max_steps' must be an integer"),
    (["train.deterministic=maybe"], "'train.deterministic' must be true or false"),
    (["train.schedule=cosinus"], "'train.schedule' must be one of"),
    (["train.global_batch_size=0"], "'train.global_batch_size' must be > 0"),
    (["train.lr"], "not of the form"),
    (["data.sources=[{shards: '', weight: 1}]"], "data.sources[0].shards"),
    (["data.sources=[{shards: a.tar, wieght: 1}]"], "Did you mean 'data.sources[0].weight'"),
])
def test_bad_overrides_are_named(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config("shapes_tiny", overrides)
    assert needle in str(err.value)


def test_missing_file_suggests_closest():
    with pytest.raises(ConfigError, match="Did you mean 'shapes_tiny'"):
        load_config("shapes_tiy")


def test_epic_without_teacher_is_rejected():
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config("epic_shapes_tiny")
    cfg = load_config("epic_shapes_tiny", ["epic.masking=uniform"])
    assert cfg.epic.masking == "uniform"


def test_circular_extends(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "a.yaml"))


def test_unsafe_yaml_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(Exception) as err:
        load_config(str(path))
    assert "python/object" in str(err.value) or "constructor" in str(err.value)
