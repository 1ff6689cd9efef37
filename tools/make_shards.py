#!/usr/bin/env python
"""Convert an image-caption annotation JSON (ALBEF / X-VLM style) plus an image root into webdataset shards.

    python tools/make_shards.py --annotations coco.json [vg.json ...] --image-root DIR --out DIR
        [--shard-size 10000] [--workers N] [--seed 0 | --no-shuffle] [--no-verify]

Input: JSON lists of {"image": path relative to --image-root, "caption": str or [str], ...} (the files ALBEF and
X-VLM ship for COCO, VG, SBU, CC3M, CC12M). Entries naming the same image are merged into one sample with all its
captions (so a batch never holds the same image twice), then the samples are shuffled with --seed (shards are
read sequentially at training time) unless --no-shuffle.

Output, in img2dataset's layout so the training loader reads both alike: DIR/NNNNN.tar with {key}.<ext> (the
original image bytes; ext jpg/png/webp as detected), {key}.txt (first caption) and {key}.json ({"key", "caption":
[captions], "image": relative path}); DIR/NNNNN_stats.json per shard; DIR/sizes.json ({"NNNNN.tar": count}); DIR/counts.json (images and captions per
shard: the training loader's source weights `auto` and its epoch length come from it);
DIR/report.json (missing and broken images, entries without captions, counts); DIR/plan.json (the inputs).

Region data for X-VLM (--regions): the annotation files are in X-VLM's region layout (its coco_objs, vg_objs and
vg_regions files: {"image", "caption" (optional), "elems": [{"caption": str or [str], "bb": [x, y, w, h],
"attributes": optional}]}), or COCO instances files (instances_train2017.json: images / annotations / categories;
each object becomes a region captioned with its category name) given with --coco-instances. Entries naming the
same image are merged; each sample's .json then also holds "regions": [{"caption", "attributes", "bbox"}] (boxes
in pixels of the stored image; boxes that are empty or leave the image are dropped and counted in the report).
Samples with regions but no whole-image caption carry "caption": [] and no .txt: the caption loader skips them,
the region loader (epic.data.regions) reads them.

Resumable: a shard is written to a temporary name and renamed when complete; a rerun keeps completed shards and
writes only the others (a rerun with different inputs into the same DIR is refused). Shards that img2dataset
wrote itself (`img2dataset --output_format webdataset`) need no conversion: point the training config at them.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epic.data.shards import count_shard, write_shard_counts  # noqa: E402
from epic.data.synthetic import sample_key  # noqa: E402

PIL_FORMAT_TO_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
FIXED_MTIME = 0


# --------------------------------------------------------------------------------------------- annotations
def load_annotations(paths) -> tuple[list[dict], list[str]]:
    """Merged samples [{"image": rel_path, "caption": [str, ...]}] in first-appearance order, and the images left
    with no non-empty caption (reported, not written). Malformed files or entries stop with a message."""
    merged: dict[str, list] = {}
    for path in paths:
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exn:
            raise SystemExit(f"error: cannot read annotation file {path}: {exn}")
        if not isinstance(entries, list):
            raise SystemExit(f"error: {path} must hold a JSON list of {{\"image\", \"caption\"}} entries")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
                raise SystemExit(f"error: {path} entry {i} lacks 'image' or 'caption' (got {str(entry)[:120]})")
            captions = [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise SystemExit(f"error: {path} entry {i}: 'caption' must be a string or a list of strings")
            bucket = merged.setdefault(str(entry["image"]), [])
            bucket.extend(c.strip() for c in captions if c.strip() and c.strip() not in bucket)
    samples = [{"image": image, "caption": captions} for image, captions in merged.items() if captions]
    return samples, [image for image, captions in merged.items() if not captions]


def _box(value, where: str) -> list:
    if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
        raise SystemExit(f"error: {where}: box must be [x, y, w, h] numbers, got {str(value)[:80]}")
    return [float(v) for v in value]


def load_region_annotations(paths, coco_instances=()) -> list[dict]:
    """Merged region samples [{"image", "caption": [str], "regions": [{"caption", "attributes", "bbox"}]}] from
    X-VLM region-layout files and COCO instances files, in first-appearance order."""
    merged: dict[str, dict] = {}

    def bucket(image: str) -> dict:
        return merged.setdefault(image, {"image": image, "caption": [], "regions": []})

    for path in paths:
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exn:
            raise SystemExit(f"error: cannot read annotation file {path}: {exn}")
        if not isinstance(entries, list):
            raise SystemExit(f"error: {path} must hold a JSON list of {{\"image\", \"elems\"}} entries (X-VLM layout)")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry or not isinstance(entry.get("elems", []), list):
                raise SystemExit(f"error: {path} entry {i} lacks 'image' or has a non-list 'elems'")
            sample = bucket(str(entry["image"]))
            captions = entry.get("caption", [])
            for c in [captions] if isinstance(captions, str) else captions:
                if isinstance(c, str) and c.strip() and c.strip() not in sample["caption"]:
                    sample["caption"].append(c.strip())
            for j, elem in enumerate(entry.get("elems", [])):
                if not isinstance(elem, dict) or "caption" not in elem or "bb" not in elem:
                    raise SystemExit(f"error: {path} entry {i} elem {j} lacks 'caption' or 'bb'")
                region = {"caption": elem["caption"], "bbox": _box(elem["bb"], f"{path} entry {i} elem {j}")}
                if "attributes" in elem:
                    region["attributes"] = elem["attributes"]
                sample["regions"].append(region)
    for path in coco_instances:
        try:
            coco = json.loads(Path(path).read_text())
            files = {im["id"]: im["file_name"] for im in coco["images"]}
            names = {c["id"]: c["name"] for c in coco["categories"]}
            annotations = coco["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as exn:
            raise SystemExit(f"error: {path} is not a COCO instances file (images / annotations / categories): {exn}")
        for ann in annotations:
            if ann.get("iscrowd", 0) or ann.get("image_id") not in files:
                continue  # crowd regions have no single object to name
            bucket(files[ann["image_id"]])["regions"].append(
                {"caption": names[ann["category_id"]], "bbox": _box(ann["bbox"], f"{path} annotation {ann.get('id')}")})
    return [s for s in merged.values() if s["regions"] or s["caption"]]


def clean_regions(regions: list, width: int, height: int) -> tuple[list, int]:
    """Regions whose box is non-empty and inside the image (1 px slack, then clipped); and how many were dropped."""
    kept = []
    for region in regions:
        x, y, w, h = region["bbox"]
        if w <= 0 or h <= 0 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            continue
        x0, y0 = max(0.0, x), max(0.0, y)
        kept.append(dict(region, bbox=[x0, y0, min(width, x + w) - x0, min(height, y + h) - y0]))
    return kept, len(regions) - len(kept)


def make_plan(args, samples: list[dict]) -> dict:
    digest = hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()
    plan = {"annotations": [str(Path(p).resolve()) for p in args.annotations], "image_root": str(Path(args.image_root).resolve()),
            "shard_size": args.shard_size, "shuffle_seed": None if args.no_shuffle else args.seed,
            "samples": len(samples), "samples_sha256": digest}
    if getattr(args, "regions", False):
        plan["regions"] = True
        plan["coco_instances"] = [str(Path(p).resolve()) for p in args.coco_instances]
    return plan


# --------------------------------------------------------------------------------------------------- writing
def read_image(path: Path, verify: bool):
    """(bytes, ext) or (None, problem) with problem 'missing' or a description of why the image is broken."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as exn:
        return None, f"unreadable: {exn}"
    if not data:
        return None, "empty file"
    ext = {"jpeg": "jpg"}.get(path.suffix.lower().lstrip("."), path.suffix.lower().lstrip("."))
    if verify or ext not in PIL_FORMAT_TO_EXT.values():
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
                image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads the whole stream
                image.load()
        except Exception as exn:  # PIL raises many exception types for bad files
            return None, f"broken: {type(exn).__name__}: {exn}"
        if fmt not in PIL_FORMAT_TO_EXT:
            return None, f"broken: unsupported format {fmt} (convert to jpg/png/webp)"
        ext = PIL_FORMAT_TO_EXT[fmt]
    return data, ext


