"""YAML problems are config errors: a syntax error or an unsafe tag in a config file, in an `extends:` parent or in
an override value is a ConfigError naming the file (or override) and line; nothing in it is executed; the entry
points print one `config error: …` line and exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from epic.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def unsafe_tag(target: Path) -> str:
    """A value that, under yaml.unsafe_load, would create `target` (the test checks it never appears)."""
    return f"!!python/object/apply:builtins.open ['{target}', 'w']"


def syntax_error_file(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("extends: shapes_tiny\ntrain:\n  lr: 0.5\n   max_steps: 3\n")  # line 4: bad indentation
    return path


def test_syntax_error_names_file_and_line(tmp_path):
    path = syntax_error_file(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert f"{path}:4:" in message and "invalid YAML" in message and "\n" not in message


def test_unsafe_tag_is_rejected_and_not_executed(tmp_path):
    target = tmp_path / "created_by_yaml"
    path = tmp_path / "evil.yaml"
    for tag in (unsafe_tag(target), f"!!python/object/apply:os.system ['touch {target}']"):
        path.write_text(f"extends: shapes_tiny\nrun:\n  name: {tag}\n")
        with pytest.raises(ConfigError) as err:
            load_config(str(path))
        assert f"{path}:3:" in str(err.value) and "unsupported YAML tag" in str(err.value)
        assert "python/object/apply" in str(err.value)
        assert not target.exists()
    # the same line under yaml's unsafe loader does create it: the check above is not vacuous
    import yaml

    yaml.unsafe_load(f"x: {unsafe_tag(target)}")["x"].close()
    assert target.exists()


def test_error_in_an_extends_parent_names_the_parent(tmp_path):
    target = tmp_path / "created_by_parent"
    parent = tmp_path / "parent.yaml"
    parent.write_text(f"extends: shapes_tiny\ntrain:\n  lr: 0.1\nrun:\n  name: {unsafe_tag(target)}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\ntrain:\n  lr: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(child))
    assert f"{parent}:5:" in str(err.value) and str(child) in str(err.value)
    assert not target.exists()
    parent.write_text("train: {lr: 0.1\n")
    with pytest.raises(ConfigError, match=f"{parent}:"):
        load_config(str(child))


@pytest.mark.parametrize("override, needle", [
    ("train.lr=[1, 2", "invalid YAML"),
    ("run.name=!!python/object/apply:os.getcwd []", "unsupported YAML tag"),
])
def test_bad_override_values(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("shapes_tiny", [override])
    assert needle in str(err.value) and override in str(err.value)


@pytest.mark.parametrize("entry", ["pretrain", "finetune", "evaluate"])
def test_entry_points_print_one_config_error_line_and_exit_2(entry, tmp_path, capsys):
    import importlib

    target = tmp_path / "created_by_override"
    module = importlib.import_module(f"epic.{entry}")
    bad = f"run.name={unsafe_tag(target)}"
    if entry == "pretrain":
        argv = ["--config", str(syntax_error_file(tmp_path)), "--ds_config", "ds_configs/cpu_zero2.json"]
    elif entry == "finetune":
        argv = ["--task", "retrieval", "--config", "finetune_shapes", "--ds_config", "ds_configs/cpu_zero2.json",
                "--init", str(tmp_path / "nothing"), bad]
    else:
        argv = ["--task", "retrieval", "--ckpt", str(tmp_path / "nothing"), bad]
    assert module.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: "), lines
    assert ("broken.yaml:4:" if entry == "pretrain" else "unsupported YAML tag") in lines[0]
    assert not target.exists()


def test_pretrain_script_exits_2_with_one_line(tmp_path):
    """As a process (what a user or Slurm sees): one stderr line, exit status 2, no traceback."""
    target = tmp_path / "created_by_config"
    path = tmp_path / "evil.yaml"
    path.write_text(f"extends: shapes_tiny\nrun:\n  dir: {unsafe_tag(target)}\n")
    proc = subprocess.run([sys.executable, "epic/pretrain.py", "--config", str(path), "--ds_config",
                           "ds_configs/cpu_zero2.json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"config error: {path}:3:"), proc.stderr
    assert not target.exists()
