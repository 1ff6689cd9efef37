"""The one weight loader (epic.models.loading.load_model) and the registry's official import: an official file,
a save_pretrained folder, an export dir and a run's checkpoint all give the same model, for the teacher,
fine-tuning and evaluation alike; tools/convert_official.py converts through the family's converter."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import epic.models
from epic.models.loading import load_model, locate
from epic.models.registry import build_model, get_family
from epic.models.teacher import TeacherError, load_teacher
from test_meter_import import inputs, make_official_state_dict, save_lightning_checkpoint
from test_model_interface import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _same_weights(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = save_lightning_checkpoint(make_official_state_dict(), tmp_path_factory.mktemp("ckpt") / "meter.ckpt")
    return path, epic.models.load_official("meter", path).eval()


def test_load_official_through_the_registry_and_the_convert_tool(official, tmp_path):
    path, model = official
    assert model.family == "meter"
    spec = importlib.util.spec_from_file_location("convert_official", ROOT / "tools" / "convert_official.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--family", "meter", "--src", path, "--out", str(tmp_path / "out")])
    for source in (path, str(tmp_path / "out")):  # the file itself and the converted folder
        loaded = load_model(source).model.eval()
        _same_weights(model, loaded)
    ids, mask, pixels = inputs(seed=4)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "out")).model.eval().infer(ids, mask, pixels)["cls_feats"],
                           model.infer(ids, mask, pixels)["cls_feats"])
    with pytest.raises(KeyError, match="Did you mean 'meter'"):
        epic.models.load_official("metr", path)
    with pytest.raises(SystemExit):
        tool.main(["--family", "nope", "--src", path, "--out", str(tmp_path / "x")])


def test_the_family_of_an_official_file_comes_from_the_json_beside_it(tmp_path):
    sd = make_official_state_dict()
    path = save_lightning_checkpoint(sd, tmp_path / "teacher.ckpt")
    (tmp_path / "teacher.json").write_text(json.dumps({"family": "meter", "num_heads": 4}))
    assert load_model(path).model.config.num_heads == 4  # the JSON's config values reach the converter
    (tmp_path / "teacher.json").write_text(json.dumps({"family": "metre"}))
    with pytest.raises(KeyError, match="unknown model family 'metre'"):
        load_model(path)
    with pytest.raises(TeacherError, match="unknown model family 'metre'"):
        load_teacher(path, "cpu")


def test_save_pretrained_folder_with_the_consistency_head_loads_everywhere(tmp_path):
    torch.manual_seed(3)
    model = build_model(tiny_config("meter", consistency_head=True)).eval()
    model.save_pretrained(str(tmp_path / "export"))
    assert locate(tmp_path / "export").kind == "export"
    loaded = load_model(tmp_path / "export")
    assert loaded.config is None and loaded.model.consistency_head() is not None
    _same_weights(model, loaded.model)
    teacher = load_teacher(str(tmp_path / "export"), "cpu")  # the teacher prunes beta and the heads away
    assert teacher.vlm.consistency_head() is None and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(4, 61, (2, 6))
    mask = torch.ones_like(ids)
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        expected = model.saliency_qk(ids, mask, pixel_values=pixels)
    got = teacher.query_keys(pixels, ids, mask)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_old_export_without_the_config_flag_keeps_its_head(tmp_path):
    """Exports written before ``consistency_head`` existed carry itc_score.* weights but no flag: still loaded."""
    torch.manual_seed(4)
    model = build_model(tiny_config("meter", consistency_head=True))
    model.save_pretrained(str(tmp_path / "old"))
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("consistency_head", "family"):
        config.pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    _same_weights(model, load_model(tmp_path / "old").model)
    assert type(model).from_pretrained(str(tmp_path / "old")).consistency_head() is not None


def test_local_pretrained_paths_are_not_read_again(tmp_path):
    from epic.models.loading import model_config_from_dict

    values = dataclasses.asdict(tiny_config("meter"))
    values.update(vit_pretrained="/gone/clip.pt", text_pretrained="/gone/roberta")
    cfg = model_config_from_dict(values)
    assert cfg.vit_pretrained is None and cfg.text_pretrained is None and get_family(cfg.family).name == "meter"
