"""The trainer's hot path has at most one host read per optimizer step: losses and metrics stay on the device
until a log line (epic/engine/metrics.py); the non-finite guard reads its per-engine flags once per step
(epic/engine/nonfinite.py: it must know at once when train.max_nonfinite_steps is reached). Counted by patching
every host read of a tensor and all_reduce.

The EPIC micro-step itself (teacher masking, the generator's forward, backward and step, the VLM passes) has none:
counted by epic.engine.host_syncs.HostSyncCounter (a dispatch mode that sees nonzero, boolean-mask indexing,
.item() & co. of device tensors on the CPU too); DeepSpeed's own reads happen only at an optimizer step."""
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


# ------------------------------------------------------------------------------------- the detector itself
def test_counter_flags_device_reads_and_not_host_ones():
    from epic.engine.host_syncs import HostSyncCounter

    device_value, host_value = torch.randn(6), torch.randn(6)
    with HostSyncCounter([device_value]) as syncs:
        mask = device_value > 0  # computed from a device tensor: on the device too
        syncs.label = "sync"
        float(device_value.sum())
        mask.nonzero()
        device_value[mask]
        y = device_value.clone()
        y[mask] = 0.0
        device_value.tolist()
        bool(device_value.abs().max() > 0)
        syncs.label = "none"
        device_value[torch.tensor([0, 2])]  # integer indices: fixed shape
        torch.where(mask, device_value, 0.0).sum()
        torch.argsort(mask.to(torch.uint8), stable=True)
        float(host_value.sum())  # host-born (e.g. a CPU generator's draw): reading it costs nothing
        host_value.tolist()
        host_value.nonzero()
    assert [e.what for e in syncs.events if e.label == "sync"] == [
        "_local_scalar_dense", "nonzero", "index", "index_put_", "Tensor.tolist", "_local_scalar_dense"], syncs.report()
    assert syncs.count("none") == 0, syncs.report("none")
    assert all(e.where.endswith("in test_counter_flags_device_reads_and_not_host_ones") for e in syncs.events)


def test_masked_flat_indices_and_replace_at_match_boolean_indexing():
    from epic.objectives.corruption import masked_count, masked_flat_indices, replace_at

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        rows, length = 1 + trial % 5, 1 + trial % 9
        positions = torch.rand(rows, length, generator=generator) < 0.4
        flat = masked_flat_indices(positions, int(positions.sum()))
        assert torch.equal(flat, positions.flatten().nonzero().squeeze(1))
        ids = torch.randint(10, (rows, length), generator=generator)
        values = torch.randint(10, 20, (len(flat),), generator=generator)
        assert torch.equal(replace_at(ids, flat, values), replace_at(ids, positions, values))
    with pytest.raises(RuntimeError, match="real_lengths do not match"):
        masked_flat_indices(torch.tensor([[True, False, True]]), 1)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
             "special_tokens_mask": torch.tensor([[1, 0, 0, 1, 1], [1, 0, 1, 1, 1]]).bool()}
    positions = torch.zeros(2, 5, dtype=torch.bool)
    assert masked_count(batch, positions, 0.35) == 2  # ceil(0.35 * 2) + ceil(0.35 * 1)
    assert masked_count({**batch, "real_lengths": [20, 3]}, positions, 0.35) == 7 + 2  # 0.35 * 20 = 7 exactly


# --------------------------------------------------------------------------- the EPIC micro-step, real engines
from test_epic_engines import BATCH, build, setup  # noqa: E402,F401  (the module-scoped fixture, reused)

EPIC_SOURCES = ("/epic/objectives/", "/epic/models/", "/epic/kernels/", "/epic/eval/", "/epic/data/")


ACCUM = 2


@pytest.fixture(scope="module")
def epic_engines(setup):
    """One rank's VLM engine and EPIC objective (teacher, generator engine), ACCUM micro-batches per step."""
    cfg, engine, objective = build(setup, "epic.log_saliency_every=0", f"train.global_batch_size={BATCH * ACCUM}",
                                   accum=ACCUM)
    return engine, objective


def _epic_micro_steps(setup, engine, objective, steps, first_step=0):
    """Runs `steps` optimizer steps of ACCUM micro-batches as Trainer._micro_step does (objective.losses, VLM
    backward, VLM step) under a HostSyncCounter tracking the batch and every engine's tensors; events are labelled
    "<step>.<micro>/<phase>"."""
    from epic.engine.host_syncs import HostSyncCounter, engine_tensors

    batch = setup["batch"]
    assert isinstance(batch["real_lengths"], list)  # the loader's host ints
    engines = [engine, objective.gen_engine, objective.teacher]
    roots = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    roots += [t for e in engines if e is not None for t in engine_tensors(e)]
    syncs = HostSyncCounter(roots)
    with syncs:
        for step in range(first_step, first_step + steps):
            for micro in range(ACCUM):
                syncs.label = f"{step}.{micro}/losses"
                out = objective.losses(engine.module, batch, torch.Generator().manual_seed(10 * step + micro), step)
                syncs.label = f"{step}.{micro}/backward"
                engine.backward(out["loss"])
                syncs.label = f"{step}.{micro}/step"
                engine.step()
    return syncs, out


def test_epic_micro_step_has_no_host_sync(setup, epic_engines):
    syncs, out = _epic_micro_steps(setup, *epic_engines, steps=2)
    assert "loss_gen" in out and torch.isfinite(out["loss"])
    ours = [e for e in syncs.events if any(part in e.where for part in EPIC_SOURCES)]
    assert not ours, "\n".join(map(str, ours))
    # DeepSpeed reads its grad norm / overflow flag only at an optimizer step (the last micro-batch), of the
    # generator's engine (inside objective.losses) and of the VLM's, never in between
    assert all(e.label.split("/")[0].endswith(f".{ACCUM - 1}") for e in syncs.events), syncs.report()
    assert all("/deepspeed/" in e.where for e in syncs.events), syncs.report()
    for step in ("0", "1"):
        assert syncs.count(f"{step}.{ACCUM - 1}/losses") >= 1 and syncs.count(f"{step}.{ACCUM - 1}/step") >= 1, \
            syncs.report()


def test_a_sync_reintroduced_in_the_epic_step_is_caught(setup, epic_engines, monkeypatch):
    from epic.objectives.consistency import EpicObjective

    engine, objective = epic_engines

    def corrupt_with_nonzero(batch, positions, image_embeds, rng):
        positions.flatten().nonzero()  # what _corrupt did before: the masked positions' count read by the host
        return EpicObjective._corrupt(objective, batch, positions, image_embeds, rng)

    monkeypatch.setattr(objective, "_corrupt", corrupt_with_nonzero)
    syncs, _ = _epic_micro_steps(setup, engine, objective, steps=1, first_step=2)
    caught = [e for e in syncs.events if e.what == "nonzero"]
    assert [e.label for e in caught] == [f"2.{m}/losses" for m in range(ACCUM)], syncs.report()
    assert all("corrupt_with_nonzero" in e.where for e in caught)
