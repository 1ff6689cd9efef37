"""Shards on disk: shard specs and sources, reading raw samples from a tar, decoding them, counting what is skipped.

A shard spec is a brace pattern (`/data/cc3m/{00000..00331}.tar`), optionally a glob (`/data/coco/*.tar`), several
joined with `::`, or a list of those. All listed local shards must exist: a missing one is an error at build time
naming the pattern and the missing files (the official METER code crashes with an IndexError much later instead).

Raw samples come from webdataset's tar iteration (`tarfile_samples`: open, expand members, group by key) with a
handler that counts shard-level failures instead of raising or sleeping. Sample-level problems are found by
`decode_sample`, which returns the reason a sample is skipped. Reasons (SKIP_REASONS):
  unreadable_shard  the shard could not be opened
  truncated_tar     the tar ends in the middle of a member (samples before the cut are kept)
  bad_tar           not a tar archive, or a duplicate member inside a sample
  missing_image     no .jpg/.jpeg/.png/.webp member
  empty_file        the image or caption member (or the whole shard) has zero bytes
  bad_image         the image bytes do not decode
  missing_caption   neither .txt nor a .json "caption"
  empty_caption     the caption(s) are empty or whitespace
  bad_text          caption text is not UTF-8, the JSON does not parse, or content_words do not fit the captions
"""
from __future__ import annotations

import glob
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from braceexpand import braceexpand
from PIL import Image

SKIP_REASONS = (
    "unreadable_shard", "truncated_tar", "bad_tar", "missing_image", "empty_file", "bad_image",
    "missing_caption", "empty_caption", "bad_text",
)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


# ------------------------------------------------------------------------------------------------ specs, sources
def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def expand_shard_spec(spec: Union[str, Sequence[str]], name: str = "shards") -> list[str]:
    """Shard URLs listed by a spec (brace patterns, globs, `::`-joined, or a list); every local shard must exist."""
    patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        for part in str(pattern).split("::"):
            if not part:
                continue
            missing = []
            for item in braceexpand(part):
                if _is_remote(item):
                    urls.append(item)
                elif any(ch in item for ch in "*?["):
                    matches = sorted(glob.glob(item))
                    urls.extend(matches) if matches else missing.append(item)
                elif os.path.isfile(item):
                    urls.append(item)
                else:
                    missing.append(item)
            if missing:
                shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
                raise FileNotFoundError(
                    f"{name}: the shard pattern '{part}' lists shards that do not exist: {shown}. "
                    "Fix the pattern (brace range, directory) or remove the dead shards from it: all listed shards must exist."
                )
    if not urls:
        raise FileNotFoundError(f"{name}: the shard spec {spec!r} lists no shards")
    return urls


@dataclass(frozen=True)
class Source:
    """One training source: its shard URLs and its share of the sample stream (weights are normalised)."""

    name: str
    shards: tuple
    weight: float = 1.0


def parse_sources(sources) -> list[Source]:
    """Sources from a spec string, a list of specs, or dicts {shards, weight=1.0, name}; checks shards exist."""
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    parsed = []
    for i, item in enumerate(sources):
        if isinstance(item, (str, os.PathLike)):
            item = {"shards": str(item)}
        if not isinstance(item, dict):
            raise TypeError(f"source {i}: expected a shard spec string or a dict {{shards, weight, name}}, got {type(item).__name__}")
        unknown = set(item) - {"shards", "weight", "name"}
        if unknown:
            raise ValueError(f"source {i}: unknown keys {sorted(unknown)}; a source has only 'shards', 'weight' and 'name'")
        if "shards" not in item:
            raise ValueError(f"source {i}: missing 'shards' (a brace pattern such as /data/cc3m/{{00000..00331}}.tar)")
        name = str(item.get("name") or f"source{i}")
        weight = float(item.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"source '{name}': weight must be > 0, got {weight}")
        parsed.append(Source(name=name, shards=tuple(expand_shard_spec(item["shards"], name=f"source '{name}'")), weight=weight))
    if not parsed:
        raise ValueError("no training sources given")
    if len({s.name for s in parsed}) != len(parsed):
        raise ValueError(f"source names must be unique, got {[s.name for s in parsed]}")
    return parsed


