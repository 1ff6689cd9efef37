"""tools/study.py and epic/studies: the analyses' own pieces against hand-made references, and every study in
smoke mode (files and table layout)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


# ------------------------------------------------------------------------------------------------ modality bias
def tiny_meter(tokenizer):
    from epic.models.configuration_meter import METERConfig
    from epic.models.meter import METER

    cfg = METERConfig(image_size=32, patch_size=16, vit_width=32, vit_layers=1, vit_heads=2, text_hidden_size=32,
                      text_layers=1, text_heads=2, text_intermediate_size=64, hidden_size=32, num_heads=2,
                      num_fusion_layers=2, mlp_ratio=2, dropout=0.0, max_text_len=24, vocab_size=len(tokenizer),
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return METER.from_config(cfg), cfg


def a_batch(shapes_world, tokenizer, size=32):
    from epic.data import build_train_loader

    loader = build_train_loader(str(shapes_world / "train" / "*.tar"), tokenizer, image_size=size, max_text_len=24,
                                batch_size=4, num_workers=0, seed=0, rank=0, world_size=1)
    return next(iter(loader))


@pytest.fixture(scope="module")
def tokenizer(shapes_world):
    from epic.data import load_tokenizer

    return load_tokenizer(shapes_world / "tokenizer")


def test_the_text_only_lm_never_sees_pixels(shapes_world, tokenizer):
    from epic.studies.modality_bias import lm_logits, text_only_lm, vlm_logits

    vlm, cfg = tiny_meter(tokenizer)
    lm = text_only_lm(cfg, seed=0).eval()
    vlm.eval()
    batch = a_batch(shapes_world, tokenizer)
    other = {**batch, "pixel_values": torch.rand_like(batch["pixel_values"])}  # two different images
    assert torch.equal(lm_logits(lm, batch), lm_logits(lm, other))
    assert not torch.allclose(vlm_logits(vlm, batch), vlm_logits(vlm, other))  # the VLM does read them


def test_the_same_masked_positions_reach_the_vlm_and_the_lm(shapes_world, tokenizer):
    from epic.studies.modality_bias import joint_step, text_only_lm

    vlm, cfg = tiny_meter(tokenizer)
    lm = text_only_lm(cfg, seed=0)
    batch = a_batch(shapes_world, tokenizer)
    seen = {}
    original_infer = vlm.infer

    def spy_infer(input_ids, attention_mask, **kwargs):
        if "mlm" not in seen and not torch.equal(input_ids, batch["input_ids"]):
            seen["mlm"] = input_ids.clone()  # the CMLM pass (the ITM pass reads the unmasked caption)
        return original_infer(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    vlm.infer = spy_infer
    lm_inputs = []
    lm.register_forward_pre_hook(lambda m, a, kw: lm_inputs.append(kw["input_ids"].clone()), with_kwargs=True)
    losses = joint_step(vlm, lm, batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"vlm", "lm"} and all(torch.isfinite(v) for v in losses.values())
    assert (batch["mlm_labels"] != -100).any()
    assert torch.equal(seen["mlm"], batch["mlm_input_ids"]) and torch.equal(lm_inputs[0], batch["mlm_input_ids"])


def test_accuracy_counts_split_content_and_filler():
    from epic.studies.modality_bias import accuracies, accuracy_counts

    labels = torch.tensor([[-100, 5, 6, -100], [7, -100, 8, 9]])
    logits = torch.full((2, 4, 10), -1.0)
    for (r, c), predicted in {(0, 1): 5, (0, 2): 1, (1, 0): 7, (1, 2): 8, (1, 3): 2}.items():
        logits[r, c, predicted] = 1.0
    content = torch.tensor([[False, True, True, False], [False, False, True, True]])
    acc = accuracies(accuracy_counts(logits, labels, content))
    assert acc == {"acc": 3 / 5, "acc_content": 2 / 4, "acc_filler": 1 / 1}


# ------------------------------------------------------------------------------------------------ unmasked use
def test_corruption_ratio_is_app_a_definition():
    """Mean over sentences of (# second-round tokens not recovered) / (# tokens of the sentence)."""
    from epic.studies.unmasked_use import corruption_ratio

    original = torch.tensor([[0, 10, 11, 12, 13, 2, 1, 1], [0, 20, 21, 22, 2, 1, 1, 1]])
    corrupted = torch.tensor([[0, 10, 99, 12, 98, 2, 1, 1], [0, 20, 21, 97, 2, 1, 1, 1]])
    round2 = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    real = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    # row 0: positions 2 and 4 not recovered (3 was recovered: 12 == 12), 4 tokens -> 2/4
    # row 1: position 3 not recovered (1 was recovered), 3 tokens -> 1/3
    assert corruption_ratio(original, corrupted, round2, real) == pytest.approx((2 / 4 + 1 / 3) / 2)
    corrupted[0, 1] = 55  # a change outside round 2 (a round-1 mask) is not a corruption
    assert corruption_ratio(original, corrupted, round2, real) == pytest.approx((2 / 4 + 1 / 3) / 2)


def test_second_round_takes_tau_of_the_unmasked_tokens_only():
    from epic.studies.unmasked_use import second_round_positions

    labels = torch.full((3, 12), -100)
    labels[:, 2] = 7  # round 1 masked position 2
    real = torch.zeros(3, 12, dtype=torch.bool)
    real[:, 1:11] = True  # 10 tokens, 9 of them unmasked
    picked = second_round_positions(labels, real, 0.34, torch.Generator().manual_seed(0))
    assert picked.sum(1).tolist() == [3, 3, 3]  # round(0.34 * 9)
    assert not (picked & ~real).any() and not picked[:, 2].any()
    assert second_round_positions(labels, real, 0.0, torch.Generator()).sum() == 0


# ------------------------------------------------------------------------------------------------ grad-cam
def test_pointing_game_against_a_hand_made_map():
    from epic.studies.gradcam import inside_box, pointing_scores

    cam = torch.zeros(4, 4)  # 4x4 patches; box (0, 0)-(0.5, 0.5) = the top-left 2x2 patches
    cam[0, 0], cam[1, 1], cam[3, 3] = 3.0, 1.0, 4.0
    scores = pointing_scores(cam, (0.0, 0.0, 0.5, 0.5))
    assert scores["mass_in_box"] == pytest.approx(4.0 / 8.0)
    assert scores["pointing_hit"] == 0.0  # the maximum (3, 3) lies outside
    assert scores["box_share"] == pytest.approx(4 / 16)
    cam[0, 1] = 5.0
    assert pointing_scores(cam, (0.0, 0.0, 0.5, 0.5))["pointing_hit"] == 1.0
    assert inside_box(4, (0.3, 0.55, 0.7, 1.0)).nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]