def write_shard(task: dict) -> dict:
    """Write one shard (temporary name, then rename) and its stats; returns the stats."""
    import webdataset as wds

    out, shard, samples = Path(task["out"]), task["shard"], task["samples"]
    image_root, verify, shard_size = Path(task["image_root"]), task["verify"], task["shard_size"]
    stats = {"shard": f"{shard:05d}.tar", "count": 0, "captions": 0, "missing": [], "broken": [], "regions": 0,
             "regions_dropped": 0}
    tmp = out / f"{shard:05d}.tar.tmp{os.getpid()}"
    with wds.TarWriter(str(tmp), encoder=False, mtime=FIXED_MTIME) as writer:
        for index, sample in enumerate(samples):
            data, ext = read_image(image_root / sample["image"], verify)
            if data is None:
                (stats["missing"] if ext == "missing" else stats["broken"]).append(
                    sample["image"] if ext == "missing" else {"image": sample["image"], "problem": ext})
                continue
            key = sample_key(shard, index, shard_size)
            meta = {"key": key, "caption": sample["caption"], "image": sample["image"]}
            if "regions" in sample:
                from PIL import Image

                with Image.open(io.BytesIO(data)) as image:
                    meta["regions"], dropped = clean_regions(sample["regions"], *image.size)
                stats["regions"] += len(meta["regions"])
                stats["regions_dropped"] += dropped
                if not meta["regions"] and not sample["caption"]:
                    continue
            member = {"__key__": key, ext: data, "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
            if sample["caption"]:
                member["txt"] = sample["caption"][0].encode("utf-8")
            writer.write(member)
            stats["count"] += 1
            stats["captions"] += len(sample["caption"])
    stats_path = out / f"{shard:05d}_stats.json"
    stats_path.with_suffix(".tmp").write_text(json.dumps(stats, indent=1))
    os.replace(stats_path.with_suffix(".tmp"), stats_path)
    os.replace(tmp, out / f"{shard:05d}.tar")  # last: a shard counts as done only when complete
    return stats


def shard_done(out: Path, shard: int) -> bool:
    return (out / f"{shard:05d}.tar").is_file() and (out / f"{shard:05d}_stats.json").is_file()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", nargs="*", default=[], help="annotation JSON file(s)")
    parser.add_argument("--regions", action="store_true",
                        help="annotations are X-VLM region files (image, caption, elems: [{caption, bb, attributes}])")
    parser.add_argument("--coco-instances", nargs="*", default=[],
                        help="COCO instances JSON file(s): objects become regions (implies --regions)")
    parser.add_argument("--image-root", required=True, help="folder the 'image' paths are relative to")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples (images) per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shards written in parallel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the annotation order")
    parser.add_argument("--no-verify", action="store_true", help="do not decode images (faster; broken ones reach training, which skips them)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    args.regions = args.regions or bool(args.coco_instances)
    if not args.annotations and not args.coco_instances:
        parser.error("give --annotations (and/or --coco-instances with --regions)")
    if not Path(args.image_root).is_dir():
        print(f"error: --image-root {args.image_root} is not a folder", file=sys.stderr)
        return 2

    from tqdm import tqdm

    if args.regions:
        samples, without_caption = load_region_annotations(args.annotations, args.coco_instances), []
    else:
        samples, without_caption = load_annotations(args.annotations)
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args, samples)
    plan_path = out / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        print(f"error: {out} holds shards made from different inputs ({plan_path}); use a new --out or empty it",
              file=sys.stderr)
        return 2
    plan_path.write_text(json.dumps(plan, indent=1))

    for stale in out.glob("*.tar.tmp*"):  # left by an interrupted run
        stale.unlink()
    num_shards = (len(samples) + args.shard_size - 1) // args.shard_size
    tasks = [{"out": str(out), "shard": s, "samples": samples[s * args.shard_size:(s + 1) * args.shard_size],
              "image_root": args.image_root, "verify": not args.no_verify, "shard_size": args.shard_size}
             for s in range(num_shards) if not shard_done(out, s)]
    reused = num_shards - len(tasks)
    with tqdm(total=len(samples), unit="img", desc=f"shards -> {out}") as progress:
        progress.update(len(samples) - sum(len(t["samples"]) for t in tasks))
        if args.workers > 1 and len(tasks) > 1:
            with Pool(min(args.workers, len(tasks))) as pool:
                for stats in pool.imap_unordered(write_shard, tasks):
                    progress.update(stats["count"] + len(stats["missing"]) + len(stats["broken"]))
        else:
            for task in tasks:
                write_shard(task)
                progress.update(len(task["samples"]))

    all_stats = [json.loads((out / f"{s:05d}_stats.json").read_text()) for s in range(num_shards)]
    sizes = {st["shard"]: st["count"] for st in all_stats}
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    if any("captions" not in st for st in all_stats):  # stats of shards written before captions were counted
        counts = {st["shard"]: count_shard(str(out / st["shard"])) for st in all_stats}
    else:
        counts = {st["shard"]: {"images": st["count"], "captions": st["captions"]} for st in all_stats}
    write_shard_counts(out, counts)
    report = {
        "images": len(samples),
        "written": sum(sizes.values()),
        "captions": sum(c["captions"] for c in counts.values()),
        "shards": num_shards,
        "shards_reused": reused,
        "missing": [m for st in all_stats for m in st["missing"]],
        "broken": [b for st in all_stats for b in st["broken"]],
        "without_caption": without_caption,
    }
    if args.regions:
        report["regions"] = sum(st.get("regions", 0) for st in all_stats)
        report["regions_dropped"] = sum(st.get("regions_dropped", 0) for st in all_stats)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in report.items()} | {"report": str(out / "report.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
