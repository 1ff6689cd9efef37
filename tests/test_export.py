"""tools/export.py on a real 2-rank ZeRO-2 checkpoint: export -> reload -> identical outputs (our loader, HF
AutoModel for the text encoder, timm for the vision encoder, METER's official layout), and the generator export."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

_RUNS: dict = {}  # one 2-rank pretraining run per session, shared with test_finetune.py


def run_cli(args, ranks=1, timeout=600):
    """Run an epic CLI script with 1 process or 2 torchrun ranks (CPU, one thread each)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    if ranks == 1:
        cmd = [sys.executable] + args
    else:
        import socket

        with socket.socket() as s:  # a free port, not a guessed one (other runs may share the machine)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(port)] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def two_rank_pretraining_run(shapes_world, tmp_root: Path) -> Path:
    """A tiny vanilla METER pretrained for 2 steps on 2 ranks under ZeRO-2: run.dir/checkpoints/step_00000002."""
    if "pretrain" not in _RUNS:
        run_dir = tmp_root / "pretrain_2rank"
        run_cli(["epic/pretrain.py", "--ds_config", "ds_configs/cpu_zero2.json", "--config", "shapes_tiny",
                 f"data.root={shapes_world}", f"run.dir={run_dir}", "train.max_steps=2", "train.save_every=100",
                 "data.micro_batch_size=4", "train.global_batch_size=8", "data.num_workers=0",
                 "train.log_every=1"], ranks=2)
        _RUNS["pretrain"] = run_dir
    return _RUNS["pretrain"]


@pytest.fixture(scope="module")
def zero_run(shapes_world, tmp_path_factory):
    return two_rank_pretraining_run(shapes_world, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def exported(zero_run, tmp_path_factory):
    from export import export

    out = tmp_path_factory.mktemp("export")
    info = export(str(zero_run), str(out))
    return out, info


def _module_weights(ckpt_dir: Path) -> dict:
    """Reference independent of zero_to_fp32: the full module rank 0 saved (fp32 run, so equal to the masters)."""
    state = torch.load(ckpt_dir / "vlm" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]


def _inputs(model, batch=2, length=12):
    g = torch.Generator().manual_seed(0)
    size = model.config.image_size
    ids = torch.randint(5, model.config.vocab_size, (batch, length), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -4:] = 0
    ids[1, -4:] = model.config.pad_token_id
    return torch.randn(batch, 3, size, size, generator=g), ids, mask


def test_export_writes_every_artifact(exported, zero_run):
    out, info = exported
    for name in ("model.safetensors", "config.yaml", "config.json", "tokenizer", "text_encoder",
                 "vision_encoder.safetensors", "vision_encoder.json", "meter.ckpt", "export.json"):
        assert (out / name).exists(), name
    assert info["world_size"] == 2 and info["step"] == 2 and info["task"] == "pretraining"
    assert not (out / "generator").exists()  # a vanilla run has no generator


def test_exported_weights_equal_the_zero2_module_and_reload_identically(exported, zero_run):
    from safetensors.torch import load_file

    from epic.eval.loading import locate
    from epic.models.meter import METER

    out, _ = exported
    reference = _module_weights(locate(zero_run).path)
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(reference)
    for key, value in reference.items():
        assert torch.equal(weights[key], value.float()), key
    model = METER.from_pretrained(str(out)).eval()  # our loader
    original = METER(model.config).eval()
    original.load_state_dict(reference)
    px, ids, mask = _inputs(model)
    with torch.no_grad():
        a = model.infer(ids, mask, pixel_values=px)
        b = original.infer(ids, mask, pixel_values=px)
    for key in ("cls_feats", "text_feats", "image_feats"):
        assert torch.equal(a[key], b[key])


def test_text_encoder_loads_with_hf_automodel(exported):
    from transformers import AutoModel, AutoTokenizer

    from epic.models.meter import METER

    out, _ = exported
    model = METER.from_pretrained(str(out)).eval()
    hf = AutoModel.from_pretrained(str(out / "text_encoder")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out / "text_encoder"))
    encoded = tokenizer(["a red circle on the left", "two blue squares"], padding="max_length", max_length=12,
                        return_tensors="pt")
    with torch.no_grad():
        expected = model.encode_text(encoded["input_ids"], encoded["attention_mask"])
        got = hf(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
    real = encoded["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def _timm_from_spec(folder: Path, spec: dict):
    """Only timm and the JSON: what a user of the export writes (no epic helper)."""
    import timm

    return timm.create_model(spec["model_name"], pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(folder / spec["weights"])), **spec["kwargs"]).eval()


def test_vision_encoder_loads_into_timm(exported):
    from safetensors.torch import load_file

    from epic.models.meter import METER

    out, _ = exported
    model = METER.from_pretrained(str(out)).eval()
    spec = json.loads((out / "vision_encoder.json").read_text())
    assert spec["library"] == "timm" and "norm_eps" not in json.dumps(spec)
    vit = _timm_from_spec(out, spec)
    assert set(vit.state_dict()) == set(load_file(str(out / spec["weights"])))  # every tensor, nothing left over
    px, _, _ = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(vit(px), model.encode_image(px), rtol=0, atol=0)


@pytest.mark.parametrize("patch, image, name", [(16, 288, "vit_base_patch16_clip_quickgelu_224"),
                                                (32, 224, "vit_base_patch32_clip_quickgelu_224")])
def test_real_sizes_export_as_timm_clip_model_names(tmp_path, patch, image, name):
    """METER-B/16 at 288 and the ablation's B/32 at 224 (one block, to stay small): a timm model name + overrides."""
    import dataclasses

    from export import vision_encoder_spec
    from safetensors.torch import save_file

    from epic.models.configuration_meter import METERConfig
    from epic.models.vision import build_vision_tower

    cfg = dataclasses.replace(METERConfig(), image_size=image, patch_size=patch, vit_layers=1)
    spec = vision_encoder_spec(cfg)
    assert spec["model_name"] == name
    assert spec["kwargs"] == {"img_size": image, "depth": 1, "num_classes": 0, "global_pool": ""}
    ours = build_vision_tower(cfg).eval()
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / spec["weights"]))
    vit = _timm_from_spec(tmp_path, json.loads(json.dumps(spec)))
    px = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vit(px), ours.forward_features(px), rtol=0, atol=0)