def test_gradcam_attention_is_the_fused_attention(shapes_world, tokenizer):
    """The explicit-softmax attention used for Grad-CAM gives the model's own outputs."""
    from epic.studies.gradcam import explicit_attention, gradcam_maps

    vlm, _ = tiny_meter(tokenizer)
    vlm.eval()
    batch = a_batch(shapes_world, tokenizer)
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    with torch.no_grad():
        reference = vlm.infer(**args)["cls_feats"]
        with explicit_attention(vlm.cross_modal_text_layers[0].crossattention.self, {}):
            explicit = vlm.infer(**args)["cls_feats"]
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    maps = gradcam_maps(vlm, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                        torch.tensor([1, 2, 1, 3]))
    assert maps.shape == (4, 2, 2) and (maps >= 0).all() and (maps.flatten(1).sum(1) > 0).all()


FAMILY_TINY = {"meter": "shapes_tiny", "vilt": "vilt_shapes_tiny", "albef": "albef_shapes_tiny",
               "xvlm": "xvlm_shapes_tiny"}


def tiny_family_model(family, tokenizer):
    """The family's tiny shapes-world model (its registry config), random init, eval mode."""
    from epic.config import load_config
    from epic.models.registry import build_model
    from epic.wiring import resolve_model_config

    cfg = resolve_model_config(load_config(FAMILY_TINY[family]).model, tokenizer)
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


