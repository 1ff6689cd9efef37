"""Teacher saliency (EPIC Eq. 8) and categorical masking without replacement: Triton kernel, reference, dispatch.

    alpha = softmax( (1/h) sum_k q_k K_k^T )   over the sentence's valid tokens           (Eq. 8)
    M     = m positions drawn without replacement from Categorical(alpha),  m = ceil(ratio * len)

Sampling without replacement is Gumbel-top-k: perturb log(alpha_j) with independent Gumbel noise
g_j = -log(-log u_j) and keep the m largest; this is exactly sequential sampling without replacement
(Plackett-Luce). Noise goes on log-probabilities with -inf on invalid positions, never on probabilities.
The Triton kernel does the whole batch in one launch: one program per sentence computes the scores, alpha, the
noise (Philox, or the given uniforms), m, and each position's rank among the valid ones (pairwise comparisons;
ties, which have probability 0, go to the lower index, as in the reference's stable sort).

Eq. 8 has no 1/sqrt(d_h) temperature; pass ``query * d_h ** -0.5`` to use the attention layer's own scaling.
No gradients: the teacher runs under ``torch.inference_mode``.
"""
from fractions import Fraction

import torch

from .dispatch import UNIFORM_MAX, UNIFORM_MIN, draw_seed, gumbel_from_uniform, tl, triton, use_triton

__all__ = ["saliency_mask", "saliency_mask_reference", "num_positions_to_mask"]

MAX_TRITON_SEQ_LEN = 1024  # the pairwise rank uses a [BLOCK_N, BLOCK_N] tile per sentence
_RATIO_MAX_DENOMINATOR = 10**6


