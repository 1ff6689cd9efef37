"""Shards on disk: shard specs and sources, reading raw samples from a tar, decoding them, counting what is skipped.

Shard counts: every folder of shards may hold `counts.json` ({"format": COUNTS_FORMAT, "shards": {"00000.tar":
{"images": n, "captions": m}, ...}}), written by tools/make_shards.py and tools/make_synthetic_shards.py, or for
other shards (img2dataset's) by `python tools/count_shards.py DIR`. A source's weight `auto` is its caption count
(or image count with data.sample_unit=image) summed over its listed shards, and an epoch is one pass over the
captions (images) of all sources, so neither is typed by hand.

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
from pathlib import Path
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


COUNTS_FILE = "counts.json"
COUNTS_FORMAT = "epic-shard-counts/1"
SAMPLE_UNITS = ("caption", "image")


class MissingCountsError(FileNotFoundError):
    """A source needs shard counts (weight auto, or an epoch length) that no counts.json provides."""


def write_shard_counts(folder, counts: dict) -> Path:
    """Write `folder/counts.json` for {shard file name: {"images": n, "captions": m}} (atomically)."""
    folder = Path(folder)
    data = {"format": COUNTS_FORMAT, "images": sum(c["images"] for c in counts.values()),
            "captions": sum(c["captions"] for c in counts.values()),
            "shards": {name: {"images": int(c["images"]), "captions": int(c["captions"])}
                       for name, c in sorted(counts.items())}}
    tmp = folder / (COUNTS_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, folder / COUNTS_FILE)
    return folder / COUNTS_FILE


def _read_counts_file(folder: str, cache: dict) -> Optional[dict]:
    if folder not in cache:
        path = Path(folder) / COUNTS_FILE
        if not path.is_file():
            cache[folder] = None
        else:
            try:
                data = json.loads(path.read_text())
            except ValueError as exn:
                raise ValueError(f"{path} is not valid JSON ({exn}); rewrite it with tools/count_shards.py") from exn
            if not isinstance(data, dict) or data.get("format") != COUNTS_FORMAT:
                raise ValueError(f"{path}: not a shard-count file of format {COUNTS_FORMAT!r}; rewrite it with "
                                 f"`python tools/count_shards.py {folder}`")
            cache[folder] = data["shards"]
    return cache[folder]


def shard_counts(urls: Sequence[str], name: str = "shards") -> tuple[int, int]:
    """(images, captions) summed over the listed shards, from the counts.json beside each; raises
    MissingCountsError naming the shards (and the command that writes the file) when a count is missing."""
    cache: dict = {}
    images = captions = 0
    missing = []
    for url in urls:
        folder, file = (None, None) if _is_remote(url) else os.path.split(os.path.abspath(url))
        entry = (_read_counts_file(folder, cache) or {}).get(file) if folder else None
        if entry is None:
            missing.append(url)
            continue
        images += int(entry["images"])
        captions += int(entry["captions"])
    if missing:
        folders = sorted({os.path.dirname(os.path.abspath(u)) for u in missing if not _is_remote(u)})
        shown = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
        fix = (f"write them with `python tools/count_shards.py {' '.join(folders)}`" if folders else
               "remote shards have no counts: give the source an explicit weight")
        raise MissingCountsError(
            f"{name}: no image/caption counts for {shown} ({COUNTS_FILE} beside the shards, written by "
            f"tools/make_shards.py and tools/make_synthetic_shards.py); {fix}, or give an explicit weight")
    return images, captions


def count_shard(url: str) -> dict:
    """{"images", "captions", "skipped"} of one shard by reading it (captions only; images are not decoded)."""
    skips: Counter = Counter()
    images = captions = skipped = 0
    for raw in iter_raw_samples(url, skips):
        text = read_captions(raw)
        if isinstance(text, str) or not any(e in raw for e in IMAGE_EXTENSIONS):
            skipped += 1
            continue
        images += 1
        captions += len(text[0])
    return {"images": images, "captions": captions, "skipped": skipped + sum(skips.values())}


@dataclass(frozen=True)
class Source:
    """One training source: its shard URLs, its share of the sample stream (weights are normalised) and, when
    its counts.json files are there, its image and caption counts."""

    name: str
    shards: tuple
    weight: float = 1.0
    images: Optional[int] = None
    captions: Optional[int] = None

    def count(self, unit: str) -> Optional[int]:
        """Samples in one pass: captions (unit "caption") or images (unit "image"); None when not counted."""
        return self.captions if unit == "caption" else self.images


def epoch_length(sources: Sequence[Source], unit: str) -> Optional[int]:
    """Samples in one epoch = one pass over every source's captions (or images); None if any is not counted."""
    counts = [s.count(unit) for s in sources]
    return None if any(c is None for c in counts) else sum(counts)


def parse_sources(sources, sample_unit: str = "caption") -> list[Source]:
    """Sources from a spec string, a list of specs, or dicts {shards, weight="auto", name}; checks shards exist.

    weight "auto" (or None, or absent) = the source's caption count (image count for sample_unit="image") from
    its counts.json files; a single source needs no count. An explicit number is used as given.
    """
    if sample_unit not in SAMPLE_UNITS:
        raise ValueError(f"sample_unit must be one of {SAMPLE_UNITS}, got {sample_unit!r}")
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    items = [{"shards": str(item)} if isinstance(item, (str, os.PathLike)) else item for item in sources]
    single = len(items) == 1
    parsed = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TypeError(f"source {i}: expected a shard spec string or a dict {{shards, weight, name}}, got {type(item).__name__}")
        unknown = set(item) - {"shards", "weight", "name"}
        if unknown:
            raise ValueError(f"source {i}: unknown keys {sorted(unknown)}; a source has only 'shards', 'weight' and 'name'")
        if "shards" not in item:
            raise ValueError(f"source {i}: missing 'shards' (a brace pattern such as /data/cc3m/{{00000..00331}}.tar)")
        name = str(item.get("name") or f"source{i}")
        urls = tuple(expand_shard_spec(item["shards"], name=f"source '{name}'"))
        weight = item.get("weight", "auto")
        auto = weight is None or weight == "auto"
        try:
            images, captions = shard_counts(urls, name=f"source '{name}'")
        except MissingCountsError:
            if auto and not single:
                raise
            images = captions = None
        if auto:
            weight = 1.0 if single else float(captions if sample_unit == "caption" else images)
        elif isinstance(weight, str):
            raise ValueError(f"source '{name}': weight must be a number or 'auto', got {weight!r}")
        weight = float(weight)
        if not weight > 0:
            raise ValueError(f"source '{name}': weight must be > 0, got {weight} (an empty source has no samples)")
        parsed.append(Source(name=name, shards=urls, weight=weight, images=images, captions=captions))
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