@pytest.mark.parametrize("family", list(FAMILY_TINY))
def test_gradcam_reads_each_familys_attention_site(family, tokenizer):
    """Every family's Grad-CAM site: the explicit attention gives the model's own outputs, and the map is the
    text token's row over the image patches (ViLT: its joint attention, keys = text then image [CLS] then patches)."""
    from epic.studies.gradcam import attention_site, explicit_attention, gradcam_maps

    model, cfg = tiny_family_model(family, tokenizer)
    ids = torch.tensor(tokenizer(["the red circle is left of the blue square", "a green star"], padding="max_length",
                                 max_length=12, truncation=True)["input_ids"])
    mask = (ids != tokenizer.pad_token_id).long()
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    args = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    site = attention_site(model)
    named = {module: name for name, module in model.named_modules()}
    if family == "meter":
        expected = f"cross_modal_text_layers.{cfg.num_fusion_layers - 2}.crossattention.self"
    elif family == "vilt":
        expected = f"transformer.blocks.{len(model.transformer.blocks) - 2}.attn"
    else:  # ALBEF, X-VLM: the fusion layers are BERT's last ones
        expected = f"text_encoder.bert.encoder.layer.{cfg.num_hidden_layers - 2}.crossattention.self"
    assert named[site.module] == expected  # the penultimate layer of the family's fusion
    with torch.no_grad():
        reference = model.infer(**args)["cls_feats"]
        with explicit_attention(site.module, {}) as store:
            explicit = model.infer(**args)["cls_feats"]
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    patches = (cfg.image_size // 8) ** 2  # an 8 x 8 grid in every tiny config
    assert store["attn"].shape[-1] == site.first_patch(ids.shape[1]) + patches
    assert store["attn"].shape[-2] == (ids.shape[1] + 1 + patches if family == "vilt" else ids.shape[1])
    maps = gradcam_maps(model, pixels, ids, mask, torch.tensor([1, 2]))
    assert maps.shape == (2, 8, 8) and (maps >= 0).all() and (maps.flatten(1).sum(1) > 0).all()
    # the map is relu(grad * attn) at the token's row, averaged over heads (a straightforward recomputation)
    with explicit_attention(site.module, {}) as again:
        model.zero_grad(set_to_none=True)
        model.itm_score(model.infer(**args)["cls_feats"])[:, 1].sum().backward()
    attn = again["attn"]
    first = site.first_patch(ids.shape[1])
    expected = torch.stack([(attn.grad[b] * attn[b]).clamp(min=0).mean(0)[t, first:] for b, t in ((0, 1), (1, 2))])
    torch.testing.assert_close(maps.flatten(1), expected.detach(), atol=1e-6, rtol=1e-5)


def test_the_lm_has_the_vlm_text_sides_depth_for_every_family(tokenizer):
    from epic.studies.modality_bias import text_only_lm

    depth = {"meter": 2 + 2, "vilt": 4, "albef": 4, "xvlm": 5}  # the tiny configs: text tower + fusion layers
    for family, layers in depth.items():
        _, cfg = tiny_family_model(family, tokenizer)
        lm = text_only_lm(cfg, seed=0)
        assert lm.config.num_hidden_layers == layers and lm.config.model_type == cfg.text_model_type, family


# ------------------------------------------------------------------------------------------------ smoke runs
# One real smoke pipeline (vanilla METER and EPIC: pretraining, NLVR2 and retrieval fine-tuning, zero-shot
# retrieval, through the same entry points a user runs) is shared by every study: the other pretraining variants
# are checked to be valid configs (every override resolves) and then read the shared runs, so that this test checks
# each study's plumbing, table and plots in CI time, not the variants' training (the real studies run them).
STUDY_FILES = {"modality-bias": ["fig2a_acc.png", "fig2a_acc_content.png", "fig2a_acc_filler.png"],
               "unmasked-use": ["fig2b.png"], "table4": ["table4.png"], "table5": ["table5.png"],
               "table6": ["table6.png"], "table8": ["table8.png"],
               "fig6": ["fig6_inconsistent_samples.png", "fig6_itc_acc_inconsistent.png"],
               "gradcam": ["gradcam.png"]}
CELL = re.compile(r"^-?\d+\.\d ± \d+\.\d$")


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory):
    """(root, the --smoke --world --runs arguments) shared by every smoke study."""
    root = tmp_path_factory.mktemp("studies")
    return root, ["--smoke", "--world", str(root / "world"), "--runs", str(root / "runs")]