def test_official_layout_checkpoint_imports_to_the_same_model(exported):
    from epic.models.meter import METER, load_official_meter

    out, _ = exported
    model = METER.from_pretrained(str(out)).eval()
    checkpoint = torch.load(out / "meter.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("vit_model.visual.transformer.resblocks.") for k in checkpoint["state_dict"])
    config = {k: getattr(model.config, k) for k in ("num_heads", "vit_heads", "text_heads", "max_text_len",
                                                    "pad_token_id", "dropout", "layer_norm_eps")}
    imported = load_official_meter(str(out / "meter.ckpt"), meter_config=config).eval()
    px, ids, mask = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(imported.infer(ids, mask, pixel_values=px)["cls_feats"],
                                   model.infer(ids, mask, pixel_values=px)["cls_feats"])


def test_evaluate_reads_an_export_dir(exported, shapes_world):
    from epic.data import build_eval_loader, load_tokenizer
    from epic.evaluate import load_for_evaluation
    from epic.finetune import evaluate_task

    out, _ = exported
    model, cfg, source = load_for_evaluation(str(out), "retrieval", ["eval.max_images=8"])
    assert source.kind == "export" and cfg.data.tokenizer == str(out / "tokenizer")
    loader = build_eval_loader(str(shapes_world / "val" / "*.tar"), load_tokenizer(cfg.data.tokenizer),
                               image_size=cfg.data.image_size, max_text_len=cfg.data.max_text_len, batch_size=32)
    metrics = evaluate_task(model, "retrieval", loader, cfg)
    assert metrics["num_images"] == 8 and 0.0 <= metrics["tr_r10"] <= 100.0
    with pytest.raises(Exception, match="fine-tune it first|pretraining checkpoint"):
        load_for_evaluation(str(out), "vqa")


def test_generator_is_exported_in_hf_format(zero_run, tmp_path):
    """An EPIC run's generator engine -> DIR/generator, loadable with AutoModelForMaskedLM."""
    from export import export
    from transformers import AutoModelForMaskedLM

    from epic.config import EpicConfig
    from epic.eval.loading import locate
    from epic.finetune_config import TaskConfig, build_dataclass
    from epic.models.generator import build_generator

    source = locate(zero_run).path
    ckpt = tmp_path / "run" / "checkpoints" / source.name
    shutil.copytree(source, ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["config"]["epic"] = {**state["config"]["epic"], "enabled": True, "masking": "uniform",
                               "generator": {**state["config"]["epic"]["generator"], "hidden_size": 32,
                                             "layers": 1, "heads": 2, "intermediate_size": 64}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    cfg = build_dataclass(TaskConfig, state["config"])
    torch.manual_seed(0)
    generator = build_generator(cfg.epic.generator, cfg.model)
    (ckpt / "generator").mkdir()
    torch.save({"module": generator.state_dict()}, ckpt / "generator" / "mp_rank_00_model_states.pt")
    out = tmp_path / "export"
    info = export(str(tmp_path / "run"), str(out))
    assert "generator" in info["files"]
    hf = AutoModelForMaskedLM.from_pretrained(str(out / "generator")).eval()
    ids = torch.tensor([[0, 7, 9, 11, 2]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, generator.lm.eval()(input_ids=ids).logits)
    assert isinstance(cfg.epic, EpicConfig)
