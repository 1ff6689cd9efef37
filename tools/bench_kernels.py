#!/usr/bin/env python
"""Time and peak memory of the fused EPIC ops against eager PyTorch (and torch.compile) at METER scale.

    python tools/bench_kernels.py [--out FILE.json] [--reps N] [--compile auto|on|off] [--small]

Shapes (per-GPU micro batch 128 of METER-B/16): token loss hidden [128, 50, 768]; saliency query [128, 12, 64] and
keys [128, 12, 50, 64]; vocab sampling + CE on M = 0.35 * 50 * 128 = 2240 masked rows, d = 768, V = 50265
(RoBERTa). GPU: fp16 inputs, wall time around synchronised steps; peak memory is torch.cuda.max_memory_allocated
above what was allocated before the step (inputs, parameters).
CPU (no GPU here): only the PyTorch paths run (the reference behind each op and eager), in fp32, with fewer
repetitions; peak memory is the process's resident-set growth sampled every 2 ms (approximate). The output says so.

Targets on a GPU (issue 5): token loss >= 2x eager; masking >= 3x the vectorised torch version; vocab sampling + CE
>= 4x less peak memory than eager linear + log-softmax + multinomial and not slower.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from epic.kernels import saliency_mask, token_consistency_loss, vocab_sample_and_loss  # noqa: E402
from epic.kernels.dispatch import use_triton  # noqa: E402
from epic.kernels.saliency_mask import saliency_mask_reference  # noqa: E402
from epic.kernels.token_consistency import token_consistency_loss_reference  # noqa: E402
from epic.kernels.vocab_sample import vocab_sample_and_loss_reference  # noqa: E402

SPECIAL_IDS = (0, 1, 2, 3, 50264)  # RoBERTa <s> <pad> </s> <unk> <mask>


# ---- eager baselines (what a plain PyTorch implementation does) --------------------------------------------------
def eager_token_loss(hidden, weight, bias, labels, mask):
    logits = F.linear(hidden, weight[None], bias.reshape(1)).squeeze(-1).float()
    per_token = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def eager_saliency_mask(query, keys, valid, ratio):
    scores = torch.einsum("bhd,bhnd->bn", query.float(), keys.float()) / query.shape[1]
    alpha = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=1)
    m = torch.ceil(valid.sum(1) * ratio).long()
    gumbel = -torch.log(-torch.log(torch.rand_like(alpha).clamp(1e-20, 1 - 1e-7)))
    order = torch.argsort(torch.log(alpha) + gumbel, dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))
    return valid & (rank < m[:, None]), alpha


def eager_vocab_sample_and_loss(hidden, embedding, bias, targets):
    """linear + log-softmax + NLL + multinomial over the full [M, V] logits."""
    log_probs = F.log_softmax(F.linear(hidden, embedding, bias).float(), dim=-1)
    loss = F.nll_loss(log_probs, targets)
    probs = log_probs.detach().exp()
    probs[:, list(SPECIAL_IDS)] = 0.0
    return torch.multinomial(probs, 1).squeeze(1), loss


# ---- measurement -------------------------------------------------------------------------------------------------
class _RssPeak:
    """Peak resident-set growth of this process while active (CPU only; sampled every 2 ms). Meaningful because
    main() re-executes with MALLOC_MMAP_THRESHOLD_ set: every buffer >= 64 KiB is its own mmap, returned to the
    OS when freed, instead of staying in malloc's pool from the warm-up (which would hide the step's peak)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def grown_bytes(self):
        return self.peak - self.base