@pytest.fixture(scope="session")
def smoke_root(smoke_base):
    from study import build_study, parse_args

    from epic.studies.common import VANILLA, Variant, run_unit

    root, base = smoke_base
    study = build_study(parse_args(["table4", *base, "--out", str(root / "table4")]))
    shared = {"vanilla": run_unit(study, VANILLA, 0), "epic": run_unit(study, Variant("EPIC", "epic", ()), 0)}
    return root, base, shared


def share_runs(module, study, shared):
    """Point the study's other variants at the shared runs after checking that their configs resolve."""
    from epic.config import load_config
    from epic.studies.common import _stage, fit_lm_command, pretrain_overrides, run_command

    for variant in getattr(module, "VARIANTS", getattr(module, "MODELS", ())):
        unit = study.unit_dir(variant, 0)
        if unit.exists():
            continue
        teacher = Path(shared["vanilla"]["dir"]) if variant.needs_teacher else None
        fitted = None
        if variant.needs_fitted_lm:  # "LM (trained)": tools/fit_generator.py runs for real (2 steps)
            fitted = study.runs / study.scale.name / "lm-trained" / "seed0"
            _stage(Path(f"{fitted}.json"), lambda: {"out": str(fitted), **json.loads(run_command(
                fit_lm_command(study, 0, fitted, teacher), Path(f"{fitted}.log"), want_json=False))})
            assert (fitted / "epic_generator.json").is_file()
            fitted = str(fitted)
        load_config(study.scale.config_of(variant), pretrain_overrides(study, variant, 0, teacher, fitted))
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.symlink_to(Path(shared["vanilla" if variant.kind == "vanilla" else "epic"]["dir"]))


def table_rows(markdown: str, which: int = 0) -> list[list[str]]:
    """The cells of the report's `which`-th markdown table (a run of consecutive '|' lines)."""
    tables, previous = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous:
                tables.append([])
            tables[-1].append([c.strip() for c in line.strip("|").split("|")])
        previous = line.startswith("|")
    return tables[which]


@pytest.mark.parametrize("name", list(STUDY_FILES))
def test_every_study_in_smoke_mode_writes_its_table_and_plots(name, smoke_root, capsys):
    import importlib

    import study as study_tool

    root, base, shared = smoke_root
    out = root / name
    argv = [name, *base, "--out", str(out)]
    module = importlib.import_module(f"epic.studies.{study_tool.STUDIES[name]}")
    pretraining = name.startswith("table") or name == "fig6"
    if pretraining:
        share_runs(module, study_tool.build_study(study_tool.parse_args(argv)), shared)
        argv.append("--report-only")
    if name == "unmasked-use":  # needs the modality-bias run of the same seed
        study_tool.main(["modality-bias", *base, "--out", str(root / "modality-bias")])
    assert study_tool.main(argv) == 0
    report = (out / f"{name}.md").read_text()
    assert report in capsys.readouterr().out  # the table is printed too
    for png in STUDY_FILES[name]:
        assert (out / png).stat().st_size > 1000, png
    rows = table_rows(report)
    header, body = rows[0], rows[2:]
    assert rows[1] == ["---"] * len(header) and header[-1] == "seeds"
    if pretraining:
        variants = getattr(module, "VARIANTS")
        assert [r[0] for r in body] == [v.name for v in variants]
        assert ("NLVR2 text-only prior: " in report) == (name != "fig6")
        for row in body:
            assert row[-1] == "1" and all(CELL.match(c) for c in row[1:-1]), row
        if name != "fig6":  # NLVR2 dev accuracy per statement kind, the same rows
            from epic.data.tasks import NLVR2_KINDS

            kinds = table_rows(report, 1)
            assert kinds[0] == ["", *NLVR2_KINDS, "seeds"] and [r[0] for r in kinds[2:]] == [r[0] for r in body]
            cells = [c for r in kinds[2:] for c in r[1:-1]]  # 16 dev pairs: a kind may have none ("—")
            assert all(CELL.match(c) or c == "—" for c in cells) and any(CELL.match(c) for c in cells), kinds
    else:
        assert body and all(r[-1] == "1" for r in body if r[-1] != "—")
        assert sum(bool(CELL.match(c)) for r in body for c in r) >= 2
    if name == "table4":
        results = json.loads((out / "results.json").read_text())
        assert {r["variant"] for r in results} == {v.name for v in module.VARIANTS}
        assert all(0 <= r["nlvr2"]["accuracy"] <= 100 and "tr_r1" in r["ret_zs"] for r in results)


