"""The teacher-saliency cache: alpha (EPIC Eq. 8) per (sample key, caption index), precomputed once.

The teacher is frozen, so alpha for an (image, caption) pair never changes during pretraining.
``tools/precompute_saliency.py`` runs the teacher once over the shards and writes one sidecar file per shard;
with ``epic.saliency_cache=DIR`` the training loader attaches alpha to each batch and the EPIC step skips the
teacher.

Layout of DIR:

    manifest.json                          what the cache was made with (teacher, image size, max_text_len,
                                           tokenizer size, image transform); checked against the run at start
    <shard parent dir>/<shard stem>.safetensors   one sidecar per shard, e.g. cc3m/00012.safetensors for
                                           /data/cc3m/00012.tar (the last two path components of the shard)

A sidecar holds, for the N (sample, caption) entries of its shard, ``alpha`` fp16 [sum of lengths] (each
caption's alpha over its real tokens, concatenated: one small array per caption), ``offsets`` int64 [N + 1]
and ``caption_index`` int32 [N]; the sample keys are a JSON list in the safetensors metadata. Caption indices
count the captions that ``epic.data.shards.decode_sample`` keeps (empty captions are dropped first).

The cache holds the alpha of the *un-augmented* image (METER's eval transform: resize + centre crop). Training
images are augmented (random resized crop, RandAugment without colour ops), so the cached alpha is the
saliency of the un-augmented view of the same image: it no longer follows a crop that cuts an object away.
"""
from __future__ import annotations

import json
import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

FORMAT = "epic-saliency-v1"
MANIFEST = "manifest.json"
SIDECAR_SUFFIX = ".safetensors"
# alpha is stored in fp16; a real token's alpha is kept >= the smallest fp16 subnormal so it stays selectable
ALPHA_MIN = 2.0 ** -24
MISS_REASONS = ("no_sidecar", "no_entry", "length_mismatch")


class SaliencyCacheError(ValueError):
    """The cache does not fit the run (the message says what differs and how to fix it)."""


def sidecar_relpath(shard_url: str) -> str:
    """'/data/cc3m/00012.tar' -> 'cc3m/00012.safetensors' (the shard's parent folder name and stem)."""
    path = str(shard_url).split("::")[-1].rstrip("/")
    for prefix in ("pipe:", "file:"):
        if path.startswith(prefix):
            path = path[len(prefix):].split()[-1]
    parts = Path(path).parts
    stem = Path(parts[-1]).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    parent = parts[-2] if len(parts) > 1 else "_"
    return f"{parent}/{stem}{SIDECAR_SUFFIX}"


def sidecar_path(cache_dir: str | os.PathLike, shard_url: str) -> Path:
    return Path(cache_dir) / sidecar_relpath(shard_url)


# ---------------------------------------------------------------------------------------------- writing / reading
def write_sidecar(path: str | os.PathLike, keys: Sequence[str], caption_indices: Sequence[int],
                  alphas: Sequence[np.ndarray], shard_url: str = "") -> None:
    """Write one shard's entries atomically (a temporary file renamed into place: a crash leaves no half file)."""
    from safetensors.numpy import save_file

    if not len(keys) == len(caption_indices) == len(alphas):
        raise ValueError(f"keys, caption_indices and alphas differ in length: {len(keys)}, {len(caption_indices)}, "
                         f"{len(alphas)}")
    lengths = np.array([len(a) for a in alphas], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = (np.concatenate([np.asarray(a, dtype=np.float32) for a in alphas]) if alphas
            else np.zeros(0, dtype=np.float32))
    flat = np.maximum(flat, ALPHA_MIN).astype(np.float16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"alpha": flat, "offsets": offsets, "caption_index": np.asarray(caption_indices, dtype=np.int32)},
              str(tmp), metadata={"format": FORMAT, "keys": json.dumps(list(keys)), "shard": str(shard_url)})
    os.replace(tmp, path)


