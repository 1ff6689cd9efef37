"""Checkpoint bookkeeping: `latest` only ever names a complete checkpoint; pruning keeps the last K."""
import json

import pytest
import torch

from epic.engine import checkpoint as ckpt


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes/reads one tensor per tag dir."""

    def __init__(self, value=0.0, crash=False):
        self.value, self.crash = value, crash

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        path = f"{save_dir}/{tag}"
        import os

        os.makedirs(path, exist_ok=True)
        if self.crash:
            raise OSError("disk full (simulated crash while saving)")
        torch.save({"value": self.value, **client_state}, f"{path}/mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        state = torch.load(f"{load_dir}/{tag}/mp_rank_00_model_states.pt")
        self.value = state["value"]
        return f"{load_dir}/{tag}", state


def _save(root, step, engine, keep_last=2):
    return ckpt.save_checkpoint(root, step, {"vlm": engine}, {"data": {"pos": step}, "rng": None},
                                {"step": step, "world_size": 1}, keep_last)


def test_crash_while_saving_keeps_previous_latest(tmp_path):
    root = tmp_path / "checkpoints"
    good = _save(root, 10, FakeEngine(1.0))
    with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint .*step_00000020.*removed the partial "
                                                   r"files; `latest` still names step_00000010"):
        _save(root, 20, FakeEngine(2.0, crash=True))
    assert not (root / "step_00000020").exists()  # a failed save cleans up after itself
    (root / "step_00000020" / "vlm").mkdir(parents=True)  # what a SIGKILL during the save leaves ...
    assert ckpt.find_checkpoint(tmp_path) == good  # ... is never picked
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.find_checkpoint(root / "step_00000020")
    engine = FakeEngine()
    trainer_state, (rank_state,) = ckpt.load_checkpoint(good, {"vlm": engine}, world_size=1)
    assert engine.value == 1.0 and trainer_state["step"] == 10 and rank_state["data"] == {"pos": 10}


def test_latest_pointing_at_incomplete_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    first = _save(root, 5, FakeEngine(1.0))
    second = _save(root, 6, FakeEngine(2.0))
    (second / ckpt.COMPLETE).unlink()  # e.g. latest written by a foreign tool before the marker
    assert ckpt.find_checkpoint(tmp_path) == first


def test_keep_last_prunes_old_and_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000001").mkdir(parents=True)  # left by a killed save
    for step in (2, 3, 4, 5):
        _save(root, step, FakeEngine(float(step)), keep_last=2)
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["step_00000004", "step_00000005"]
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert json.loads((root / "step_00000005" / "trainer_state.json").read_text())["step"] == 5


def test_other_world_size_returns_every_saved_rank_state(tmp_path):
    """Elastic resume: written by 1 rank, loaded by 2 -> the states of all saved ranks (to re-split the data)."""
    good = _save(tmp_path / "checkpoints", 3, FakeEngine(1.0))
    engine = FakeEngine()
    trainer_state, rank_states = ckpt.load_checkpoint(good, {"vlm": engine}, world_size=2)
    assert engine.value == 1.0 and trainer_state["world_size"] == 1 and [s["data"] for s in rank_states] == [{"pos": 3}]


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    state = ckpt.capture_rng_state({"objective": gen})
    expected = (torch.rand(3), torch.rand(3, generator=gen))
    torch.rand(5), torch.rand(5, generator=gen)
    ckpt.restore_rng_state(state, {"objective": gen})
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=gen), expected[1])


# ---------------------------------------------------------------------------------------- faults (unit level)
def test_full_disk_during_save_says_so_and_cleans_up(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good = _save(root, 10, FakeEngine(1.0))
    monkeypatch.setenv("EPIC_FAULT", "enospc:save_engines:20")  # torch.save writes half, then ENOSPC
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(root, 20, FakeEngine(2.0))
    message = str(info.value)
    assert message.startswith(f"no space left on device while writing checkpoint step_00000020 to {root}")
    assert "`latest` still names step_00000010" in message
    assert not (root / "step_00000020").exists()
    assert (root / "latest").read_text().strip() == "step_00000010" and ckpt.verify_checkpoint(good) is None


def _damage(path, how):
    if how == "truncated engine file":
        f = path / "vlm" / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:20])
    elif how == "missing rank file":
        (path / "rank_00000.pt").unlink()
    elif how == "garbage trainer_state.json":
        (path / "trainer_state.json").write_text("{garbage")
    elif how == "COMPLETE present, a file missing":
        (path / "vlm" / "mp_rank_00_model_states.pt").unlink()


@pytest.mark.parametrize("how", ["truncated engine file", "missing rank file", "garbage trainer_state.json",
                                 "COMPLETE present, a file missing"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, how):
    root = tmp_path / "checkpoints"
    first = _save(root, 5, FakeEngine(1.0), keep_last=3)
    newest = _save(root, 6, FakeEngine(2.0), keep_last=3)
    _damage(newest, how)
    assert ckpt.verify_checkpoint(newest) is not None and ckpt.verify_checkpoint(first) is None
    messages = []
    engine = FakeEngine()
    loaded, state, (rank_state,) = ckpt.load_newest(ckpt.resume_candidates(tmp_path), {"vlm": engine}, 1,
                                                    log=messages.append)
    assert loaded == first and state["step"] == 5 and engine.value == 1.0 and rank_state["data"] == {"pos": 5}
    assert len(messages) == 1 and "falling back to step_00000005" in messages[0]


def test_no_loadable_checkpoint_never_starts_from_scratch(tmp_path):
    only = _save(tmp_path / "checkpoints", 5, FakeEngine(1.0))
    (only / "trainer_state.json").write_text("")
    with pytest.raises(ckpt.CheckpointError, match="Refusing to start from scratch"):
        ckpt.load_newest(ckpt.resume_candidates(tmp_path), {"vlm": FakeEngine()}, 1, log=lambda m: None)


def test_a_damaged_file_that_keeps_its_size_fails_at_load_and_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    first = _save(root, 5, FakeEngine(1.0), keep_last=3)
    newest = _save(root, 6, FakeEngine(2.0), keep_last=3)
    f = newest / "vlm" / "mp_rank_00_model_states.pt"
    f.write_bytes(b"\0" * f.stat().st_size)  # same size, garbage bytes: only torch.load finds out
    loaded, _, _ = ckpt.load_newest(ckpt.resume_candidates(tmp_path), {"vlm": FakeEngine()}, 1, log=lambda m: None)
    assert loaded == first
