"""Streaming vocabulary sampling + cross-entropy (EPIC Eq. 4, 5, 7): loss and gradients vs a float64 formula,
Triton (interpreter) vs the PyTorch reference, excluded ids, sample distribution vs softmax (chi-square, fixed
seeds), odd shapes (V not a multiple of the tile, M = 0)."""
import os

import torch

# CPU: Triton's interpreter, set before anything imports triton (see epic.kernels.testing)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from epic.kernels import vocab_sample_and_loss  # noqa: E402
from epic.kernels.testing import enable_triton_path, run_triton_cases_in_fresh_process  # noqa: E402
from epic.kernels.vocab_sample import vocab_sample_and_loss_eager, vocab_sample_and_loss_reference  # noqa: E402

CHI2_MIN_P = 1e-3
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture
def triton_path(monkeypatch):
    enable_triton_path(monkeypatch)


def test_triton_cases_in_fresh_process():
    run_triton_cases_in_fresh_process(__file__)


def make_inputs(rows=9, dim=16, vocab=37, dtype=torch.float32, with_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen).to(dtype)
    embedding = torch.randn(vocab, dim, generator=gen).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    # targets in every vocabulary tile of width 10, the last (partial) tile included, and one ignored row
    targets = torch.tensor([0, 9, 10, 19, 25, 30, 36, -100, 33][:rows])
    return hidden, embedding, bias, targets


def float64_loss(hidden, embedding, bias, targets):
    """Eq. 4 and 7 in float64: -log softmax(E h + b)[target], averaged over rows with a target."""
    logits = hidden @ embedding.t() + (bias if bias is not None else 0.0)
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    keep = targets != -100
    return -log_probs[keep, targets[keep]].mean()


def leaves(*tensors):
    return [t.clone().requires_grad_() if t is not None else None for t in tensors]


def grads(loss, inputs):
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, present)


