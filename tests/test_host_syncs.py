"""The trainer's hot path has at most one host read per optimizer step: losses and metrics stay on the device
until a log line (epic/engine/metrics.py); the non-finite guard reads its per-engine flags once per step
(epic/engine/nonfinite.py: it must know at once when train.max_nonfinite_steps is reached). Counted by patching
every host read of a tensor and all_reduce."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from epic.engine.metrics import DeviceMetrics, StepLosses, read_scalars
from epic.engine.nonfinite import NonfiniteGuard


class FakeEngine:
    def __init__(self):
        self.module = torch.nn.Linear(3, 1)
        self.skipped_steps = 0
        self.lr_scheduler = SimpleNamespace(lr_lambdas=[lambda epoch: 1.0], last_epoch=0)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.module.zero_grad()

    def get_global_grad_norm(self):
        return None


class FakeObjective:
    def __init__(self, nonfinite_at=()):
        self.calls, self.nonfinite_at = 0, set(nonfinite_at)

    def losses(self, model, batch, rng, step):
        self.calls += 1
        loss = model(batch["x"]).pow(2).mean() + self.calls
        if self.calls in self.nonfinite_at:
            loss = loss * float("inf")
        return {"loss": loss, "loss_itm": torch.tensor(float(self.calls)), "itm_acc": torch.tensor(0.5)}

    def log_values(self, step):
        return {}

    def images(self, step):
        return {}


def make_trainer(steps=6, log_every=3, accum=2, nonfinite_at=()):
    from epic.config import load_config
    from epic.engine.trainer import Trainer

    trainer = object.__new__(Trainer)
    trainer.cfg = load_config("shapes_tiny", [f"train.max_steps={steps}", f"train.log_every={log_every}",
                                              "train.save_every=1000"])
    trainer.rank, trainer.world_size, trainer.step = 0, 1, 0
    trainer.device, trainer.dtype = torch.device("cpu"), torch.float32
    trainer.batch = SimpleNamespace(grad_accum_steps=accum, micro_batch_size=2, global_batch_size=2 * accum)
    trainer.engine, trainer.objective = FakeEngine(), FakeObjective(nonfinite_at)
    trainer.rng = torch.Generator().manual_seed(0)
    trainer.loader = SimpleNamespace(__iter__=None, skip_counts=lambda: {})
    batches = iter(lambda: {"x": torch.randn(2, 3)}, None)
    trainer.loader = type("L", (), {"__iter__": lambda self: batches, "skip_counts": lambda self: {}})()
    trainer.logged = []
    trainer.logger = SimpleNamespace(scalars=lambda step, values: trainer.logged.append((step, values)),
                                     console=lambda *a: None, image=lambda *a: None, close=lambda: None)
    trainer.flops_per_sample, trainer.peak_tflops = 0.0, 0.0
    trainer.save = lambda: "saved"
    trainer.engines = {"vlm": trainer.engine}
    trainer.guard = NonfiniteGuard(["vlm"], trainer.cfg.train.max_nonfinite_steps, trainer.device)
    trainer.recorder = None
    return trainer


def test_no_host_read_between_log_lines(monkeypatch):
    trainer = make_trainer(steps=6, log_every=3)
    reads = []

    def counting(name, original):
        def wrapper(*args, **kwargs):
            reads.append((trainer.step, name))
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(dist, "all_reduce", counting("all_reduce", dist.all_reduce))
    preemption = SimpleNamespace(should_stop=lambda: False, close=lambda: None)
    result = trainer.train(preemption)
    assert result.step == 6 and len(result.losses) == 6
    # one read per optimizer step (the guard's flags), and the log lines of steps 3 and 6: 2 more each
    per_step = {step: sum(1 for s, _ in reads if s == step) for step in range(1, 7)}
    assert {step for step, _ in reads} == set(range(1, 7)), reads
    assert all(per_step[step] <= (3 if step in (3, 6) else 1) for step in per_step), per_step
    assert [step for step, _ in trainer.logged] == [3, 6]


def test_values_are_those_of_the_plain_loop():
    trainer = make_trainer(steps=4, log_every=2, accum=2, nonfinite_at=(3,))
    result = trainer.train(SimpleNamespace(should_stop=lambda: False, close=lambda: None))
    # micro losses are (model output) + call number; call 3 is infinite (its step's mean too)
    assert result.losses[1] == float("inf") and all(v == v for v in result.losses)
    first = trainer.logged[0][1]
    assert first["train/loss_itm"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert first["train/itm_acc"] == pytest.approx(0.5)
    assert first["train/nonfinite_losses"] == 1.0
    assert trainer.logged[1][1]["train/nonfinite_losses"] == 1.0  # a running count since the start


def test_metrics_helpers():
    metrics = DeviceMetrics()
    metrics.add({"a": torch.tensor(1.0), "b": 2, "skip": torch.ones(3), "flag": True})
    metrics.add({"a": torch.tensor(3.0)})
    assert metrics.pop() == {"a": 2.0, "b": 2.0}
    assert read_scalars([torch.tensor(1.5), 2, torch.tensor([3.0])]) == [1.5, 2.0, 3.0]
    losses = StepLosses()
    micro = [losses.add_micro(torch.tensor(v)) for v in (1.0, float("nan"), 3.0, 5.0)]
    losses.add_step(micro[:2])
    losses.add_step(micro[2:])
    flushed = losses.flush()
    assert flushed[1] == 4.0 and flushed[0] != flushed[0] and losses.nonfinite_total == 1
    assert losses.flush() == []
