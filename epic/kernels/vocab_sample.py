"""Streaming vocabulary sampling + cross-entropy (EPIC Eq. 4, 5, 7): Triton tile kernels, PyTorch reference, dispatch.

    p_MLM(w | h_i) = softmax_w( e(w)^T h_i + b_w )              (Eq. 4)
    w_bar_i ~ p_MLM(. | h_i), never an excluded (special) id      (Eq. 5)
    L_GEN = mean_i -log p_MLM(w_i | h_i)                          (Eq. 7, a mean over the rows with a target)

The [M, V] logits are never held: the vocabulary is walked in tiles of ``vocab_tile`` ids. Per tile, a GEMM
(cuBLAS through torch) gives the [M, tile] logits and one kernel folds them into per-row running statistics: the
online log-sum-exp (max, sum of exp), the target's logit, and the Gumbel-max sample (best perturbed logit and its
id). Gumbel-max over the whole vocabulary is the max over tiles of each tile's max, so sampling is exact.
The backward walks the tiles again: recompute the tile's logits, turn them in place into
dL/dlogits = grad_output / count * (softmax - onehot(target)), then grad_E[tile] = g^T h, grad_b[tile] = sum_i g,
grad_h += g E[tile]. That is one GEMM more than eager (4 instead of 3) in exchange for O(M * tile) memory, and
grad_output (e.g. a DeepSpeed fp16 loss scale) is applied before g is cast to fp16, as in eager.

The reference path runs the same streaming driver with the per-tile work in PyTorch (memory-lean on CPU too);
:func:`vocab_sample_and_loss_eager` is the plain full-logits version (test oracle and benchmark baseline).

Randomness: the Triton path draws u with Philox, key (seed, row * V + id), seed drawn from ``generator`` (or the
device's default generator) on the device; the reference path draws ``torch.rand`` per tile from ``generator``.
The two streams differ (equal in distribution). ``noise_seed=int`` fixes the samples of either path (Triton: the
Philox seed; reference: a fresh ``torch.Generator`` seeded with it; reference samples then also depend on
``vocab_tile``).
"""
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .dispatch import UNIFORM_MAX, UNIFORM_MIN, draw_seed, gumbel_from_uniform, tl, triton, use_triton

__all__ = ["vocab_sample_and_loss", "vocab_sample_and_loss_reference", "vocab_sample_and_loss_eager",
           "default_vocab_tile"]

_TILE_ELEMENTS = 1 << 23  # default tile: about 8M logits ([M, tile]), 16 MB in fp16