def measure(step, device, warmup, reps):
    """Median wall time (ms) of step() and the peak extra memory (MiB) of one step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with _RssPeak() as rss:
            step()
        peak_mib = rss.grown_bytes / 2**20
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), peak_mib


def maybe_compile(fn, enabled):
    if not enabled:
        return None
    return torch.compile(fn, dynamic=False)


def run_provider(name, step, device, args, rows, op):
    try:
        ms, mib = measure(step, device, args.warmup, args.reps)
        rows.append(dict(op=op, provider=name, ms=round(ms, 3), peak_mib=round(mib, 1)))
    except Exception as err:  # e.g. torch.compile not working for this op here: report, keep going
        rows.append(dict(op=op, provider=name, ms=None, peak_mib=None, error=f"{type(err).__name__}: {err}"[:200]))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- the three ops -----------------------------------------------------------------------------------------------
def bench_token_loss(device, dtype, shapes, args, rows, compiled):
    batch, length, dim = shapes["batch"], shapes["text_len"], shapes["hidden"]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, length, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(dim, device=device, generator=gen) / dim**0.5).to(dtype).requires_grad_()
    bias = torch.zeros((), device=device, dtype=dtype, requires_grad=True)
    labels = torch.rand(batch, length, device=device, generator=gen) > 0.2
    mask = torch.rand(batch, length, device=device, generator=gen) > 0.1

    def step_with(fn):
        def step():
            loss = fn(hidden, weight, bias, labels, mask)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss.backward()
            hidden.grad = weight.grad = bias.grad = None
        return step

    op = "token_consistency_loss fwd+bwd"
    if use_triton(hidden):
        run_provider("fused (triton)", step_with(token_consistency_loss), device, args, rows, op)
    else:
        run_provider("reference (torch)", step_with(token_consistency_loss_reference), device, args, rows, op)
    run_provider("eager", step_with(eager_token_loss), device, args, rows, op)
    fn = maybe_compile(eager_token_loss, compiled)
    if fn is not None:
        run_provider("torch.compile(eager)", step_with(fn), device, args, rows, op)


def bench_saliency(device, dtype, shapes, args, rows, compiled):
    batch, heads, length, head_dim = shapes["batch"], shapes["heads"], shapes["text_len"], shapes["head_dim"]
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(batch, heads, head_dim, device=device, dtype=dtype, generator=gen)
    keys = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, generator=gen)
    lengths = torch.randint(8, length - 1, (batch,), device=device, generator=gen)
    positions = torch.arange(length, device=device)
    valid = (positions[None] >= 1) & (positions[None] <= lengths[:, None])  # <s> and </s>/<pad> are not valid

    op = "saliency_mask (fwd, no grad)"
    with torch.inference_mode():
        if use_triton(query):
            run_provider("fused (triton)", lambda: saliency_mask(query, keys, valid, 0.35), device, args, rows, op)
        else:
            run_provider("reference (torch)", lambda: saliency_mask_reference(query, keys, valid, 0.35), device,
                         args, rows, op)
        run_provider("eager (vectorised torch)", lambda: eager_saliency_mask(query, keys, valid, 0.35), device,
                     args, rows, op)
        fn = maybe_compile(eager_saliency_mask, compiled)
        if fn is not None:
            run_provider("torch.compile(eager)", lambda: fn(query, keys, valid, 0.35), device, args, rows, op)


def bench_vocab(device, dtype, shapes, args, rows, compiled):
    num_rows, dim, vocab = shapes["masked_rows"], shapes["hidden"], shapes["vocab"]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(num_rows, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    embedding = (torch.randn(vocab, dim, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
    bias = torch.zeros(vocab, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(5, vocab - 1, (num_rows,), device=device, generator=gen)

    def step_with(fn):
        def step():
            samples, loss = fn(hidden, embedding, bias, targets)
            loss.backward()
            hidden.grad = embedding.grad = bias.grad = None
        return step

    def fused(h, e, b, t):
        return vocab_sample_and_loss(h, e, b, t, exclude_ids=SPECIAL_IDS)

    def streaming_reference(h, e, b, t):
        return vocab_sample_and_loss_reference(h, e, b, t, exclude_ids=SPECIAL_IDS)

    op = "vocab_sample_and_loss fwd+bwd"
    if use_triton(hidden):
        run_provider("fused (triton tiles + cuBLAS)", step_with(fused), device, args, rows, op)
    run_provider("streaming reference (torch tiles)", step_with(streaming_reference), device, args, rows, op)
    run_provider("eager linear+log_softmax+multinomial", step_with(eager_vocab_sample_and_loss), device, args,
                 rows, op)
    fn = maybe_compile(eager_vocab_sample_and_loss, compiled)
    if fn is not None:
        run_provider("torch.compile(eager)", step_with(fn), device, args, rows, op)


def print_table(rows, note):
    print(note)
    header = f"{'op':34s} {'provider':40s} {'ms (median)':>12s} {'peak MiB':>10s} {'vs eager':>9s}"
    print(header)
    print("-" * len(header))
    eager_ms = {r["op"]: r["ms"] for r in rows if r["provider"].startswith("eager") and r["ms"]}
    for r in rows:
        if r["ms"] is None:
            print(f"{r['op']:34s} {r['provider']:40s} {'failed':>12s}   {r['error']}")
            continue
        speedup = eager_ms.get(r["op"], math.nan) / r["ms"]
        print(f"{r['op']:34s} {r['provider']:40s} {r['ms']:12.3f} {r['peak_mib']:10.1f} {speedup:8.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 20 on GPU, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions (default: 3 GPU, 1 CPU)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="also time torch.compile of the eager versions (auto: on GPU only)")
    parser.add_argument("--small", action="store_true", help="a quarter of the batch (quick CPU check)")
    parser.add_argument("--ops", default="token,saliency,vocab", help="comma-separated subset of the ops")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu and "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see _RssPeak
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    args.reps = args.reps or (20 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    compiled = args.compile == "on" or (args.compile == "auto" and on_gpu)
    dtype = torch.float16 if on_gpu else torch.float32
    batch = 32 if args.small else 128
    shapes = dict(batch=batch, text_len=50, hidden=768, heads=12, head_dim=64, vocab=50265,
                  masked_rows=round(0.35 * 50 * batch))
    if not on_gpu:
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    rows = []
    ops = set(args.ops.split(","))
    if "token" in ops:
        bench_token_loss(device, dtype, shapes, args, rows, compiled)
    if "saliency" in ops:
        bench_saliency(device, dtype, shapes, args, rows, compiled)
    if "vocab" in ops:
        bench_vocab(device, dtype, shapes, args, rows, compiled)

    name = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                         f"{torch.get_num_threads()} threads)"
    if on_gpu:
        note = f"device: {name}; dtype {dtype}; shapes {shapes}; reps {args.reps}; compile {compiled}"
    else:
        note = (f"*** NO GPU: CPU run, PyTorch paths only (the Triton kernels need CUDA); dtype {dtype}; "
                f"{args.reps} reps; peak = resident-set growth (approximate); torch.compile "
                f"{'on' if compiled else 'off (--compile on to try)'} ***\n"
                f"device: {name}; shapes {shapes}")
    print_table(rows, note)
    if args.out:
        from epic.kernels.dispatch import HAS_TRITON, triton

        meta = dict(device=name, dtype=str(dtype), shapes=shapes, reps=args.reps, compile=compiled,
                    torch=torch.__version__, triton=triton.__version__ if HAS_TRITON else None, gpu=on_gpu)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