# --------------------------------------------------------------------------------------------- raw tar reading
def _shard_failure_reason(exn: BaseException, opened: bool) -> str:
    if not opened:
        return "unreadable_shard"
    text = " ".join(str(a) for a in exn.args)
    if "empty file" in text:
        return "empty_file"
    if isinstance(exn, EOFError) or "unexpected end" in text or "truncated" in text:
        return "truncated_tar"
    return "bad_tar"


def iter_raw_samples(url: str, skips: Counter) -> Iterator[dict]:
    """Raw samples (dict ext -> bytes, plus __key__) of one shard; shard-level failures are counted once in `skips`."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    failures: set[str] = set()
    opened = [False]

    def count_and_continue(exn: BaseException) -> bool:
        failures.add(_shard_failure_reason(exn, opened[0]))
        return True

    def opened_streams():
        for source in url_opener([{"url": url}], handler=count_and_continue):
            opened[0] = True
            yield source

    try:
        files = tar_file_expander(opened_streams(), handler=count_and_continue)
        yield from group_by_keys(files, handler=count_and_continue)
    finally:
        for reason in failures:
            skips[reason] += 1


# ----------------------------------------------------------------------------------------------------- decoding
@dataclass
class DecodedSample:
    key: str
    image: Image.Image
    captions: list  # list[str], never empty
    content_words: list  # per caption: list[bool] (one flag per whitespace word) or None
    regions: Optional[list] = None  # .json "regions" (X-VLM data): [{caption, attributes, bbox: [x, y, w, h]}]


def _text(data: bytes) -> str:
    return data.decode("utf-8")


def read_captions(raw: dict) -> Union[tuple[list, list], str]:
    """(captions, content flags per caption) from .json "caption" (str or list) or else .txt; or a skip reason."""
    captions, flags = None, None
    if "json" in raw:
        if len(raw["json"]) == 0:
            return "empty_file"
        try:
            meta = json.loads(_text(raw["json"]))
        except (UnicodeDecodeError, ValueError):
            return "bad_text"
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if caption is not None:
            captions = [caption] if isinstance(caption, str) else caption
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                return "bad_text"
            flags = meta.get("content_words")
            if flags is not None:
                if isinstance(caption, str):
                    flags = [flags]
                if len(flags) != len(captions) or any(len(f) != len(c.split()) for f, c in zip(flags, captions)):
                    return "bad_text"
    if captions is None and "txt" in raw:
        if len(raw["txt"]) == 0:
            return "empty_file"
        try:
            captions = [_text(raw["txt"])]
        except UnicodeDecodeError:
            return "bad_text"
    if captions is None:
        return "missing_caption"
    flags = flags if flags is not None else [None] * len(captions)
    kept = [(c.strip(), f) for c, f in zip(captions, flags) if c.strip()]
    if not kept:
        return "empty_caption"
    return [c for c, _ in kept], [f for _, f in kept]


def read_image(raw: dict) -> Union[Image.Image, str]:
    """The sample's image as RGB, or a skip reason."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        return "missing_image"
    data = raw[ext]
    if len(data) == 0:
        return "empty_file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when a palette image with transparency goes straight to RGB
            return image.convert("RGB")
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return "bad_image"


def decode_sample(raw: dict) -> Union[DecodedSample, str]:
    """A decoded sample, or the reason it is skipped (one of SKIP_REASONS)."""
    text = read_captions(raw)
    if isinstance(text, str):
        return text
    image = read_image(raw)
    if isinstance(image, str):
        return image
    return DecodedSample(key=str(raw.get("__key__")), image=image, captions=text[0], content_words=text[1],
                         regions=read_regions(raw))


def read_regions(raw: dict) -> Optional[list]:
    """The .json "regions" list (boxes and region captions, X-VLM's region data) or None; checked by the region
    loader (epic.data.regions.validate_regions), which knows the image size."""
    if "json" not in raw:
        return None
    meta = json.loads(_text(raw["json"]))  # read_captions has parsed it without error already
    regions = meta.get("regions") if isinstance(meta, dict) else None
    return regions if isinstance(regions, list) else None


def count_skips(counter: Optional[Counter]) -> dict:
    """A plain dict with every known reason (zeros included) plus any other reason seen."""
    counter = counter or Counter()
    return {**{reason: 0 for reason in SKIP_REASONS}, **{k: int(v) for k, v in counter.items()}}