class Sidecar:
    """One shard's alphas: ``get(key, caption_index)`` -> fp16 array over the caption's real tokens, or None."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise SaliencyCacheError(f"{path} is not a saliency sidecar of format {FORMAT} "
                                         f"(found {meta.get('format')!r}); rebuild it with tools/precompute_saliency.py")
            self.alpha = f.get_tensor("alpha")
            offsets = f.get_tensor("offsets")
            captions = f.get_tensor("caption_index")
        keys = json.loads(meta["keys"])
        self.index = {(k, int(c)): (int(offsets[i]), int(offsets[i + 1])) for i, (k, c) in enumerate(zip(keys, captions))}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str, caption_index: int) -> Optional[np.ndarray]:
        span = self.index.get((key, int(caption_index)))
        return None if span is None else self.alpha[span[0]:span[1]]


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise SaliencyCacheError(f"epic.saliency_cache={cache_dir} has no {MANIFEST}: it is not a saliency cache. "
                                 f"Write one with `python tools/precompute_saliency.py --teacher T --shards ... "
                                 f"--out {cache_dir}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise SaliencyCacheError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def check_manifest_fits(manifest: dict, image_size: int, max_text_len: int, vocab_size: int,
                        where: str = "epic.saliency_cache") -> None:
    """A cache made for other images or captions would attach alpha to the wrong tokens: refuse it."""
    wanted = {"image_size": image_size, "max_text_len": max_text_len, "tokenizer_size": vocab_size}
    wrong = {k: (manifest.get(k), v) for k, v in wanted.items() if manifest.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}: cache {a}, run {b}" for k, (a, b) in wrong.items())
        raise SaliencyCacheError(f"{where} was made for other data settings ({details}); rebuild it with "
                                 f"tools/precompute_saliency.py at this run's data.image_size / data.max_text_len / "
                                 f"tokenizer, or unset {where}")


class SaliencyCache:
    """Looks alphas up by (shard, sample key, caption index), reading each shard's sidecar once (LRU of open ones)."""

    def __init__(self, cache_dir: str | os.PathLike, max_open: int = 256):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        self.max_open = max_open
        self._open: OrderedDict[str, Optional[Sidecar]] = OrderedDict()
        self.misses: Counter = Counter()

    def sidecar(self, shard_url: str) -> Optional[Sidecar]:
        rel = sidecar_relpath(shard_url)
        if rel in self._open:
            self._open.move_to_end(rel)
            return self._open[rel]
        path = self.dir / rel
        found = Sidecar(path) if path.is_file() else None
        self._open[rel] = found
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return found

    def lookup(self, shard_url: str, key: str, caption_index: int, num_real: int) -> Optional[np.ndarray]:
        """alpha over the caption's ``num_real`` real tokens, or None (the reason is counted in ``misses``)."""
        sidecar = self.sidecar(shard_url)
        if sidecar is None:
            self.misses["no_sidecar"] += 1
            return None
        alpha = sidecar.get(key, caption_index)
        if alpha is None:
            self.misses["no_entry"] += 1
            return None
        if len(alpha) != num_real:
            self.misses["length_mismatch"] += 1
            return None
        return alpha

    def attach(self, batch: dict) -> dict:
        """Add ``saliency_alpha`` float32 [B, L] (alpha at the real tokens, 0 elsewhere), ``saliency_cached`` bool
        [B] and ``saliency_misses`` (a Python int, so that the step can branch without a device sync)."""
        real = batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()
        alpha = torch.zeros(real.shape, dtype=torch.float32)
        cached = torch.zeros(real.shape[0], dtype=torch.bool)
        for row, (url, key, caption) in enumerate(zip(batch["shards"], batch["keys"],
                                                      batch["caption_index"].tolist())):
            positions = real[row].nonzero().flatten()
            values = self.lookup(url, key, caption, len(positions))
            if values is not None:
                alpha[row, positions] = torch.from_numpy(values.astype(np.float32))
                cached[row] = True
        batch["saliency_alpha"], batch["saliency_cached"] = alpha, cached
        batch["saliency_misses"] = int((~cached).sum())
        return batch


class SaliencyCacheLoader:
    """A training loader whose batches carry the cached alpha (``SaliencyCache.attach``); everything else
    (iteration, exact-resume state, skip counts) is the wrapped loader's."""

    def __init__(self, loader, cache: SaliencyCache):
        self.loader, self.cache = loader, cache

    def __iter__(self):
        for batch in self.loader:
            yield self.cache.attach(batch)

    def __getattr__(self, name):  # state_dict, load_state_dict, skip_counts, batches_consumed, ...
        return getattr(self.loader, name)


def entries_done(cache_dir: str | os.PathLike, shard_urls: Iterable[str]) -> list[str]:
    """The shards whose sidecar already exists (a resumed precompute skips them)."""
    return [url for url in shard_urls if sidecar_path(cache_dir, url).is_file()]