@pytest.mark.parametrize("with_bias", [True, False])
def test_streaming_reference_matches_float64_formula_and_gradients(with_bias):
    hidden, embedding, bias, targets = make_inputs(with_bias=with_bias)
    inputs = leaves(hidden, embedding, bias)
    params = leaves(*[t.double() if t is not None else None for t in (hidden, embedding, bias)])
    _, loss = vocab_sample_and_loss_reference(*inputs, targets, vocab_tile=10)
    expected = float64_loss(*params, targets)
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(loss, inputs), grads(expected, params)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_eager_baseline_matches_float64_formula():
    hidden, embedding, bias, targets = make_inputs()
    _, loss = vocab_sample_and_loss_eager(hidden, embedding, bias, targets)
    torch.testing.assert_close(loss.double(), float64_loss(hidden.double(), embedding.double(), bias.double(),
                                                          targets), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference(triton_path, dtype):
    hidden, embedding, bias, targets = make_inputs(dtype=dtype)
    ref_inputs, tri_inputs = leaves(hidden, embedding, bias), leaves(hidden, embedding, bias)
    ref_samples, ref_loss = vocab_sample_and_loss_reference(*ref_inputs, targets, vocab_tile=10)
    samples, loss = vocab_sample_and_loss(*tri_inputs, targets, vocab_tile=10)
    assert samples.dtype == torch.int64 and samples.shape == (9,) and not samples.requires_grad
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    grad_output = torch.tensor(3.0)  # e.g. a loss scale: applied before the fp16 cast
    for got, want, inp in zip(torch.autograd.grad(loss, tri_inputs, grad_output),
                              torch.autograd.grad(ref_loss, ref_inputs, grad_output), tri_inputs):
        assert got.dtype == dtype and got.shape == inp.shape
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_triton_gradients_without_bias_match_float64_autograd(triton_path):
    hidden, embedding, _, targets = make_inputs(with_bias=False, seed=1)
    inputs = leaves(hidden, embedding)
    params = leaves(hidden.double(), embedding.double())
    _, loss = vocab_sample_and_loss(*inputs, None, targets, vocab_tile=7)
    expected = float64_loss(*params, None, targets)
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(loss, inputs), grads(expected, params)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def check_cold_sampling_is_the_allowed_argmax(fn):
    """At a tiny temperature the Gumbel-max sample is the argmax over allowed ids, across tile boundaries."""
    hidden, embedding, bias, _ = make_inputs(rows=32, seed=2)
    excluded = [0, 1, 2, 36]
    logits = hidden @ embedding.t() + bias
    logits[:, excluded] = float("-inf")
    samples, loss = fn(hidden, embedding, bias, None, excluded, None, 1e-6, vocab_tile=10)
    assert loss is None
    assert torch.equal(samples, logits.argmax(dim=1))


def test_reference_cold_sampling_is_the_allowed_argmax():
    check_cold_sampling_is_the_allowed_argmax(vocab_sample_and_loss_reference)


def test_triton_cold_sampling_is_the_allowed_argmax(triton_path):
    check_cold_sampling_is_the_allowed_argmax(vocab_sample_and_loss)


def check_never_samples_excluded_ids(fn, rows):
    hidden, embedding, bias, targets = make_inputs(rows=rows, vocab=20, seed=3)
    excluded = torch.tensor([0, 1, 2, 19])
    bias = bias.index_fill(0, excluded, 10.0)  # the excluded ids hold almost all the probability mass
    samples, loss = fn(hidden, embedding, bias, None, excluded.tolist(), torch.Generator().manual_seed(0),
                       vocab_tile=8)
    assert samples.shape == (rows,) and ((samples >= 0) & (samples < 20)).all()
    assert not torch.isin(samples, excluded).any()


def test_reference_never_samples_excluded_ids():
    check_never_samples_excluded_ids(vocab_sample_and_loss_reference, rows=2000)


def test_triton_never_samples_excluded_ids(triton_path):
    check_never_samples_excluded_ids(vocab_sample_and_loss, rows=64)


def check_sample_frequencies_match_softmax(fn, rows, temperature, vocab_tile, seed):
    gen = torch.Generator().manual_seed(100)
    vocab, excluded = 7, [3]
    hidden = torch.randn(1, 4, generator=gen).expand(rows, 4).contiguous()
    embedding = torch.randn(vocab, 4, generator=gen)
    bias = torch.randn(vocab, generator=gen) * 0.5
    samples, _ = fn(hidden, embedding, bias, None, excluded, torch.Generator().manual_seed(seed), temperature,
                    vocab_tile=vocab_tile)
    logits = (hidden[0] @ embedding.t() + bias) / temperature
    logits[excluded] = float("-inf")
    probs = torch.softmax(logits.double(), dim=0)
    allowed = [v for v in range(vocab) if v not in excluded]
    observed = torch.bincount(samples, minlength=vocab)
    assert observed[excluded].sum() == 0
    expected = (probs[allowed] * rows).tolist()
    assert min(expected) >= 5  # chi-square validity
    assert stats.chisquare(observed[allowed].tolist(), expected).pvalue > CHI2_MIN_P, (observed, expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reference_sample_frequencies_match_softmax(temperature):
    check_sample_frequencies_match_softmax(vocab_sample_and_loss_reference, 20000, temperature, vocab_tile=3, seed=0)


def test_triton_sample_frequencies_match_softmax(triton_path):
    # the interpreter runs ~12 ms per row and tile: 300 rows, 2 tiles, temperature 2
    check_sample_frequencies_match_softmax(vocab_sample_and_loss, 300, 2.0, vocab_tile=4, seed=0)


def check_empty_rows(fn):
    hidden, embedding, bias, targets = make_inputs()
    inputs = leaves(hidden[:0], embedding, bias)
    samples, loss = fn(*inputs, targets[:0])
    assert samples.shape == (0,) and samples.dtype == torch.int64
    assert loss.item() == 0.0 and loss.requires_grad
    for grad in grads(loss, inputs):
        assert torch.count_nonzero(grad) == 0


def test_reference_empty_rows_give_empty_samples_and_a_zero_loss():
    check_empty_rows(vocab_sample_and_loss_reference)


def test_triton_empty_rows_give_empty_samples_and_a_zero_loss(triton_path):
    check_empty_rows(vocab_sample_and_loss)


def check_seeded_sampling(fn):
    hidden, embedding, bias, targets = make_inputs()
    first, _ = fn(hidden, embedding, bias, noise_seed=7, vocab_tile=10)
    again, _ = fn(hidden, embedding, bias, noise_seed=7, vocab_tile=10)
    from_gen, _ = fn(hidden, embedding, bias, generator=torch.Generator().manual_seed(5), vocab_tile=10)
    from_gen_again, _ = fn(hidden, embedding, bias, generator=torch.Generator().manual_seed(5), vocab_tile=10)
    assert torch.equal(first, again) and torch.equal(from_gen, from_gen_again)
    others = [fn(hidden, embedding, bias, noise_seed=seed, vocab_tile=10)[0] for seed in (8, 9)]
    assert not all(torch.equal(first, other) for other in others)
    none, loss = fn(hidden, embedding, bias, targets, sample=False, vocab_tile=10)
    assert none is None and torch.isfinite(loss)


def test_reference_sampling_is_reproducible_and_optional():
    check_seeded_sampling(vocab_sample_and_loss_reference)


def test_triton_sampling_is_reproducible_and_optional(triton_path):
    check_seeded_sampling(vocab_sample_and_loss)


@pytest.mark.parametrize("change, message", [
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 37])), "targets"),
    (dict(targets=torch.zeros(9)), "targets"),
    (dict(exclude_ids=list(range(37))), "whole vocabulary"),
    (dict(exclude_ids=[40]), "exclude_ids"),
    (dict(embedding=torch.zeros(37, 16, dtype=torch.float64)), "dtype"),
    (dict(bias=torch.zeros(36)), "bias"),
    (dict(temperature=0.0), "temperature"),
    (dict(hidden=torch.zeros(2, 3, 16)), "hidden"),
])
def test_bad_inputs_are_refused_with_a_clear_error(change, message):
    hidden, embedding, bias, targets = make_inputs()
    args = dict(hidden=hidden, embedding=embedding, bias=bias, targets=targets) | change
    with pytest.raises(ValueError, match=message):
        vocab_sample_and_loss(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_fused_matches_reference(monkeypatch, dtype):
    monkeypatch.delenv("EPIC_KERNELS", raising=False)
    gen = torch.Generator().manual_seed(0)
    rows, dim, vocab = 300, 64, 5003
    hidden = torch.randn(rows, dim, generator=gen).to(dtype).cuda()
    embedding = (torch.randn(vocab, dim, generator=gen) * 0.1).to(dtype).cuda()
    bias = torch.randn(vocab, generator=gen).to(dtype).cuda()
    targets = torch.randint(0, vocab, (rows,), generator=gen).cuda()
    targets[::7] = -100
    ref_inputs, fused_inputs = leaves(hidden, embedding, bias), leaves(hidden, embedding, bias)
    _, ref_loss = vocab_sample_and_loss_reference(*ref_inputs, targets, vocab_tile=1000)
    samples, loss = vocab_sample_and_loss(*fused_inputs, targets, exclude_ids=[0, 1, 2], vocab_tile=1000)
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    scale = 1024.0 if dtype == torch.float16 else 1.0  # fp16: a loss scale, as DeepSpeed applies
    for got, want in zip(torch.autograd.grad(loss * scale, fused_inputs),
                         torch.autograd.grad(ref_loss * scale, ref_inputs)):
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    assert ((samples >= 3) & (samples < vocab)).all()
    cold, _ = vocab_sample_and_loss(hidden, embedding, bias, None, [0, 1, 2], None, 1e-6, vocab_tile=1000)
    logits = (hidden.float() @ embedding.float().t() + bias.float())
    logits[:, :3] = float("-inf")
    assert (cold == logits.argmax(1)).float().mean() > 0.99  # fp16 logits may tie/round differently on a few rows