def default_vocab_tile(num_rows: int, vocab_size: int) -> int:
    """Tile width so that [M, tile] holds about 2^23 logits; a multiple of 128 between 128 and V."""
    tile = max(128, (_TILE_ELEMENTS // max(num_rows, 1)) // 128 * 128)
    return max(1, min(tile, vocab_size))


class _StreamState(NamedTuple):
    """Per-row running statistics over the tiles seen so far (all [M])."""

    row_max: torch.Tensor  # fp32, max logit
    row_sumexp: torch.Tensor  # fp32, sum exp(logit - row_max)
    target_logit: torch.Tensor  # fp32, logit of the target id (0 until its tile is seen)
    best_key: torch.Tensor  # fp32, max of logit / T + Gumbel over allowed ids
    best_id: torch.Tensor  # int64, its id

    @classmethod
    def empty(cls, num_rows, device):
        def full(value):
            return torch.full((num_rows,), value, device=device, dtype=torch.float32)

        return cls(full(float("-inf")), full(0.0), full(0.0), full(float("-inf")),
                   torch.full((num_rows,), -1, device=device, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (one program per BLOCK_M rows, walking the tile in [BLOCK_M, BLOCK_V] chunks)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _vocab_tile_forward_kernel(
    logits_ptr, logits_row_stride, num_rows, tile_start, tile_len, vocab_size,
    targets_ptr, allowed_ptr, seed_ptr, inv_temperature, u_min, u_max,
    row_max_ptr, row_sumexp_ptr, target_logit_ptr, best_key_ptr, best_id_ptr,
    SAMPLE: tl.constexpr, HAS_TARGETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    run_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    run_sumexp = tl.load(row_sumexp_ptr + rows, mask=row_ok, other=0.0)
    if HAS_TARGETS:
        target_local = tl.load(targets_ptr + rows, mask=row_ok, other=-1) - tile_start
        target_logit = tl.load(target_logit_ptr + rows, mask=row_ok, other=0.0)
    if SAMPLE:
        seed = tl.load(seed_ptr)
        best_key = tl.load(best_key_ptr + rows, mask=row_ok, other=0.0)
        best_id = tl.load(best_id_ptr + rows, mask=row_ok, other=0)
    for c0 in range(0, tile_len, BLOCK_V):
        idx = c0 + tl.arange(0, BLOCK_V)
        ok = idx < tile_len
        z = tl.load(logits_ptr + rows[:, None] * logits_row_stride + idx[None, :],
                    mask=row_ok[:, None] & ok[None, :], other=float("-inf")).to(tl.float32)
        z = tl.where(row_ok[:, None], z, 0.0)  # rows past the end stay finite (never stored)
        # Online log-sum-exp for the softmax denominator of Eq. 4.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sumexp = run_sumexp * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        if HAS_TARGETS:  # the target's logit, for Eq. 7
            is_target = ok[None, :] & (idx[None, :] == target_local[:, None])
            target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if SAMPLE:  # Eq. 5 by Gumbel-max: argmax_w logit_w / T + g_w over allowed ids, g = -log(-log u)
            vocab_id = tile_start + idx
            u = tl.rand(seed, rows[:, None] * vocab_size + vocab_id[None, :])
            u = tl.minimum(tl.maximum(u, u_min), u_max)
            allowed = ok & (tl.load(allowed_ptr + vocab_id, mask=ok, other=0) != 0)
            key = tl.where(allowed[None, :], z * inv_temperature - tl.log(-tl.log(u)), float("-inf"))
            chunk_best = tl.max(key, axis=1)
            chunk_arg = tl.argmax(key, axis=1)
            better = chunk_best > best_key
            best_id = tl.where(better, (tile_start + c0 + chunk_arg).to(tl.int64), best_id)
            best_key = tl.where(better, chunk_best, best_key)
    tl.store(row_max_ptr + rows, run_max, mask=row_ok)
    tl.store(row_sumexp_ptr + rows, run_sumexp, mask=row_ok)
    if HAS_TARGETS:
        tl.store(target_logit_ptr + rows, target_logit, mask=row_ok)
    if SAMPLE:
        tl.store(best_key_ptr + rows, best_key, mask=row_ok)
        tl.store(best_id_ptr + rows, best_id, mask=row_ok)


@triton.jit
def _vocab_tile_grad_kernel(
    logits_ptr, logits_row_stride, num_rows, tile_start, tile_len, targets_ptr, lse_ptr, row_scale_ptr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """In place: logits[i, j] <- row_scale_i * (softmax_ij - [j == target_i]), the gradient of Eq. 7."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    target_local = tl.load(targets_ptr + rows, mask=row_ok, other=-1) - tile_start
    for c0 in range(0, tile_len, BLOCK_V):
        idx = c0 + tl.arange(0, BLOCK_V)
        tile_ok = row_ok[:, None] & (idx < tile_len)[None, :]
        ptrs = logits_ptr + rows[:, None] * logits_row_stride + idx[None, :]
        z = tl.load(ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        onehot = tl.where(idx[None, :] == target_local[:, None], 1.0, 0.0)
        grad = (tl.exp(z - lse[:, None]) - onehot) * scale[:, None]
        tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=tile_ok)


_BLOCK_M = 4


def _block_v(tile_len):
    return min(triton.next_power_of_2(max(tile_len, 1)), 1024)


def _forward_tile_triton(logits, tile_start, state, targets, allowed, noise, inv_temperature, sample, vocab_size):
    num_rows, tile_len = logits.shape
    _vocab_tile_forward_kernel[(triton.cdiv(num_rows, _BLOCK_M),)](
        logits, logits.stride(0), num_rows, tile_start, tile_len, vocab_size,
        targets if targets is not None else state.best_id, allowed.view(torch.uint8), noise, inv_temperature,
        UNIFORM_MIN, UNIFORM_MAX,
        state.row_max, state.row_sumexp, state.target_logit, state.best_key, state.best_id,
        SAMPLE=sample, HAS_TARGETS=targets is not None, BLOCK_M=_BLOCK_M, BLOCK_V=_block_v(tile_len),
    )


def _grad_tile_triton(logits, tile_start, targets, lse, row_scale):
    num_rows, tile_len = logits.shape
    _vocab_tile_grad_kernel[(triton.cdiv(num_rows, _BLOCK_M),)](
        logits, logits.stride(0), num_rows, tile_start, tile_len, targets, lse, row_scale,
        BLOCK_M=_BLOCK_M, BLOCK_V=_block_v(tile_len))


# ----------------------------------------------------------------------------------------------------------------
# The same per-tile work in PyTorch (reference path)
# ----------------------------------------------------------------------------------------------------------------
def _forward_tile_reference(logits, tile_start, state, targets, allowed, noise, inv_temperature, sample, vocab_size):
    z = logits.float()
    num_rows, tile_len = z.shape
    new_max = torch.maximum(state.row_max, z.max(dim=1).values)
    state.row_sumexp.mul_(torch.exp(state.row_max - new_max)).add_(torch.exp(z - new_max[:, None]).sum(dim=1))
    state.row_max.copy_(new_max)
    if targets is not None:
        local = targets - tile_start
        in_tile = (local >= 0) & (local < tile_len)
        picked = z.gather(1, local.clamp(0, tile_len - 1)[:, None]).squeeze(1)
        state.target_logit.add_(torch.where(in_tile, picked, torch.zeros_like(picked)))
    if sample:
        u = torch.rand((num_rows, tile_len), generator=noise, device=noise.device if noise else z.device)
        key = z * inv_temperature + gumbel_from_uniform(u.to(z.device))
        key = key.masked_fill(~allowed[tile_start:tile_start + tile_len], float("-inf"))
        tile_best, tile_arg = key.max(dim=1)
        better = tile_best > state.best_key
        state.best_id.copy_(torch.where(better, tile_arg + tile_start, state.best_id))
        state.best_key.copy_(torch.where(better, tile_best, state.best_key))


def _grad_tile_reference(logits, tile_start, targets, lse, row_scale):
    num_rows, tile_len = logits.shape
    grad = torch.exp(logits.float() - lse[:, None])
    local = targets - tile_start  # minus the one-hot of the target (no boolean indexing: no host sync on CUDA)
    grad -= (torch.arange(tile_len, device=grad.device) == local[:, None]).to(grad.dtype)
    logits.copy_(grad * row_scale[:, None])


_TILE_OPS = {
    "triton": (_forward_tile_triton, _grad_tile_triton),
    "reference": (_forward_tile_reference, _grad_tile_reference),
}


# ----------------------------------------------------------------------------------------------------------------
# Streaming driver and autograd
# ----------------------------------------------------------------------------------------------------------------
def _tile_logits(hidden, embedding, bias, start, stop):
    """Eq. 4 numerator for one vocabulary tile: e(w)^T h + b_w, [M, stop - start] in the inputs' dtype."""
    if bias is None:
        return hidden @ embedding[start:stop].t()
    return torch.addmm(bias[start:stop], hidden, embedding[start:stop].t())


def _stream_forward(hidden, embedding, bias, targets, allowed, noise, inv_temperature, sample, vocab_tile, backend):
    """One pass over the vocabulary tiles; returns the final per-row state and lse [M] fp32."""
    forward_tile = _TILE_OPS[backend][0]
    vocab_size = embedding.shape[0]
    state = _StreamState.empty(hidden.shape[0], hidden.device)
    for start in range(0, vocab_size, vocab_tile):
        stop = min(start + vocab_tile, vocab_size)
        logits = _tile_logits(hidden, embedding, bias, start, stop)
        forward_tile(logits, start, state, targets, allowed, noise, inv_temperature, sample, vocab_size)
    lse = state.row_max + torch.log(state.row_sumexp)
    return state, lse


class VocabSampleLossFunction(torch.autograd.Function):
    """Streaming sample + mean cross-entropy. Returns (loss fp32 0-d, samples int64 [M] non-differentiable)."""

    @staticmethod
    def forward(ctx, hidden, embedding, bias, targets, allowed, noise, inv_temperature, sample, vocab_tile,
                backend, ignore_index):
        state, lse = _stream_forward(hidden, embedding, bias, targets, allowed, noise, inv_temperature, sample,
                                     vocab_tile, backend)
        counted = targets != ignore_index
        count = counted.sum(dtype=torch.float32).clamp(min=1.0)
        nll = torch.where(counted, lse - state.target_logit, torch.zeros_like(lse))  # Eq. 7 per row
        loss = nll.sum() / count
        ctx.save_for_backward(hidden, embedding, bias, targets, lse, counted, count)
        ctx.vocab_tile, ctx.backend = vocab_tile, backend
        samples = state.best_id if sample else torch.empty(0, dtype=torch.int64, device=hidden.device)
        ctx.mark_non_differentiable(samples)
        return loss, samples

    @staticmethod
    def backward(ctx, grad_loss, grad_samples):
        hidden, embedding, bias, targets, lse, counted, count = ctx.saved_tensors
        need_hidden, need_embedding, need_bias = ctx.needs_input_grad[:3]
        grad_tile_ = _TILE_OPS[ctx.backend][1]
        row_scale = torch.where(counted, grad_loss.float() / count, torch.zeros_like(lse))
        vocab_size = embedding.shape[0]
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_hidden else None
        grad_embedding = torch.empty_like(embedding) if need_embedding else None
        grad_bias = torch.empty(vocab_size, device=bias.device, dtype=torch.float32) if need_bias else None
        for start in range(0, vocab_size, ctx.vocab_tile):
            stop = min(start + ctx.vocab_tile, vocab_size)
            grad_logits = _tile_logits(hidden, embedding, bias, start, stop)
            grad_tile_(grad_logits, start, targets, lse, row_scale)
            if need_embedding:
                torch.mm(grad_logits.t(), hidden, out=grad_embedding[start:stop])
            if need_bias:
                grad_bias[start:stop] = grad_logits.sum(dim=0, dtype=torch.float32)
            if need_hidden:
                if grad_logits.dtype == torch.float32:
                    grad_hidden.addmm_(grad_logits, embedding[start:stop])
                else:
                    grad_hidden += grad_logits @ embedding[start:stop]
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_embedding, grad_bias, None, None, None, None, None, None, None, None


def _run(hidden, embedding, bias, targets, exclude_ids, generator, temperature, ignore_index, sample, noise_seed,
         vocab_tile, backend):
    _check_inputs(hidden, embedding, bias, targets, temperature)
    num_rows, vocab_size = hidden.shape[0], embedding.shape[0]
    device = hidden.device
    allowed = _allowed_ids(exclude_ids, vocab_size, device)
    if targets is not None:
        _check_targets(targets, vocab_size, ignore_index)
        targets = targets.to(torch.int64).contiguous()
    vocab_tile = int(vocab_tile) if vocab_tile else default_vocab_tile(num_rows, vocab_size)
    if vocab_tile < 1:
        raise ValueError(f"vocab_tile must be >= 1, got {vocab_tile}.")
    if num_rows == 0:  # nothing to sample; a zero loss that still backpropagates (zeros)
        samples = torch.empty(0, dtype=torch.int64, device=device) if sample else None
        if targets is None:
            return samples, None
        loss = hidden.sum() * 0.0 + embedding.sum() * 0.0 + (bias.sum() * 0.0 if bias is not None else 0.0)
        return samples, loss.float()
    noise = _noise_source(backend, generator, noise_seed, device) if sample else None
    if noise is None:
        noise = torch.zeros(1, dtype=torch.int64, device=device) if backend == "triton" else None
    if backend == "triton":
        hidden, embedding = _unit_stride(hidden), _unit_stride(embedding)
    inv_temperature = 1.0 / float(temperature)
    if targets is None:
        with torch.no_grad():
            state, _ = _stream_forward(hidden, embedding, bias, None, allowed, noise, inv_temperature, sample,
                                       vocab_tile, backend)
        return (state.best_id if sample else None), None
    loss, samples = VocabSampleLossFunction.apply(hidden, embedding, bias, targets, allowed, noise,
                                                  inv_temperature, sample, vocab_tile, backend, ignore_index)
    return (samples if sample else None), loss


def _noise_source(backend, generator, noise_seed, device):
    """Triton: a Philox seed tensor on the device. Reference: the torch.Generator for torch.rand (None: default)."""
    if backend == "triton":
        if noise_seed is not None:
            return torch.tensor([int(noise_seed)], dtype=torch.int64, device=device)
        return draw_seed(generator, device)
    if noise_seed is not None:
        return torch.Generator(device=device).manual_seed(int(noise_seed))
    return generator


def _unit_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Public op, reference and eager baseline
# ----------------------------------------------------------------------------------------------------------------
def vocab_sample_and_loss(hidden, embedding, bias=None, targets=None, exclude_ids=(), generator=None,
                          temperature=1.0, *, ignore_index=-100, sample=True, noise_seed=None, vocab_tile=None):
    """Sample from the MLM softmax and compute its mean cross-entropy without materialising [M, V] logits.

    Args:
        hidden: [M, d] fp32/fp16/bf16, the (head-transformed) states h_i at the M masked positions.
        embedding: [V, d] decoder weight e(w) (same dtype as hidden). bias: [V] or None.
        targets: [M] int, the original ids w_i; rows equal to ``ignore_index`` (-100) are left out of the mean.
            None: no loss (returns None), sampling only.
        exclude_ids: ids never sampled (special tokens); they still count in the loss's softmax (Eq. 4/7).
        generator: torch.Generator for the sampling noise (see the module docstring for the two paths).
        temperature: samples follow softmax(logits / T); the loss always uses T = 1.
        ignore_index, sample (False: skip sampling, e.g. for the MLM loss), noise_seed, vocab_tile: keyword-only.
    Returns:
        (samples int64 [M] (None when ``sample=False``), loss fp32 0-d (None when ``targets`` is None)).
        Samples carry no gradient. M = 0 gives empty samples and a zero loss whose backward gives zeros.
    """
    backend = "triton" if use_triton(hidden, embedding) else "reference"
    return _run(hidden, embedding, bias, targets, exclude_ids, generator, temperature, ignore_index, sample,
                noise_seed, vocab_tile, backend)


def vocab_sample_and_loss_reference(hidden, embedding, bias=None, targets=None, exclude_ids=(), generator=None,
                                    temperature=1.0, *, ignore_index=-100, sample=True, noise_seed=None,
                                    vocab_tile=None):
    """The streaming op with the per-tile work in PyTorch (any device). Same contract as the public op."""
    return _run(hidden, embedding, bias, targets, exclude_ids, generator, temperature, ignore_index, sample,
                noise_seed, vocab_tile, "reference")


def vocab_sample_and_loss_eager(hidden, embedding, bias=None, targets=None, exclude_ids=(), generator=None,
                                temperature=1.0, *, ignore_index=-100):
    """Plain eager version holding the full [M, V] logits: linear + cross-entropy + Gumbel-max over all ids."""
    _check_inputs(hidden, embedding, bias, targets, temperature)
    logits = F.linear(hidden, embedding, bias).float()  # Eq. 4 logits
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits, targets, ignore_index=ignore_index) if targets.numel() else logits.sum() * 0
    with torch.no_grad():
        allowed = _allowed_ids(exclude_ids, embedding.shape[0], hidden.device)
        u = torch.rand(logits.shape, generator=generator, device=generator.device if generator else logits.device)
        key = (logits / temperature + gumbel_from_uniform(u.to(logits.device))).masked_fill(~allowed, float("-inf"))
        samples = key.argmax(dim=1)  # Eq. 5
    return samples, loss


def _allowed_ids(exclude_ids, vocab_size, device):
    """[V] bool, False at the excluded ids. From a list of ids: made once per (ids, V, device) and cached, so the
    hot path does not copy the ids to the device (a blocking host-to-device copy) at every call."""
    if not isinstance(exclude_ids, torch.Tensor):
        return _cached_allowed_ids(tuple(int(i) for i in exclude_ids), int(vocab_size), torch.device(device))
    return _make_allowed_ids(exclude_ids, vocab_size, device)


@functools.lru_cache(maxsize=32)
def _cached_allowed_ids(exclude_ids: tuple, vocab_size: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, even if first made under inference mode
        return _make_allowed_ids(list(exclude_ids), vocab_size, device)


def _make_allowed_ids(exclude_ids, vocab_size, device):
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    excluded = torch.as_tensor(exclude_ids, dtype=torch.int64).reshape(-1)
    if excluded.numel():
        if not excluded.is_cuda and (int(excluded.min()) < 0 or int(excluded.max()) >= vocab_size):
            raise ValueError(f"exclude_ids must be ids in [0, {vocab_size}), got min {int(excluded.min())} "
                             f"max {int(excluded.max())}.")
        allowed[excluded.to(device)] = False
        if not excluded.is_cuda and excluded.unique().numel() >= vocab_size:
            raise ValueError("exclude_ids excludes the whole vocabulary; nothing can be sampled.")
    return allowed


def _check_inputs(hidden, embedding, bias, targets, temperature):
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating [M, d] tensor, got {tuple(hidden.shape)} {hidden.dtype}; "
                         "select the masked positions first (e.g. states[mask]).")
    if embedding.dim() != 2 or embedding.shape[1] != hidden.shape[1]:
        raise ValueError(f"embedding must be [V, d] with d = {hidden.shape[1]}, got {tuple(embedding.shape)}.")
    if embedding.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and embedding ({embedding.dtype}) must share a dtype; cast one.")
    if bias is not None and (bias.shape != (embedding.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [V] = [{embedding.shape[0]}] in {hidden.dtype}, got {tuple(bias.shape)} "
                         f"{bias.dtype}.")
    if targets is not None and (targets.shape != (hidden.shape[0],) or targets.is_floating_point()
                                or targets.dtype == torch.bool):
        raise ValueError(f"targets must be integer [M] = [{hidden.shape[0]}], got {tuple(targets.shape)} "
                         f"{targets.dtype}.")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    tensors = [t for t in (hidden, embedding, bias, targets) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}.")


def _check_targets(targets, vocab_size, ignore_index):
    ok = ((targets >= 0) & (targets < vocab_size)) | (targets == ignore_index)
    message = f"targets must be ids in [0, {vocab_size}) or ignore_index={ignore_index}"
    try:  # a device-side assert, the same op on every device: no host sync on CUDA, on CPU it raises at once
        torch._assert_async(ok.all(), message)
    except RuntimeError as err:  # CPU: name the bad ids (the error path may read the tensor)
        raise ValueError(f"{message}; got {targets[~ok][:5].tolist()}.") from err
