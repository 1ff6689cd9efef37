"""Token-consistency loss (EPIC Eq. 1-2): reference vs an independent float64 formula, Triton (interpreter) vs
reference for outputs and gradients, and the dispatch rules."""
import math
import os

import torch

# CPU: Triton's interpreter, set before anything imports triton (see epic.kernels.testing)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from epic.kernels import token_consistency_loss  # noqa: E402
from epic.kernels.dispatch import use_triton  # noqa: E402
from epic.kernels.testing import enable_triton_path, run_triton_cases_in_fresh_process  # noqa: E402
from epic.kernels.token_consistency import token_consistency_loss_reference  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture
def triton_path(monkeypatch):
    enable_triton_path(monkeypatch)


def test_triton_cases_in_fresh_process():
    run_triton_cases_in_fresh_process(__file__)


def make_inputs(batch=3, length=7, dim=37, dtype=torch.float32, seed=0, bias_shape=()):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen).to(dtype)
    weight = (torch.randn(dim, generator=gen) / dim**0.5).to(dtype)
    bias = torch.randn(bias_shape, generator=gen).to(dtype)
    labels = torch.randint(0, 2, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    return hidden, weight, bias, labels, mask


def float64_loss(hidden, weight, bias, labels, mask, reduction):
    """Eq. 1-2 written out in float64: D = sigmoid(beta^T h + b); -log D on consistent, -log(1 - D) on the rest."""
    z = (hidden.double() * weight.double()).sum(-1) + bias.double().sum()
    d = 1.0 / (1.0 + torch.exp(-z))
    y = labels.double()
    per_token = -(y * torch.log(d) + (1.0 - y) * torch.log(1.0 - d)) * mask.double()
    if reduction == "none":
        return per_token, z
    if reduction == "sum":
        return per_token.sum(), z
    if reduction == "pair_sum":  # Eq. 2 per pair (sum over its tokens), then the mean over pairs with tokens
        rows = mask.any(dim=1)
        return per_token.sum(dim=1)[rows].mean(), z
    return per_token.sum() / mask.sum(), z


def grads_of(loss, inputs, grad_output):
    return torch.autograd.grad(loss, inputs, grad_output)


@pytest.mark.parametrize("reduction", ["mean", "pair_sum", "sum", "none"])
def test_reference_matches_float64_formula_and_its_gradients(reduction):
    hidden, weight, bias, labels, mask = make_inputs()
    params = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    expected, expected_logits = float64_loss(*params, labels, mask, reduction)
    inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, logits = token_consistency_loss_reference(*inputs, labels, mask, reduction)
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.double(), expected_logits.detach(), atol=1e-5, rtol=1e-5)
    assert not logits.requires_grad and logits.dtype == torch.float32
    grad_output = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    for got, want in zip(grads_of(loss, inputs, grad_output.float()), grads_of(expected, params, grad_output)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "pair_sum", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference(triton_path, dtype, reduction):
    # odd shapes: n = 7 (not a power of two), d = 300 (> one 256-wide block, not a multiple), B*n = 21 tokens
    hidden, weight, bias, labels, mask = make_inputs(batch=3, length=7, dim=300, dtype=dtype, bias_shape=(1,))
    ref_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    tri_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref_loss, ref_logits = token_consistency_loss_reference(*ref_inputs, labels, mask, reduction)
    loss, logits = token_consistency_loss(*tri_inputs, labels, mask, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(logits, ref_logits, **TOL[dtype])
    grad_output = torch.rand(loss.shape) + 0.5
    for got, want, inp in zip(grads_of(loss, tri_inputs, grad_output), grads_of(ref_loss, ref_inputs, grad_output),
                              tri_inputs):
        assert got.dtype == dtype and got.shape == inp.shape
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_triton_gradients_match_float64_autograd(triton_path):
    hidden, weight, bias, labels, mask = make_inputs(batch=2, length=5, dim=19, seed=3)
    labels = labels.float() * 0.8 + 0.1  # soft labels are allowed
    padded = torch.nn.functional.pad(hidden, (0, 3)).requires_grad_()  # hidden as a strided view (row stride 22)
    weight_in, bias_in = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    params = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    loss, _ = token_consistency_loss(padded[..., :19], weight_in, bias_in, labels, mask)
    expected, _ = float64_loss(*params, labels, mask, "mean")
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(loss, (padded, weight_in, bias_in))
    want = torch.autograd.grad(expected, params)
    torch.testing.assert_close(got[0][..., :19].double(), want[0], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(got[0][..., 19:]) == 0
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def hand_case():
    """Two pairs of three tokens, d = 1, beta = 1, b = 0, so z_i = h_i; the second pair has one counted token
    and a third pair none (padding only: it must not count as a pair)."""
    hidden = torch.tensor([[[0.0], [2.0], [-1.0]], [[1.0], [0.0], [0.0]], [[3.0], [3.0], [3.0]]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    weight, bias = torch.ones(1), torch.zeros(())
    sp = lambda x: math.log1p(math.exp(x))  # -log sigmoid(-x) = softplus(x)
    # BCE with logits: consistent (y=1): softplus(-z); inconsistent (y=0): softplus(z)
    pair0 = sp(-0.0) + sp(2.0) + sp(1.0)
    pair1 = sp(1.0)
    return (hidden, weight, bias, labels, mask), {"mean": (pair0 + pair1) / 4, "pair_sum": (pair0 + pair1) / 2,
                                                   "sum": pair0 + pair1}


@pytest.mark.parametrize("reduction", ["mean", "pair_sum", "sum"])
def test_reductions_match_a_hand_computation(reduction):
    inputs, expected = hand_case()
    loss, _ = token_consistency_loss_reference(*inputs, reduction=reduction)
    assert loss.item() == pytest.approx(expected[reduction], rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "pair_sum", "sum"])
def test_triton_reductions_match_a_hand_computation(triton_path, reduction):
    inputs, expected = hand_case()
    hidden = inputs[0].clone().requires_grad_()
    loss, _ = token_consistency_loss(hidden, *inputs[1:], reduction=reduction)
    assert loss.item() == pytest.approx(expected[reduction], rel=1e-6)
    (grad,) = torch.autograd.grad(loss, hidden)
    # dL/dz_i = (sigmoid(z_i) - y_i) / divisor on counted tokens, 0 elsewhere
    divisor = {"mean": 4.0, "pair_sum": 2.0, "sum": 1.0}[reduction]
    z, y, m = inputs[0][..., 0], inputs[3].float(), inputs[4]
    want = torch.where(m, torch.sigmoid(z) - y, torch.zeros_like(z)) / divisor
    torch.testing.assert_close(grad[..., 0], want)


def check_empty_mask(fn):
    hidden, weight, bias, labels, _ = make_inputs()
    inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    loss, logits = fn(*inputs, labels, mask)
    assert loss.item() == 0.0 and loss.requires_grad and torch.isfinite(logits).all()
    for grad in torch.autograd.grad(loss, inputs):
        assert torch.count_nonzero(grad) == 0


def test_reference_empty_mask_gives_zero_loss_with_graph():
    check_empty_mask(token_consistency_loss_reference)


def test_triton_empty_mask_gives_zero_loss_with_graph(triton_path):
    check_empty_mask(token_consistency_loss)


def test_triton_backward_twice_is_refused(triton_path):
    hidden, weight, bias, labels, mask = make_inputs()
    hidden.requires_grad_()
    loss, _ = token_consistency_loss(hidden, weight, bias, labels, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_labels_as_bool_int_or_float_give_the_same_loss():
    hidden, weight, bias, labels, mask = make_inputs()
    losses = [token_consistency_loss(hidden, weight, bias, lab, mask)[0] for lab in
              (labels.bool(), labels.long(), labels.float())]
    assert losses[0] == losses[1] == losses[2]


def test_masked_out_padding_garbage_does_not_leak():
    hidden, weight, bias, labels, mask = make_inputs()
    hidden[~mask] = float("nan")
    hidden.requires_grad_()
    loss, _ = token_consistency_loss(hidden, weight, bias, labels, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad[mask]).all()


@pytest.mark.parametrize("bad, message", [
    (dict(reduction="avg"), "reduction"),
    (dict(weight=torch.zeros(5)), "weight"),
    (dict(bias=torch.zeros(2)), "bias"),
    (dict(labels=torch.zeros(3, 6)), "labels"),
    (dict(mask=torch.ones(3, 7, dtype=torch.long)), "mask"),
])
def test_bad_inputs_are_refused_with_a_clear_error(bad, message):
    hidden, weight, bias, labels, mask = make_inputs()
    args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask, reduction="mean") | bad
    with pytest.raises(ValueError, match=message):
        token_consistency_loss(**args)


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("EPIC_KERNELS", raising=False)
    assert use_triton(cpu) is False  # auto: CPU tensors take the reference
    monkeypatch.setenv("EPIC_KERNELS", "reference")
    assert use_triton(cpu) is False
    monkeypatch.setenv("EPIC_KERNELS", "fast")
    with pytest.raises(ValueError, match="EPIC_KERNELS"):
        use_triton(cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_fused_matches_reference(monkeypatch, dtype):
    monkeypatch.delenv("EPIC_KERNELS", raising=False)
    hidden, weight, bias, labels, mask = [t.cuda() for t in make_inputs(batch=8, length=50, dim=768, dtype=dtype)]
    assert use_triton(hidden)
    ref_inputs, fused_inputs = ([t.clone().requires_grad_() for t in (hidden, weight, bias)] for _ in range(2))
    ref_loss, ref_logits = token_consistency_loss_reference(*ref_inputs, labels, mask)
    loss, logits = token_consistency_loss(*fused_inputs, labels, mask)
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(logits, ref_logits, **TOL[dtype])
    scale = 1024.0 if dtype == torch.float16 else 1.0  # fp16: a loss scale, as DeepSpeed applies
    for got, want in zip(torch.autograd.grad(loss * scale, fused_inputs),
                         torch.autograd.grad(ref_loss * scale, ref_inputs)):
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