@pytest.mark.parametrize("family", ["vilt", "albef"])
def test_modality_bias_smoke_for_another_family(family, smoke_base):
    """ViLT (single stream, BERT text side) and ALBEF (momentum model): the joint VLM + LM training and its table."""
    import study as study_tool

    from epic.studies import modality_bias_study

    root, base = smoke_base
    out = root / f"modality-bias_{family}"
    assert study_tool.main(["modality-bias", *base, "--family", family, "--out", str(out)]) == 0
    report = (out / "modality-bias.md").read_text()
    label = {"vilt": "ViLT", "albef": "ALBEF"}[family]
    assert f"`{family}_shapes_tiny`" in report and f"{label}'s pretraining step" in report
    args = study_tool.parse_args(["modality-bias", *base, "--family", family, "--out", str(out)])
    seed_dir = modality_bias_study.seed_dir(study_tool.build_study(args), 0)
    assert seed_dir.parent.parent == root / "runs" / "smoke" / f"modality-bias-{family}"
    assert (seed_dir / "summary.json").is_file()
    rows = table_rows(report)
    assert [r[0] for r in rows[2:4]] == ["VLM (CMLM, sees the image)", "LM (MLM, text only)"]
    assert all(CELL.match(c) for c in rows[2][1:4]) and rows[2][-1] == "1"


