"""Word-patch alignment (IPOT optimal transport) against small transport plans computed independently."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from epic.objectives.wpa import (cosine_cost, ipot_plan, wpa_distance, wpa_loss, wpa_valid_masks,
                                 word_patch_alignment_loss)


def numpy_ipot(cost: np.ndarray, beta: float, iterations: int) -> np.ndarray:
    """IPOT (Xie et al. 2019, Alg. 1) written out entry by entry, one Sinkhorn step per proximal step, with the
    image (column) scaling updated first from the text (row) scaling, which starts uniform."""
    m, n = cost.shape
    kernel = [[np.exp(-cost[i][j] / beta) for j in range(n)] for i in range(m)]
    plan = [[1.0] * n for _ in range(m)]
    row = [1.0 / m] * m
    for _ in range(iterations):
        q = [[kernel[i][j] * plan[i][j] for j in range(n)] for i in range(m)]
        col = [(1.0 / n) / sum(q[i][j] * row[i] for i in range(m)) for j in range(n)]
        row = [(1.0 / m) / sum(q[i][j] * col[j] for j in range(n)) for i in range(m)]
        plan = [[row[i] * q[i][j] * col[j] for j in range(n)] for i in range(m)]
    return np.array(plan)


def test_ipot_matches_hand_computed_plan_3x2():
    cost = np.array([[0.1, 0.9], [0.7, 0.2], [0.4, 0.5]])
    ours = ipot_plan(torch.tensor(cost)[None], torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
    expected = numpy_ipot(cost, 0.5, 50)
    np.testing.assert_allclose(ours[0].numpy(), expected, rtol=1e-10, atol=1e-12)
    # a plan between the uniform marginals (1/3 per word after the last text step, ~1/2 per patch)
    np.testing.assert_allclose(expected.sum(1), [1 / 3] * 3, atol=1e-12)
    np.testing.assert_allclose(expected.sum(0), [0.5, 0.5], atol=1e-3)
    # IPOT converges to the exact OT plan; here by hand: word 0 -> patch 0, word 1 -> patch 1, word 2 splits so
    # that each patch gets 1/2 (0.4 - 0.5 = 0.1 - 0.2: the split is free; the total cost is fixed)
    exact = (1 / 3) * 0.1 + (1 / 3) * 0.2 + (1 / 6) * 0.4 + (1 / 6) * 0.5
    assert abs((expected * cost).sum() - exact) < 5e-3


def test_ipot_closed_forms_2x2():
    # constant cost: the plan is the product of the marginals, 1/4 everywhere, from the first iteration
    flat = ipot_plan(torch.full((1, 2, 2), 0.3, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool),
                     torch.ones(1, 2, dtype=torch.bool))
    assert torch.allclose(flat, torch.full((1, 2, 2), 0.25, dtype=torch.float64), atol=1e-14)
    # words that equal the patches: the optimal plan is diagonal and the distance 0
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    ones = torch.ones(1, 2, dtype=torch.bool)
    plan = ipot_plan(cosine_cost(text, text), ones, ones)
    assert torch.allclose(plan, torch.tensor([[[0.5, 0.0], [0.0, 0.5]]]), atol=1e-4)
    assert wpa_distance(text, text, ones, ones).item() < 1e-4


def test_padding_is_ignored():
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(1, 5, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    text_valid = torch.tensor([[True, True, False, True, False]])
    image_valid = torch.tensor([[True, False, True, True]])
    full = wpa_distance(text, image, text_valid, image_valid)
    trimmed = wpa_distance(text[:, [0, 1, 3]], image[:, [0, 2, 3]], torch.ones(1, 3, dtype=torch.bool),
                           torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(full, trimmed, atol=1e-6)
    plan = ipot_plan(cosine_cost(text, image), text_valid, image_valid)
    assert plan[0, 2].abs().sum() == 0 and plan[0, :, 1].abs().sum() == 0


def test_vilt_token_sets_and_loss():
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    images = torch.ones(2, 3, dtype=torch.long)
    text_valid, image_valid = wpa_valid_masks(attention, images)
    assert text_valid.tolist() == [[False, True, True, False, False], [False, True, True, True, False]]
    assert image_valid.tolist() == [[False, True, True]] * 2
    distance = torch.tensor([0.2, 0.5, 0.7, 0.1])
    labels = torch.tensor([1, 0, 0, 1])
    assert torch.isclose(wpa_loss(distance, labels), torch.tensor(0.1 * ((0.2 + 0.1) - (0.5 + 0.7)) / 4))
    with pytest.raises(ValueError, match="at least one word"):
        wpa_valid_masks(torch.tensor([[1, 1, 0]]), images[:1])


def test_gradient_flows_through_the_cost_only_in_fp32():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 6, 8, generator=g).bfloat16().requires_grad_()
    image = torch.randn(2, 5, 8, generator=g).bfloat16().requires_grad_()
    attention = torch.ones(2, 6, dtype=torch.long)
    images = torch.ones(2, 5, dtype=torch.long)
    loss = word_patch_alignment_loss(text, image, attention, images, torch.tensor([1, 0]))
    assert loss.dtype == torch.float32
    loss.backward()
    # autograd reference: the same distance with the plan held fixed
    t, i = text.detach().float().requires_grad_(), image.detach().float().requires_grad_()
    tv, iv = wpa_valid_masks(attention, images)
    cost = cosine_cost(t, i).masked_fill(~(tv.unsqueeze(2) & iv.unsqueeze(1)), 0.0)
    plan = ipot_plan(cost.detach(), tv, iv)
    distance = (cost * plan).sum(dim=(1, 2))
    (0.1 * (distance[0] - distance[1]) / 2).backward()
    assert torch.allclose(text.grad.float(), t.grad, rtol=2e-2, atol=1e-4)
    assert torch.allclose(image.grad.float(), i.grad, rtol=2e-2, atol=1e-4)
