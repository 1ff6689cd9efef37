"""Saliency (EPIC Eq. 8) + categorical masking without replacement: alpha vs a float64 hand computation, exact m,
masking invariants, Triton (interpreter) vs reference on the same noise, and subset frequencies vs the exact
Plackett-Luce probabilities (chi-square, fixed seeds)."""
import os

import torch

# CPU: Triton's interpreter, set before anything imports triton (see epic.kernels.testing)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import math  # noqa: E402
from fractions import Fraction  # noqa: E402

import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from epic.kernels import saliency_mask  # noqa: E402
from epic.kernels.saliency_mask import num_positions_to_mask, saliency_mask_reference  # noqa: E402
from epic.kernels.testing import enable_triton_path, run_triton_cases_in_fresh_process  # noqa: E402

CHI2_MIN_P = 1e-3


@pytest.fixture
def triton_path(monkeypatch):
    enable_triton_path(monkeypatch)


def test_triton_cases_in_fresh_process():
    run_triton_cases_in_fresh_process(__file__)


def make_inputs(lengths=(0, 1, 5, 13, 9), num_heads=3, seq_len=13, head_dim=10, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    query = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    keys = torch.randn(batch, seq_len, num_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)  # strided
    valid = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    valid[-1, 0] = False  # a hole (e.g. a special token) inside the last sentence
    noise = torch.rand(batch, seq_len, generator=gen)
    return query, keys, valid, noise


def float64_alpha(query, keys, valid):
    """Eq. 8 by hand: per sentence, mean over heads of q_k . K_k[j], softmax over the valid j only."""
    batch, num_heads, seq_len, _ = keys.shape
    alpha = torch.zeros(batch, seq_len, dtype=torch.float64)
    for b in range(batch):
        idx = valid[b].nonzero().flatten().tolist()
        if not idx:
            continue
        scores = [sum(float(query[b, k].double() @ keys[b, k, j].double()) for k in range(num_heads)) / num_heads
                  for j in idx]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        for j, w in zip(idx, weights):
            alpha[b, j] = w / sum(weights)
    return alpha


@pytest.mark.parametrize("ratio, length", [(0.35, 20), (0.55, 100), (0.3, 50), (0.15, 100), (0.6, 25), (0.15, 20),
                                           (0.35, 40), (0.3, 10), (0.45, 20), (0.7, 10), (0.6, 5), (0.15, 1),
                                           (1.0, 7), (0.0, 9), (0.35, 0)])
def test_num_positions_is_the_exact_ceil(ratio, length):
    expected = math.ceil(Fraction(str(ratio)) * length)  # decimal ratio, exact rational ceil
    assert int(num_positions_to_mask(torch.tensor([length]), ratio)) == expected
    assert expected <= length


def test_float_ceil_would_be_wrong_here():
    # why the rational ceil: float64 gives 0.55 * 100 = 55.00000000000001 (ceil 56), and torch's default float32
    # gives 0.3 * 50 = 15.000001 (ceil 16) -- 50 being METER's max text length
    assert math.ceil(0.55 * 100) == 56 and int(num_positions_to_mask(torch.tensor([100]), 0.55)) == 55
    assert int(torch.ceil(torch.tensor([50]) * 0.3)) == 16 and int(num_positions_to_mask(torch.tensor([50]), 0.3)) == 15


def test_reference_alpha_matches_float64_hand_computation():
    query, keys, valid, noise = make_inputs()
    mask, alpha = saliency_mask_reference(query, keys, valid, 0.35, noise=noise)
    torch.testing.assert_close(alpha.double(), float64_alpha(query, keys, valid), atol=1e-6, rtol=1e-5)
    assert alpha.dtype == torch.float32 and mask.dtype == torch.bool


def check_masking_invariants(fn, ratio, seed):
    query, keys, valid, _ = make_inputs(lengths=(0, 1, 2, 5, 13, 9, 13, 7), seed=seed)
    mask, alpha = fn(query, keys, valid, ratio, generator=torch.Generator().manual_seed(seed))
    expected_m = num_positions_to_mask(valid.sum(1), ratio)
    assert torch.equal(mask.sum(1), expected_m)  # exact count per sentence (a bool mask has no duplicates)
    assert not (mask & ~valid).any()  # never an invalid position
    assert torch.isfinite(alpha).all() and not alpha[~valid].any()
    torch.testing.assert_close(alpha.sum(1), valid.any(1).float())  # sums to 1, or 0 for an empty sentence
    again, _ = fn(query, keys, valid, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again)  # reproducible from the generator


@pytest.mark.parametrize("ratio", [0.35, 0.5, 1.0, 0.0])
def test_reference_masking_invariants(ratio):
    check_masking_invariants(saliency_mask_reference, ratio, seed=1)


@pytest.mark.parametrize("ratio", [0.35, 1.0])
def test_triton_masking_invariants(triton_path, ratio):
    check_masking_invariants(saliency_mask, ratio, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_on_the_same_noise(triton_path, dtype):
    # n = 13 and dh = 10 are not powers of two; keys are a strided view; fp16 teacher states
    query, keys, valid, noise = make_inputs(dtype=dtype, seed=4)
    mask, alpha = saliency_mask(query, keys, valid, 0.35, noise=noise)
    ref_mask, ref_alpha = saliency_mask_reference(query, keys, valid, 0.35, noise=noise)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, ref_mask)


def test_triton_and_reference_agree_on_extreme_noise(triton_path):
    query, keys, valid, _ = make_inputs(seed=5)
    noise = torch.rand(valid.shape, generator=torch.Generator().manual_seed(0))
    noise[:, ::3] = 0.0  # clamped to the smallest normal float: a finite Gumbel value, never -inf
    noise[:, 1::3] = 1.0
    mask, _ = saliency_mask(query, keys, valid, 0.5, noise=noise)
    ref_mask, _ = saliency_mask_reference(query, keys, valid, 0.5, noise=noise)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(mask.sum(1), num_positions_to_mask(valid.sum(1), 0.5)) and not (mask & ~valid).any()


# ---- distribution: subsets drawn vs the exact Plackett-Luce probabilities ----------------------------------------
ALPHA = [0.4, 0.3, 0.2, 0.1]  # four valid tokens, then one padding position
RATIO = 0.5  # m = 2


def plackett_luce_subset_probabilities(alpha, m):
    """P(subset) for m draws without replacement, summing the probabilities of its orderings."""
    probs = {}
    for order in itertools.permutations(range(len(alpha)), m):
        p, left = 1.0, 1.0
        for i in order:
            p *= alpha[i] / left
            left -= alpha[i]
        key = tuple(sorted(order))
        probs[key] = probs.get(key, 0.0) + p
    return probs


def saliency_inputs_for(alpha, rows):
    """Queries/keys whose Eq. 8 alpha is ``alpha`` (keys = identity per head, queries +/- delta around log alpha,
    so the head mean matters), plus one padding position."""
    n = len(alpha) + 1
    scores = torch.tensor([math.log(a) for a in alpha] + [5.0])  # padding gets a large score: must be ignored
    delta = torch.linspace(-1.0, 1.0, n)
    query = torch.stack([scores + delta, scores - delta])[None].expand(rows, 2, n)
    keys = torch.eye(n)[None, None].expand(rows, 2, n, n)
    valid = torch.tensor([True] * len(alpha) + [False])[None].expand(rows, n)
    return query.contiguous(), keys.contiguous(), valid.contiguous()


def check_subset_frequencies(fn, rows, seed):
    query, keys, valid = saliency_inputs_for(ALPHA, rows)
    mask, alpha = fn(query, keys, valid, RATIO, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(alpha[0], torch.tensor(ALPHA + [0.0]))
    probs = plackett_luce_subset_probabilities(ALPHA, 2)
    subsets = sorted(probs)
    picked = [tuple(row.nonzero().flatten().tolist()) for row in mask]
    observed = [sum(p == s for p in picked) for s in subsets]
    assert sum(observed) == rows  # every row picked one of the 2-subsets of the valid tokens
    expected = [probs[s] * rows for s in subsets]
    assert min(expected) >= 5  # chi-square validity
    assert stats.chisquare(observed, expected).pvalue > CHI2_MIN_P, (observed, expected)


def test_reference_subset_frequencies_match_plackett_luce():
    check_subset_frequencies(saliency_mask_reference, rows=20000, seed=0)


def test_triton_subset_frequencies_match_plackett_luce(triton_path):
    # the interpreter runs ~30 ms per sentence: fewer rows, still every expected count >= 5
    check_subset_frequencies(saliency_mask, rows=160, seed=0)


def test_noise_on_probabilities_would_fail_the_frequency_test():
    """The chi-square test has power: top-k of alpha + Gumbel (noise on probabilities, a known bug) is rejected."""
    rows = 20000
    gen = torch.Generator().manual_seed(0)
    alpha = torch.tensor(ALPHA)[None].expand(rows, 4)
    u = torch.rand(rows, 4, generator=gen)
    wrong = torch.topk(alpha - torch.log(-torch.log(u)), 2, dim=1).indices.sort(dim=1).values
    probs = plackett_luce_subset_probabilities(ALPHA, 2)
    subsets = sorted(probs)
    observed = [int(((wrong[:, 0] == a) & (wrong[:, 1] == b)).sum()) for a, b in subsets]
    assert stats.chisquare(observed, [probs[s] * rows for s in subsets]).pvalue < CHI2_MIN_P


@pytest.mark.parametrize("bad, message", [
    (dict(ratio=1.5), "ratio"),
    (dict(valid=torch.ones(5, 13, dtype=torch.long)), "valid"),
    (dict(query=torch.zeros(5, 2, 10)), "query"),
    (dict(noise=torch.rand(5, 12)), "noise"),
])
def test_bad_inputs_are_refused_with_a_clear_error(bad, message):
    query, keys, valid, _ = make_inputs()
    args = dict(query=query, keys=keys, valid=valid, ratio=0.35) | bad
    with pytest.raises(ValueError, match=message):
        saliency_mask(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_cuda_fused_matches_reference_and_keeps_the_invariants(monkeypatch):
    monkeypatch.delenv("EPIC_KERNELS", raising=False)
    lengths = [0, 1, 7, 20, 48, 50] * 4
    query, keys, valid, noise = (t.cuda() for t in make_inputs(lengths, num_heads=12, seq_len=50, head_dim=64,
                                                                dtype=torch.float16))
    mask, alpha = saliency_mask(query, keys, valid, 0.35, noise=noise)
    ref_mask, ref_alpha = saliency_mask_reference(query, keys, valid, 0.35, noise=noise)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-5, rtol=1e-4)
    assert torch.equal(mask, ref_mask)
    drawn, _ = saliency_mask(query, keys, valid, 0.35)  # Philox noise on the device
    assert torch.equal(drawn.sum(1), num_positions_to_mask(valid.sum(1), 0.35)) and not (drawn & ~valid).any()
