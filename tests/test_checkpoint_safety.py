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
    with pytest.raises(OSError):
        _save(root, 20, FakeEngine(2.0, crash=True))
    assert (root / "step_00000020").is_dir()  # half-written directory exists ...
    assert ckpt.find_checkpoint(tmp_path) == good  # ... but is never picked
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.find_checkpoint(root / "step_00000020")
    engine = FakeEngine()
    trainer_state, rank_state = ckpt.load_checkpoint(good, {"vlm": engine}, world_size=1)
    assert engine.value == 1.0 and trainer_state["step"] == 10 and rank_state["data"] == {"pos": 10}


def test_latest_pointing_at_incomplete_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    first = _save(root, 5, FakeEngine(1.0))
    second = _save(root, 6, FakeEngine(2.0))
    (second / ckpt.COMPLETE).unlink()  # e.g. latest written by a foreign tool before the marker
    assert ckpt.find_checkpoint(tmp_path) == first


def test_keep_last_prunes_old_and_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    with pytest.raises(OSError):
        _save(root, 1, FakeEngine(crash=True))
    for step in (2, 3, 4, 5):
        _save(root, step, FakeEngine(float(step)), keep_last=2)
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["step_00000004", "step_00000005"]
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert json.loads((root / "step_00000005" / "trainer_state.json").read_text())["step"] == 5


def test_world_size_mismatch_is_explained(tmp_path):
    good = _save(tmp_path / "checkpoints", 3, FakeEngine(1.0))
    with pytest.raises(ckpt.CheckpointError, match="ds_to_universal"):
        ckpt.load_checkpoint(good, {"vlm": FakeEngine()}, world_size=2)


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    state = ckpt.capture_rng_state({"objective": gen})
    expected = (torch.rand(3), torch.rand(3, generator=gen))
    torch.rand(5), torch.rand(5, generator=gen)
    ckpt.restore_rng_state(state, {"objective": gen})
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=gen), expected[1])
