"""Per-token image-token consistency loss (EPIC Eq. 1-2): fused Triton kernel, PyTorch reference, dispatch.

    D_i = sigmoid(beta^T h_i + b)                                              (Eq. 1)
    L   = - sum_{i consistent} log D_i - sum_{i inconsistent} log(1 - D_i)     (Eq. 2)

Labels are 1 for consistent tokens (outside T) and 0 for inconsistent ones (inside T); only tokens where ``mask``
is true count. The Triton forward reads ``hidden`` once per token block and, in the same launch, writes the
gradient pieces: dL/dz_i (unscaled), grad_hidden_i = dL/dz_i * beta and per-block partial sums of dL/dz_i * h_i
and dL/dz_i. The backward only multiplies them by grad_output (and 1/count for "mean" / "pair_sum"): no second
pass over ``hidden``. The stored pieces are unscaled so that fp16/bf16 gradients keep the loss scale's headroom.

Reductions: "mean" averages over all counted tokens of the batch ("token_mean"); "pair_sum" is Eq. 2 as written,
the sum over a pair's tokens, averaged over the pairs (rows with at least one counted token); "sum"; "none".
"""
import torch
import torch.nn.functional as F

from .dispatch import tl, triton, use_triton

__all__ = ["token_consistency_loss", "token_consistency_loss_reference", "TokenConsistencyLossFunction"]

