"""The GPU fast path computes what the plain path computes: activation checkpointing and torch.compile give the
same losses and gradients, a part that does not compile falls back to eager (logged), and every AdamW kernel
(fused, foreach, for-loop) gives the hand-written AdamW update."""
import copy
import logging
import math

import pytest
import torch

from epic.models.configuration_meter import METERConfig
from epic.models.fast_path import compile_parts, compile_report, set_activation_checkpointing
from epic.models.meter import METER
from epic.objectives.vanilla import vanilla_losses


def tiny_meter(dropout=0.1) -> METER:
    torch.manual_seed(0)
    cfg = METERConfig(image_size=32, patch_size=16, vit_width=32, vit_layers=2, vit_heads=2, vocab_size=60,
                      text_hidden_size=24, text_layers=2, text_heads=2, text_intermediate_size=48,
                      text_max_position_embeddings=16, max_text_len=8, hidden_size=32, num_heads=4,
                      num_fusion_layers=2, dropout=dropout, initializer_range=0.08)
    return METER(cfg).train()


def tiny_batch(batch=4, length=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = torch.where(torch.rand(batch, length, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": torch.where(labels >= 0, torch.full_like(ids, 4), ids), "mlm_labels": labels}


def loss_and_grads(model, batch, saved=None):
    """The vanilla METER step (ITM + MLM, dropout on) under fixed seeds: (loss, {name: grad}, bytes saved)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = vanilla_losses(model, batch, torch.Generator().manual_seed(3))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads, total[0]


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


def test_activation_checkpointing_same_losses_and_gradients(monkeypatch):
    import epic.models.fast_path as fast_path

    model, batch = tiny_meter(dropout=0.1), tiny_batch()
    plain = loss_and_grads(model, batch)
    switched = set_activation_checkpointing(model)
    assert {"METER", "vit_model", "text_transformer"} <= set(switched)
    assert model.grad_checkpointing and model.vit_model.grad_checkpointing
    text = model.text_transformer
    assert getattr(text, "is_activation_checkpointing", None) or text.is_gradient_checkpointing
    calls = []
    original = fast_path.checkpoint
    monkeypatch.setattr(fast_path, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    recomputed = loss_and_grads(model, batch)
    assert calls  # the fusion layers went through torch.utils.checkpoint
    assert_same(recomputed, plain)  # dropout masks replayed: identical up to float reassociation
    assert recomputed[2] < 0.7 * plain[2]  # and far fewer activations are kept for backward
    set_activation_checkpointing(model, False)
    assert not model.grad_checkpointing and not model.vit_model.grad_checkpointing
    with torch.no_grad():  # no recomputation without gradients (e.g. the teacher, evaluation)
        model.infer(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])


def test_compile_fallback_logs_and_runs_eagerly(caplog):
    model, batch = tiny_meter(dropout=0.0), tiny_batch()
    plain = loss_and_grads(model, batch)

    def broken_compiler(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("forced compile failure")
        return compiled

    with caplog.at_level(logging.WARNING, logger="epic.models.fast_path"):
        guards = compile_parts(model.compile_parts(), compiler=broken_compiler)
        again = loss_and_grads(model, batch)
    assert_same(again, plain, rtol=0, atol=0)
    assert all(g.status == "eager (RuntimeError)" for g in guards.values())
    assert "vit_model did not compile (RuntimeError: forced compile failure)" in caplog.text
    assert "vit_model: eager (RuntimeError)" in compile_report(guards)
    with pytest.raises(Exception):  # an error of the call itself is not swallowed by the fallback
        model.vit_model(torch.randn(1, 3, 16, 16))


def test_compile_gives_the_same_losses_and_gradients():
    """Real torch.compile (AOTAutograd with the eager backend: the graph capture without CPU code generation)."""
    import torch._dynamo

    torch._dynamo.reset()
    model, batch = tiny_meter(dropout=0.0), tiny_batch()
    plain = loss_and_grads(model, batch)
    parts = model.compile_parts()
    guards = compile_parts({k: v for k, v in parts.items() if k != "text_transformer"}, backend="aot_eager")
    compiled = loss_and_grads(model, batch)
    assert all(g.status == "compiled" for g in guards.values()), compile_report(guards)
    assert_same(compiled, plain)
    set_activation_checkpointing(model)  # both switches: the compiled layers are recomputed inside checkpoint
    both = loss_and_grads(model, batch)
    assert all(g.status == "compiled" for g in guards.values()), compile_report(guards)
    assert_same(both, plain)
    assert set(dict(model.named_parameters())) == set(dict(tiny_meter().named_parameters()))  # names unchanged


# ---------------------------------------------------------------------------------------------------- AdamW
def hand_adamw(params, grads_per_step, lr, betas, eps, weight_decay):
    """AdamW (Loshchilov & Hutter, decoupled weight decay), written out."""
    b1, b2 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            p.mul_(1 - lr * weight_decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return params


@pytest.mark.parametrize("impl", ["for_loop", "foreach", "fused"])
def test_every_adamw_kernel_gives_the_hand_update(impl):
    from epic.engine.setup import adamw_kernel_options

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01,
                            **adamw_kernel_options(impl))
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
    expected = hand_adamw(start, grads, 1e-2, (0.9, 0.98), 1e-8, 0.01)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_adamw_kernel_selection():
    from epic.engine.setup import SetupError, adamw_kernel_options, build_optimizer

    assert adamw_kernel_options("auto", on_cuda=True) == {"fused": True}
    assert adamw_kernel_options("auto", on_cuda=False) == {"foreach": True}
    assert adamw_kernel_options("for_loop") == {"foreach": False, "fused": False}
    with pytest.raises(SetupError, match="optimizer_impl"):
        adamw_kernel_options("apex")
    model = tiny_meter()
    opt = build_optimizer(model, 1e-4, 0.01, (0.9, 0.98), 1e-8, impl="fused")
    assert all(group["fused"] for group in opt.param_groups)
    assert math.isclose(opt.param_groups[0]["lr"], 1e-4)
    copy.deepcopy(opt.state_dict())


def test_the_loader_pins_memory_and_prefetches_on_cuda(shapes_world, monkeypatch):
    from epic.config import load_config
    from epic.data import load_tokenizer
    from epic.engine.build import build_train_data, resolve_data_paths

    cfg = load_config("shapes_tiny", [f"data.root={shapes_world}", "data.num_workers=1"])
    paths = resolve_data_paths(cfg)
    tokenizer = load_tokenizer(paths.tokenizer)
    assert not build_train_data(cfg, paths, tokenizer, 0, 1).pin_memory  # CPU: nothing to pin for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loader = build_train_data(cfg, paths, tokenizer, 0, 1)
    assert loader.pin_memory and loader.prefetch_factor == 4