def test_a_pretraining_study_for_xvlm(smoke_base):
    """X-VLM (region steps from data.regions in its tiny config): the vanilla run is real (pretraining with region
    batches, NLVR2 and retrieval fine-tuning, zero-shot retrieval), the other rows' configs resolve and read it."""
    import study as study_tool

    from epic.studies import table8
    from epic.studies.common import VANILLA, run_unit

    root, base = smoke_base
    argv = ["table8", *base, "--family", "xvlm", "--out", str(root / "table8_xvlm")]
    study = study_tool.build_study(study_tool.parse_args(argv))
    assert study.scale.vanilla_config == "xvlm_shapes_tiny" and study.scale.finetunes
    vanilla = run_unit(study, VANILLA, 0)
    assert 0 <= vanilla["nlvr2"]["accuracy"] <= 100 and "tr_r1" in vanilla["ret_ft"] and "tr_r1" in vanilla["ret_zs"]
    metrics = [json.loads(line) for line in (Path(vanilla["dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("train/region_step") == 1.0 and "train/bbox_giou" in m for m in metrics)  # a region step ran
    share_runs(table8, study, {"vanilla": vanilla, "epic": vanilla})
    assert study_tool.main([*argv, "--report-only"]) == 0
    report = (root / "table8_xvlm" / "table8.md").read_text()
    rows = table_rows(report)
    assert [r[0] for r in rows[2:]] == ["X-VLM (vanilla)", "X-VLM + †CMLM", "EPIC"]
    for row in rows[2:]:
        assert all(CELL.match(c) for c in row[1:-1]) and row[-1] == "1", row
    assert report.startswith("# Table 8: †CMLM (saliency masking for CMLM) in vanilla X-VLM")


def test_a_family_without_task_models_reports_zero_shot_only(smoke_base, monkeypatch):
    """Without the registry's task models the fine-tuned columns are empty (—), zero-shot retrieval is scored."""
    import study as study_tool

    from epic.studies import common, table8

    root, base = smoke_base
    argv = ["table8", *base, "--family", "xvlm", "--out", str(root / "table8_no_tasks")]
    monkeypatch.setattr(common.Scale, "finetunes", property(lambda self: False))
    study = study_tool.build_study(study_tool.parse_args(argv))
    xvlm_runs = common.run_unit(study, common.VANILLA, 0)  # the cached run of the X-VLM test (or a fresh one)
    fresh = root / "runs_no_tasks"
    study.runs = fresh
    for variant in table8.VARIANTS:  # a runs folder with pretraining and zero-shot results only
        unit = study.unit_dir(variant, 0)
        unit.mkdir(parents=True)
        for name in ("pretrain.json", "ret_zs.json"):  # as written (ret_zs.json records its settings)
            shutil.copyfile(Path(xvlm_runs["dir"]) / name, unit / name)
    assert "nlvr2" not in common.run_unit(study, common.VANILLA, 0)
    assert study_tool.main([*argv, "--runs", str(fresh), "--report-only"]) == 0
    report = (root / "table8_no_tasks" / "table8.md").read_text()
    for row in table_rows(report)[2:]:
        assert row[1:4] == ["—", "—", "—"] and all(CELL.match(c) for c in row[4:6]) and row[-1] == "1", row
    assert "X-VLM has no task models" in report


def test_study_family_errors():
    import study as study_tool

    with pytest.raises(SystemExit, match="not a registered family.*meter, vilt, albef, xvlm"):
        study_tool.build_study(study_tool.parse_args(["table4", "--family", "blip"]))
    with pytest.raises(SystemExit, match="no vilt_4m_ablation config"):
        study_tool.build_study(study_tool.parse_args(["table4", "--family", "vilt", "--scale", "ablation"]))


def test_slurm_array_scripts(tmp_path, monkeypatch):
    """--slurm: two arrays (teachers first, the rest after them) whose tasks run one unit each."""
    from epic.studies import slurm

    calls = []

    def fake_run(cmd, cwd=None, capture_output=None, text=None):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=f"{100 + len(calls)};cluster\n", stderr="")

    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    argv = ["table4", "--seeds", "3", "--out", str(tmp_path)]
    jobs = slurm.submit_arrays("table4", {0: 3, 1: 9}, argv, tmp_path, "tiny", ["--partition=cpu"])
    assert jobs == ["101", "102"]
    assert calls[0] == ["sbatch", "--parsable", str(tmp_path / "slurm" / "phase0.sbatch")]
    assert calls[1] == ["sbatch", "--parsable", "--dependency=afterok:101", str(tmp_path / "slurm" / "phase1.sbatch")]
    script = (tmp_path / "slurm" / "phase1.sbatch").read_text()
    assert "#SBATCH --array=0-8" in script and "#SBATCH --partition=cpu" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@600" in script
    assert script.splitlines()[-1].endswith('tools/study.py table4 --seeds 3 --out ' + str(tmp_path)
                                           + ' --unit "1:$SLURM_ARRAY_TASK_ID"')
    proc = subprocess.run(["bash", "-n", str(tmp_path / "slurm" / "phase0.sbatch")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_slurm_task_runs_its_trainers_through_the_shared_launcher(tmp_path):
    from epic.studies.common import Study, Variant, launcher_command, make_scale

    study = Study("table4", make_scale("tiny", tmp_path / "world"), tmp_path / "out", tmp_path / "runs", [0],
                  in_slurm=True)
    unit = study.unit_dir(Variant("EPIC", "epic", ()), 1)
    cmd, env = launcher_command(study, "epic_shapes_tiny", unit, ["run.seed=1"])
    assert cmd == ["bash", "slurm/launch.sh", "run.seed=1"]
    assert Path(env["EPIC_RUNS"]) / env["EPIC_RUN_NAME"] == unit and env["EPIC_RUN_CONFIG"] == "epic_shapes_tiny"
    assert env["EPIC_SMOKE_CPU"] == "1" and env["EPIC_DATA"] == str(tmp_path / "world")
    cmd, env = launcher_command(study, "finetune_shapes", unit / "ft_nlvr2", [], finetune_task="nlvr2", init=unit)
    assert env["EPIC_FINETUNE_TASK"] == "nlvr2" and env["EPIC_INIT"] == str(unit)


def test_a_cached_stage_made_with_other_settings_is_recomputed_not_reused(tmp_path):
    from epic.studies import common

    path, calls = tmp_path / "nlvr2.json", []

    def run(value):
        return lambda: calls.append(value) or {"accuracy": value}

    assert common._stage(path, run(55.0), settings=["finetune.steps=200"]) == {"accuracy": 55.0}
    assert common._stage(path, run(99.0), settings=["finetune.steps=200"]) == {"accuracy": 55.0}  # cached
    with pytest.raises(common.StageMissing, match="other settings"):
        common._stage(path, run(99.0), collect_only=True, settings=["finetune.steps=300"])
    assert common._stage(path, run(61.0), settings=["finetune.steps=300"]) == {"accuracy": 61.0}
    assert calls == [55.0, 61.0]
    assert common._stage(path, run(0.0), collect_only=True, settings=["finetune.steps=300"]) == {"accuracy": 61.0}
    assert common._stage(path, run(0.0)) == {"accuracy": 61.0}  # a stage without settings reads what is there


def test_parallel_units_of_one_seed_make_their_teacher_once(tmp_path, monkeypatch):
    """--jobs 2 on a table without a vanilla row (Table 5): two EPIC variants of seed 0 start together and both
    need the vanilla teacher of seed 0; it is pretrained once, and both read it."""
    import threading
    import time

    from epic.studies import common

    made, lock = [], threading.Lock()

    def fake_pretrain(study, variant, seed, teacher, fitted):
        with lock:
            made.append((variant.name, seed, None if teacher is None else Path(teacher).name))
        time.sleep(0.3)  # long enough for the other thread to look for the teacher meanwhile
        return {"steps": 1}

    monkeypatch.setattr(common, "_pretrain_stage", fake_pretrain)
    study = common.Study("table5", common.make_scale("tiny", tmp_path / "world"), tmp_path / "out",
                         tmp_path / "runs", [0], downstream=False, jobs=2)
    variants = [common.Variant("LM (cond.)", "epic", ("epic.generator_mode=conditioned",)),
                common.Variant("VLM (SAS)", "epic", ("epic.generator_mode=vlm_sas",))]
    common.run_units(study, common.pretraining_units(study, variants))
    assert sorted(made) == [("LM (cond.)", 0, "seed0"), ("METER (vanilla)", 0, None), ("VLM (SAS)", 0, "seed0")]


def test_ablations_run_each_shared_unit_once_seed_by_seed(smoke_root, tmp_path):
    """tools/study.py ablations: the union of Tables 4, 5, 6, 8 (Fig. 6 reads Table 6's runs), every run folder
    once, seed-major; its report is each study's own report in OUT/<study>."""
    import study as study_tool

    from epic.studies import ablations, table4, table5, table6, table8

    root, base, shared = smoke_root
    study = study_tool.build_study(study_tool.parse_args(["ablations", *base, "--seeds", "2", "--out",
                                                          str(tmp_path / "seeds2")]))
    study.seeds = range(2)
    units = ablations.units(study)
    keys = [u.key for u in units]
    variants = {study.unit_dir(v, 0) for m in (table4, table5, table6, table8) for v in m.VARIANTS}
    assert len(keys) == len(set(keys)) == 2 * len(variants)  # EPIC (4 tables), vanilla (2) run once per seed
    assert [u.seed for u in units] == sorted(u.seed for u in units)
    assert sum(str(study.unit_dir(table6.ratio_variant(0.35), 0)) == k for k in keys) == 1
    study = study_tool.build_study(study_tool.parse_args(["ablations", *base, "--out", str(root / "ablations")]))
    for module in (table4, table5, table6, table8):
        share_runs(module, study, shared)
    assert study_tool.main(["ablations", *base, "--out", str(root / "ablations"), "--report-only"]) == 0
    for name, pngs in STUDY_FILES.items():
        if name.startswith("table") or name == "fig6":
            assert (root / "ablations" / name / f"{name}.md").is_file()
            assert all((root / "ablations" / name / png).stat().st_size > 1000 for png in pngs)


def test_a_regenerated_world_recomputes_the_stages_on_its_data(tmp_path):
    """A world made by an older generator revision is made again, and a downstream stage records the hash of the
    task files it used: other data -> other settings -> recomputed (cached results of the old data are not reused)."""
    from epic.studies import common

    world = common.ensure_world(tmp_path / "world", "smoke")
    marker = json.loads((world / "study_world.json").read_text())
    assert marker["revision"] == common.WORLD_REVISION
    scale = common.make_scale("smoke", world)
    before = common.task_data_fingerprint(scale, "nlvr2")
    assert before[0].startswith("data:nlvr2=") and common.task_data_fingerprint(scale, "retrieval") != before
    val = world / "tasks" / "nlvr2" / "val.json"
    made = val.read_text()
    val.write_text("[]\n")  # another generator's data
    assert common.task_data_fingerprint(scale, "nlvr2") != before
    (world / "study_world.json").write_text(json.dumps({k: v for k, v in marker.items() if k != "revision"}))
    common.ensure_world(world, "smoke")  # an older revision's marker: made again
    assert val.read_text() == made and common.task_data_fingerprint(scale, "nlvr2") == before
    assert common.make_scale("ablation", None).world is None and common.task_data_fingerprint(
        common.make_scale("ablation", None), "nlvr2") == []


def test_tiny_nlvr2_fine_tuning_runs_at_its_own_lr_and_length(tmp_path):
    """The tiny scale's NLVR2 recipe (600 steps at 5e-5; 200 at the config's 2e-4 predicted one class) reaches the
    fine-tuning config; retrieval keeps the config's lr."""
    from epic.finetune_config import load_finetune_config
    from epic.studies import common

    study = common.Study("table4", common.make_scale("tiny", tmp_path / "world"), tmp_path / "out",
                         tmp_path / "runs", [0])
    unit = study.unit_dir(common.VANILLA, 0)

    def parsed(task):
        cmd = common.finetune_command(study, unit, task, 0)
        at = cmd.index("--config")
        return load_finetune_config(cmd[at + 1], cmd[at + 2:], task=cmd[cmd.index("--task") + 1])

    nlvr2, retrieval = parsed("nlvr2"), parsed("retrieval")
    assert (nlvr2.train.lr, nlvr2.train.max_steps) == (5e-5, 600)
    config_lr = load_finetune_config("finetune_shapes", task="retrieval").train.lr
    assert (retrieval.train.lr, retrieval.train.max_steps) == (config_lr, 100) and config_lr != 5e-5


def test_gradcam_scores_made_from_other_runs_are_not_reused(tmp_path):
    """A seed's Grad-CAM scores record the runs they read (folders named by their pretraining settings): with other
    pretraining settings (here --steps) the cached scores are stale, reported missing when only collecting."""
    from epic.studies import common, gradcam

    def study(steps):
        scale = common.make_scale("tiny", tmp_path / "world")
        scale.pretrain_steps = steps
        return common.Study("gradcam", scale, tmp_path / "out", tmp_path / "runs", [0], collect_only=True)

    made = study(1500)
    path = common.analysis_dir(made, "gradcam") / "seed0.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed": 0, "models": {}, common.SETTINGS_KEY: [
        str(made.unit_dir(v, 0)) for v in gradcam.MODELS]}))
    assert gradcam.run_seed(made, 0) == {"seed": 0, "models": {}}
    with pytest.raises(common.StageMissing, match="other settings"):
        gradcam.run_seed(study(300), 0)


def test_modality_bias_runs_of_other_settings_are_not_reused(tmp_path):
    """The modality-bias run of a seed lives in a folder named by its settings, so a study with another --steps
    neither reports nor feeds unmasked-use from it; unmasked-use's measurement records the run it read."""
    from epic.studies import common, modality_bias_study, unmasked_use

    def study(steps):
        scale = common.make_scale("tiny", tmp_path / "world")
        scale.modality_steps = steps
        return common.Study("modality-bias", scale, tmp_path / "out", tmp_path / "runs", [0], collect_only=True)

    made, other = study(1500), study(300)
    assert modality_bias_study.seed_dir(made, 0) != modality_bias_study.seed_dir(other, 0)
    assert modality_bias_study.seed_dir(made, 0) == modality_bias_study.seed_dir(study(1500), 0)
    out = modality_bias_study.command(made, 0)
    assert out[out.index("--out") + 1] == str(modality_bias_study.seed_dir(made, 0))
    assert out[out.index("--steps") + 1] == "1500"
    path = common.analysis_dir(made, "unmasked-use") / "seed0.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed": 0, "rows": [], common.SETTINGS_KEY: [
        str(modality_bias_study.seed_dir(made, 0))]}))
    assert unmasked_use.run_seed(made, 0) == {"seed": 0, "rows": []}
    with pytest.raises(common.StageMissing, match="other settings"):
        unmasked_use.run_seed(other, 0)