def _ratio_as_fraction(ratio: float) -> tuple[int, int]:
    """The mask ratio as the nearest fraction p/q with q <= 10^6, e.g. 0.35 -> (7, 20)."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}.")
    frac = Fraction(float(ratio)).limit_denominator(_RATIO_MAX_DENOMINATOR)
    return frac.numerator, frac.denominator


def num_positions_to_mask(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """m_i = ceil(ratio * len_i) computed exactly.

    A float ceil is wrong on products that should be integers: 0.35 * 20 = 7.000000000000001 in float64, whose ceil
    is 8. So ratio is read as the nearest fraction p/q with q <= 10^6 (0.35 -> 7/20) and m = (p*len + q - 1) // q
    in int64, which is exact; m <= len because p <= q.
    """
    num, den = _ratio_as_fraction(ratio)
    return (lengths.to(torch.int64) * num + den - 1) // den


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _saliency_mask_kernel(
    query_ptr, keys_ptr, valid_ptr, noise_ptr, seed_ptr,  # [B, H, dh], [B, H, n, dh], [B, n] u8, [B, n], [1]
    alpha_ptr, mask_ptr,  # outputs [B, n] fp32 and [B, n] u8
    num_heads, seq_len, head_dim, inv_num_heads, ratio_num, ratio_den, u_min, u_max,
    q_stride_b, q_stride_h, k_stride_b, k_stride_h, k_stride_n,
    USE_NOISE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    pos = tl.arange(0, BLOCK_N)
    pos_ok = pos < seq_len
    dcols = tl.arange(0, BLOCK_D)

    # Eq. 8, inside the softmax: s_j = (1/h) sum_k q_k . K_k[j]
    scores = tl.zeros([BLOCK_N], dtype=tl.float32)
    for head in range(num_heads):
        q_base = query_ptr + b.to(tl.int64) * q_stride_b + head * q_stride_h
        k_base = keys_ptr + b.to(tl.int64) * k_stride_b + head * k_stride_h
        for d0 in range(0, head_dim, BLOCK_D):
            d_ok = d0 + dcols < head_dim
            q = tl.load(q_base + d0 + dcols, mask=d_ok, other=0.0).to(tl.float32)
            k = tl.load(k_base + pos[:, None] * k_stride_n + (d0 + dcols)[None, :],
                        mask=pos_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            scores += tl.sum(k * q[None, :], axis=1)
    scores = scores * inv_num_heads

    # Eq. 8: log alpha = log_softmax over the valid tokens; alpha = 0 elsewhere (and everywhere if none is valid).
    valid = pos_ok & (tl.load(valid_ptr + b * seq_len + pos, mask=pos_ok, other=0) != 0)
    s = tl.where(valid, scores, float("-inf"))
    row_max = tl.max(s, axis=0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    e = tl.where(valid, tl.exp(s - row_max), 0.0)
    denom = tl.sum(e, axis=0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    tl.store(alpha_ptr + b * seq_len + pos, e / denom, mask=pos_ok)
    log_alpha = s - row_max - tl.log(denom)

    # Gumbel-top-k: key_j = log alpha_j + g_j, g = -log(-log u) in fp32.
    if USE_NOISE:
        u = tl.load(noise_ptr + b * seq_len + pos, mask=pos_ok, other=0.5).to(tl.float32)
    else:
        u = tl.rand(tl.load(seed_ptr), b * seq_len + pos)
    u = tl.minimum(tl.maximum(u, u_min), u_max)
    key = log_alpha - tl.log(-tl.log(u))

    # m = ceil(ratio * len) = (p * len + q - 1) // q; keep the valid positions whose rank among valid ones is < m.
    length = tl.sum(valid.to(tl.int64), axis=0)
    m = (length * ratio_num + ratio_den - 1) // ratio_den
    ties_to_lower = (key[None, :] == key[:, None]) & (pos[None, :] < pos[:, None])
    beats = valid[None, :] & ((key[None, :] > key[:, None]) | ties_to_lower)  # beats[i, j]: j ranks before i
    rank = tl.sum(beats.to(tl.int32), axis=1)
    selected = valid & (rank < m)
    tl.store(mask_ptr + b * seq_len + pos, selected.to(tl.uint8), mask=pos_ok)


def _saliency_mask_triton(query, keys, valid, ratio, generator, noise):
    batch, num_heads, seq_len, head_dim = keys.shape
    if seq_len > MAX_TRITON_SEQ_LEN:
        raise ValueError(f"the Triton saliency mask handles n <= {MAX_TRITON_SEQ_LEN} text tokens, got {seq_len}; "
                         "use EPIC_KERNELS=reference for longer texts.")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    device = keys.device
    alpha = torch.empty((batch, seq_len), device=device, dtype=torch.float32)
    mask = torch.empty((batch, seq_len), device=device, dtype=torch.uint8)
    if noise is not None:
        noise = noise.float().contiguous()
        seed = torch.zeros(1, device=device, dtype=torch.int64)  # unused
    else:
        seed = draw_seed(generator, device)
    num, den = _ratio_as_fraction(ratio)
    if batch > 0 and seq_len > 0:
        _saliency_mask_kernel[(batch,)](
            query, keys, valid.contiguous().view(torch.uint8), noise if noise is not None else alpha, seed,
            alpha, mask,
            num_heads, seq_len, head_dim, 1.0 / num_heads, num, den, UNIFORM_MIN, UNIFORM_MAX,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            USE_NOISE=noise is not None, BLOCK_N=triton.next_power_of_2(seq_len),
            BLOCK_D=min(triton.next_power_of_2(head_dim), 64),
        )
    return mask.view(torch.bool), alpha


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------------
def saliency_alpha_reference(query, keys, valid):
    """Eq. 8: alpha = softmax over valid tokens of the head-mean of q_k K_k^T; returns (alpha, log_alpha) in fp32,
    alpha = 0 and log_alpha = -inf at invalid positions (all positions of a row without valid tokens)."""
    scores = torch.einsum("bhd,bhnd->bn", query.float(), keys.float()) / query.shape[1]
    scores = scores.masked_fill(~valid, float("-inf"))
    row_has_valid = valid.any(dim=1, keepdim=True)
    log_alpha = torch.log_softmax(scores.masked_fill(~row_has_valid, 0.0), dim=1).masked_fill(~valid, float("-inf"))
    return log_alpha.exp(), log_alpha


@torch.no_grad()
def saliency_mask_reference(query, keys, valid, ratio, generator=None, noise=None):
    """Eq. 8 + Gumbel-top-k masking in plain PyTorch. Same contract as :func:`saliency_mask`."""
    _check_inputs(query, keys, valid, ratio, noise)
    alpha, log_alpha = saliency_alpha_reference(query, keys, valid)
    if noise is None:
        noise = torch.rand(valid.shape, generator=generator, device=generator.device if generator else valid.device)
    key = log_alpha + gumbel_from_uniform(noise.to(valid.device))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # ties -> lower index first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    m = num_positions_to_mask(valid.sum(dim=1), ratio)
    mask = valid & (rank < m[:, None])
    return mask, alpha


# ----------------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------------
def saliency_mask(query, keys, valid, ratio, generator=None, noise=None):
    """Saliency-based masking positions, EPIC Eq. 8 + sampling without replacement, one launch on CUDA.

    Args:
        query: [B, H, dh], the image-stream [CLS] query per head at the teacher's penultimate fusion layer.
        keys: [B, H, n, dh], the text-stream keys per head at that layer.
        valid: [B, n] bool, real text tokens (no special tokens, no padding).
        ratio: float in [0, 1]; m_i = ceil(ratio * valid_i) positions per sentence (exact, see
            :func:`num_positions_to_mask`), so 0 < m_i <= valid_i whenever ratio > 0 and valid_i > 0.
        generator: torch.Generator for the noise (CUDA/Triton: a Philox seed is drawn from it, or from the default
            generator, on the device; no host sync). Ignored when ``noise`` is given.
        noise: optional [B, n] uniforms in (0, 1); with it the Triton and reference paths select the same positions.
            Clamped to [UNIFORM_MIN, UNIFORM_MAX] (see ``dispatch``) before g = -log(-log u), in fp32.
    Returns:
        (mask bool [B, n] with exactly m_i True entries per row, all at valid positions;
         alpha fp32 [B, n], zeros at invalid positions). A row without valid tokens gives all False / all 0.
    """
    _check_inputs(query, keys, valid, ratio, noise)
    if not use_triton(query, keys, valid):
        return saliency_mask_reference(query, keys, valid, ratio, generator, noise)
    return _saliency_mask_triton(query, keys, valid, ratio, generator, noise)


def _check_inputs(query, keys, valid, ratio, noise):
    if keys.dim() != 4 or not keys.is_floating_point():
        raise ValueError(f"keys must be a floating [B, H, n, dh] tensor, got {tuple(keys.shape)} {keys.dtype}.")
    batch, num_heads, seq_len, head_dim = keys.shape
    if query.shape != (batch, num_heads, head_dim):
        raise ValueError(f"query must have shape [B, H, dh] = [{batch}, {num_heads}, {head_dim}] to match keys, "
                         f"got {tuple(query.shape)}.")
    if valid.shape != (batch, seq_len) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool [B, n] = [{batch}, {seq_len}] tensor, got {tuple(valid.shape)} "
                         f"{valid.dtype}.")
    _ratio_as_fraction(ratio)
    if noise is not None and noise.shape != (batch, seq_len):
        raise ValueError(f"noise must be [B, n] = [{batch}, {seq_len}] uniforms, got {tuple(noise.shape)}.")
    devices = {t.device for t in (query, keys, valid) + (() if noise is None else (noise,))}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}.")