_REDUCTIONS = ("mean", "pair_sum", "sum", "none")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _token_consistency_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, mask_ptr,  # inputs: [N, d] (row stride), [d], [1], [N], [N]
    logits_ptr, loss_ptr, dlogit_ptr,  # outputs [N] fp32: z_i, masked BCE_i, masked (sigmoid(z_i) - y_i)
    grad_hidden_ptr, grad_weight_partial_ptr, grad_bias_partial_ptr,  # [N, d], [num_blocks, d] fp32, [num_blocks]
    num_tokens, dim, hidden_row_stride,
    FUSE_GRADS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    cols = tl.arange(0, BLOCK_D)
    row_offsets = rows.to(tl.int64) * hidden_row_stride

    # Eq. 1, inside the sigmoid: z_i = beta^T h_i + b, fp32 accumulation.
    z = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        col_ok = d0 + cols < dim
        h = tl.load(hidden_ptr + row_offsets[:, None] + (d0 + cols)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        beta = tl.load(weight_ptr + d0 + cols, mask=col_ok, other=0.0).to(tl.float32)
        z += tl.sum(h * beta[None, :], axis=1)
    z += tl.load(bias_ptr).to(tl.float32)

    # Eq. 2 per token, as BCE with logits: max(z, 0) - y z + log(1 + exp(-|z|)); dL/dz = sigmoid(z) - y.
    y = tl.load(labels_ptr + rows, mask=row_ok, other=0.0)
    counted = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    bce = tl.maximum(z, 0.0) - y * z + tl.log(1.0 + tl.exp(-tl.abs(z)))
    dlogit = tl.where(counted, tl.sigmoid(z) - y, 0.0)
    tl.store(logits_ptr + rows, z, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(counted, bce, 0.0), mask=row_ok)
    tl.store(dlogit_ptr + rows, dlogit, mask=row_ok)

    if FUSE_GRADS:
        for d0 in range(0, dim, BLOCK_D):
            col_ok = d0 + cols < dim
            tile_ok = row_ok[:, None] & col_ok[None, :]
            beta = tl.load(weight_ptr + d0 + cols, mask=col_ok, other=0.0).to(tl.float32)
            grad_h = dlogit[:, None] * beta[None, :]
            tl.store(grad_hidden_ptr + rows.to(tl.int64)[:, None] * dim + (d0 + cols)[None, :],
                     grad_h.to(grad_hidden_ptr.dtype.element_ty), mask=tile_ok)
            h = tl.load(hidden_ptr + row_offsets[:, None] + (d0 + cols)[None, :], mask=tile_ok,
                        other=0.0).to(tl.float32)
            tl.store(grad_weight_partial_ptr + pid * dim + d0 + cols, tl.sum(dlogit[:, None] * h, axis=0),
                     mask=col_ok)
        tl.store(grad_bias_partial_ptr + pid, tl.sum(dlogit, axis=0))


def _token_consistency_forward_triton(hidden2d, weight, bias, labels, mask, fuse_grads):
    """Launch the fused kernel on [N, d] tokens. Returns logits, per-token loss, dL/dz (all fp32 [N]) and, when
    ``fuse_grads``, grad_hidden (unscaled, hidden's dtype) and grad_weight / grad_bias sums (unscaled, fp32)."""
    num_tokens, dim = hidden2d.shape
    device = hidden2d.device
    block_d = min(triton.next_power_of_2(max(dim, 1)), 256)
    block_n = 16
    num_blocks = max(triton.cdiv(num_tokens, block_n), 1)
    logits = torch.empty(num_tokens, device=device, dtype=torch.float32)
    loss = torch.empty_like(logits)
    dlogit = torch.empty_like(logits)
    if fuse_grads:
        grad_hidden = torch.empty((num_tokens, dim), device=device, dtype=hidden2d.dtype)
        grad_weight_partial = torch.empty((num_blocks, dim), device=device, dtype=torch.float32)
        grad_bias_partial = torch.empty(num_blocks, device=device, dtype=torch.float32)
    else:
        grad_hidden = grad_weight_partial = grad_bias_partial = logits  # never touched (FUSE_GRADS=False)
    if num_tokens > 0:
        _token_consistency_forward_kernel[(num_blocks,)](
            hidden2d, weight, bias, labels, mask, logits, loss, dlogit,
            grad_hidden, grad_weight_partial, grad_bias_partial,
            num_tokens, dim, hidden2d.stride(0),
            FUSE_GRADS=fuse_grads, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    if not fuse_grads:
        return logits, loss, dlogit, None, None, None
    # Deterministic reduction of the per-block partial sums (no atomics).
    return logits, loss, dlogit, grad_hidden, grad_weight_partial.sum(0), grad_bias_partial.sum()


class TokenConsistencyLossFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernel. Inputs are already flattened: hidden2d [N, d] (unit column stride),
    weight [d], bias [1], labels fp32 [N], mask uint8 [N]; ``row_length`` n (pair_sum: rows of n tokens).
    Returns (loss, logits fp32 [N] non-differentiable)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, mask, reduction, row_length):
        needs_grad = any(ctx.needs_input_grad[:3])
        fuse_grads = needs_grad and reduction != "none"
        logits, loss_per_token, dlogit, grad_hidden, grad_weight, grad_bias = _token_consistency_forward_triton(
            hidden2d, weight, bias, labels, mask, fuse_grads)
        if reduction == "none":
            loss = loss_per_token
            ctx.save_for_backward(dlogit, hidden2d, weight)
        else:
            loss = loss_per_token.sum()
            count = reduction_count(mask.view(-1, row_length) != 0, reduction)
            if count is not None:
                loss = loss / count
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, count)
        ctx.reduction = reduction
        ctx.dtypes = (hidden2d.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if ctx.reduction == "none":
            # Per-token grad_output: dL/dz_i * g_i is needed inside the sum over tokens, so this one reads hidden.
            dlogit, hidden2d, weight = ctx.saved_tensors
            scaled = dlogit * grad_loss.float()
            grad_hidden = (scaled[:, None] * weight.float()[None, :]).to(hidden_dtype)
            grad_weight = (scaled[None, :] @ hidden2d.float()).reshape(-1).to(weight_dtype)
            grad_bias = scaled.sum().reshape(1).to(bias_dtype)
            return grad_hidden, grad_weight, grad_bias, None, None, None, None
        if getattr(ctx, "grad_buffer_used", False):
            raise RuntimeError("backward ran twice through token_consistency_loss; its fused gradient buffer is "
                               "scaled in place. Recompute the loss instead of retain_graph=True.")
        ctx.grad_buffer_used = True
        grad_hidden, grad_weight, grad_bias, count = ctx.saved_tensors
        scale = grad_loss.float() if count is None else grad_loss.float() / count
        grad_hidden = grad_hidden.mul_(scale) if ctx.needs_input_grad[0] else None  # fp32 scale, in place
        grad_weight = (grad_weight * scale).to(weight_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = (grad_bias * scale).reshape(1).to(bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def reduction_count(mask2d: torch.Tensor, reduction: str):
    """The divisor of a reduction over a [B, n] mask: counted tokens ("mean"), pairs with a counted token
    ("pair_sum"), or None ("sum", "none"). fp32, at least 1 (no counted token: loss 0, with a graph)."""
    if reduction == "mean":
        return mask2d.sum(dtype=torch.float32).clamp(min=1.0)
    if reduction == "pair_sum":
        return mask2d.any(dim=1).sum(dtype=torch.float32).clamp(min=1.0)
    return None


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------------
def token_consistency_loss_reference(hidden, weight, bias, labels, mask, reduction="mean"):
    """Eq. 1-2 in plain PyTorch (fp32 math, autograd). Same contract as :func:`token_consistency_loss`."""
    _check_inputs(hidden, weight, bias, labels, mask, reduction)
    logits = hidden.float() @ weight.float() + bias.float().reshape(())  # Eq. 1 (before the sigmoid)
    per_token = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")  # Eq. 2 per token
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:  # "mean": / counted tokens; "pair_sum": / pairs (Eq. 2 per pair, averaged over pairs)
        loss = per_token.sum() / reduction_count(mask, reduction)
    return loss, logits.detach()


# ----------------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------------
def token_consistency_loss(hidden, weight, bias, labels, mask, reduction="mean"):
    """Image-token consistency loss, EPIC Eq. 1-2, fused on CUDA.

    Args:
        hidden: [B, n, d] fp32/fp16/bf16, the VLM's last fused text states h_i.
        weight: [d], the head beta. bias: 0-d or [1] tensor b.
        labels: [B, n] float/bool/int, 1 = consistent (i not in T), 0 = inconsistent (i in T); soft labels allowed.
        mask: [B, n] bool, the tokens that count (real text tokens).
        reduction: "mean" (over counted tokens; 0 with a graph when none counts), "pair_sum" (Eq. 2 literally:
            summed over each row's counted tokens, averaged over the rows that have one), "sum", or "none"
            ([B, n] fp32, zeros outside ``mask``).
    Returns:
        (loss fp32, logits fp32 [B, n] detached, z_i = beta^T h_i + b for every token, for metrics).
    Math is fp32 whatever the input dtype; gradients come back in the inputs' dtypes.
    """
    _check_inputs(hidden, weight, bias, labels, mask, reduction)
    if not use_triton(hidden, weight, bias, labels, mask):
        return token_consistency_loss_reference(hidden, weight, bias, labels, mask, reduction)
    batch, length, dim = hidden.shape
    hidden2d = hidden.reshape(batch * length, dim)
    if hidden2d.stride(1) != 1:
        hidden2d = hidden2d.contiguous()
    loss, logits = TokenConsistencyLossFunction.apply(
        hidden2d, weight.contiguous(), bias.reshape(1), labels.reshape(-1).float().contiguous(),
        mask.reshape(-1).contiguous().view(torch.uint8), reduction, length)
    if reduction == "none":
        loss = loss.view(batch, length)
    return loss, logits.view(batch, length)


def _check_inputs(hidden, weight, bias, labels, mask, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; use one of {_REDUCTIONS}.")
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating [B, n, d] tensor, got {tuple(hidden.shape)} {hidden.dtype}.")
    batch, length, dim = hidden.shape
    if weight.shape != (dim,):
        raise ValueError(f"weight (beta) must have shape [d] = [{dim}], got {tuple(weight.shape)}; "
                         "for an nn.Linear(d, 1) head pass head.weight.view(-1).")
    if bias.numel() != 1 or bias.dim() > 1:
        raise ValueError(f"bias must be a 0-d or [1] tensor, got shape {tuple(bias.shape)}.")
    if labels.shape != (batch, length):
        raise ValueError(f"labels must have shape [B, n] = [{batch}, {length}], got {tuple(labels.shape)}.")
    if mask.shape != (batch, length) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool [B, n] = [{batch}, {length}] tensor, got {tuple(mask.shape)} "
                         f"{mask.dtype}; use attention_mask.bool() & ~special_tokens_mask.")
    devices = {t.device for t in (hidden, weight, bias, labels, mask)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}.")
