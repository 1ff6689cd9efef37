"""Config fuzzing: hypothesis-generated bad overrides (wrong types, unknown keys, negative sizes, zero steps, ratios
outside [0, 1], non-finite and absurd values) through `epic/pretrain.py --check-only`: every one exits 2 with one
line on stderr, none with a traceback, none starts training. Most examples call the --check-only code path
in-process (pretrain.check_only, what main() calls); a few go through a real subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epic import pretrain

ROOT = Path(__file__).resolve().parents[1]

SIZES = ["data.micro_batch_size", "data.image_size", "data.max_text_len", "data.eval_batch_size",
         "train.global_batch_size", "train.max_steps", "train.log_every", "train.save_every", "train.keep_last",
         "eval.batch_size", "model.vit_width", "model.vit_layers", "model.vit_heads", "model.hidden_size",
         "model.num_heads", "model.patch_size", "model.text_layers", "model.num_fusion_layers", "model.mlp_ratio"]
NON_NEGATIVE = ["run.seed", "data.num_workers", "data.streams", "train.stop_at_step", "train.eval_every",
                "train.max_nonfinite_steps", "train.lr", "train.weight_decay", "train.grad_clip", "eval.k_test",
                "epic.generator.layers", "epic.generator.hidden_size", "epic.lambda_itc", "model.vocab_size"]
RATIOS = ["data.mlm_probability", "train.warmup_ratio", "train.hold_ratio", "epic.mask_ratio", "model.dropout",
          "train.final_lr_scale"]
FLOATS = ["train.lr", "train.eps", "train.grad_clip", "run.collective_timeout_s", "epic.lambda_itc",
          "model.initializer_range", "data.mlm_probability"]
BOOLS = ["data.randaugment", "train.deterministic", "train.record_samples", "epic.enabled"]
STRINGS = ["train.schedule", "epic.masking", "epic.corruption", "epic.generator_mode", "model.text_model_type"]
SECTIONS = ["run", "data", "model", "train", "eval", "epic", "epic.generator"]

identifier = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
junk_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)

bad_overrides = st.one_of(
    # unknown keys (in a known section, or an unknown section)
    st.tuples(st.sampled_from(SECTIONS), identifier).filter(lambda t: t[1] not in _known(t[0])).map(
        lambda t: f"{t[0]}.{t[1]}=1"),
    st.tuples(identifier.filter(lambda s: s not in ("run", "data", "model", "train", "eval", "epic")),
              identifier).map(lambda t: f"{t[0]}.{t[1]}=1"),
    # wrong types
    st.tuples(st.sampled_from(SIZES + FLOATS), st.sampled_from(["abc", "[1, 2]", "{a: 1}", "true", "''"])).map(
        lambda t: f"{t[0]}={t[1]}"),
    st.tuples(st.sampled_from(BOOLS), st.sampled_from(["1", "yes please", "[true]", "3.5"])).map(
        lambda t: f"{t[0]}={t[1]}"),
    st.tuples(st.sampled_from(STRINGS), st.one_of(st.integers().map(str), st.just("[a]"), junk_text.map(repr))).map(
        lambda t: f"{t[0]}={t[1]}"),
    st.tuples(st.sampled_from(SIZES), st.floats(0.01, 1e6).filter(lambda x: not x.is_integer())).map(
        lambda t: f"{t[0]}={t[1]!r}"),
    # sections given a value, values given a section
    st.sampled_from(SECTIONS[:-1]).map(lambda s: f"{s}=3"),
    st.sampled_from(SIZES).map(lambda k: f"{k}.sub=3"),
    # negative / zero sizes, negative counts
    st.tuples(st.sampled_from(SIZES), st.integers(max_value=0)).map(lambda t: f"{t[0]}={t[1]}"),
    st.tuples(st.sampled_from(NON_NEGATIVE), st.integers(max_value=-1)).map(lambda t: f"{t[0]}={t[1]}"),
    # ratios outside [0, 1]
    st.tuples(st.sampled_from(RATIOS), st.one_of(st.floats(1.0001, 1e9), st.floats(-1e9, -0.0001))).map(
        lambda t: f"{t[0]}={t[1]!r}"),
    # non-finite and absurd values
    st.tuples(st.sampled_from(FLOATS), st.sampled_from([".nan", ".inf", "-.inf", "-1e400", "1e400"])).map(
        lambda t: f"{t[0]}={t[1]}"),
)
# Hand-picked ones, each checked every time (not left to the draw)
FIXED = ["train.global_batch_size=7", "data.micro_batch_size=3", "data.streams=-2", "train.betas=[0.9]",
         "train.betas=[1.5, 0.9]", "model.vit_heads=7", "data.max_text_len=4096", "data.root=/nonexistent/world",
         "run.dir=/tmp/a\x00b", "data.tokenizer=/nonexistent", "train.schedule=no_such_schedule", "epic.enabled=true",
         "data.sources=[{shards: ''}]", "data.sources=[{shards: /nowhere/*.tar, weight: 1}]", "run.seed=-1",
         "train.max_steps=0", "train.lr=[", "train.lr={", "key_without_value", "=3", "train.=1", "train..lr=1",
         "data.tokenizer=" + __file__, "model.image_size=60", "train.hold_ratio=1.5", "data.num_workers=-1"]


def _known(section: str) -> set:
    import dataclasses

    from epic.config import Config

    node = Config()
    for part in section.split("."):
        node = getattr(node, part)
    return {f.name for f in dataclasses.fields(node)}


def base_argv(world, run_dir):
    return ["--check-only", "--ds_config", str(ROOT / "ds_configs" / "cpu_zero2.json"), "--config", "shapes_tiny",
            f"data.root={world}", f"run.dir={run_dir}", "data.micro_batch_size=8", "train.global_batch_size=16"]


@pytest.fixture(scope="module")
def base(shapes_world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    return base_argv(shapes_world, run_dir), run_dir


def test_the_base_config_passes(base, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    argv, run_dir = base
    assert pretrain.main(argv) == 0
    assert '"check": "ok"' in capsys.readouterr().out and not run_dir.exists()


def check_exits_2(base, capsys, override):
    argv, run_dir = base
    code = pretrain.main(argv + [override])
    captured = capsys.readouterr()
    assert code == 2, (override, captured.out, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("error: ", "config error: ")), (override, captured.err)
    assert "Traceback" not in captured.err and not run_dir.exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(override=bad_overrides)
def test_bad_override_exits_2_with_one_line(base, capsys, override):
    check_exits_2(base, capsys, override)


@pytest.mark.parametrize("override", FIXED)
def test_hand_picked_bad_override_exits_2(base, capsys, override):
    check_exits_2(base, capsys, override)


@pytest.mark.parametrize("override", ["train.max_steps=-5", "data.mlm_probability=1.5", "model.vit_width=[64]"])
def test_bad_override_in_a_real_process(base, override):
    argv, run_dir = base
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(ROOT / "epic" / "pretrain.py"), *argv, override], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.strip().splitlines() if "[WARNING]" not in line]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert override.split("=")[0] in lines[0] and not run_dir.exists()
