"""The shapes world: generated image-caption data whose captions mix content words and filler words.

Each image shows coloured shapes on a plain background, in one of three scenes:
  * single: one object (colour, shape, size, position: left/right/top/bottom/center),
  * pair:   two objects in a relation (to the left of / to the right of / above / below),
  * count:  two to four identical objects.
Its 3-5 captions are filled-in templates. Words that fill a slot are *content words* (colour, shape, size,
position, relation, count, background: only the image tells them); template words are *filler* ("a picture of",
"there is", "in this image we can see", ...: language alone predicts them). Each sample's JSON records, per
caption, one content flag per whitespace word, so saliency hit-rate and the modality-bias gap can be measured.

Layout (img2dataset's): DIR/{train,val}/NNNNN.tar holding {key}.jpg, {key}.txt (first caption) and {key}.json
({"key", "caption": [...], "content_words": [[bool, ...], ...], "objects": [...], "background", "scene",
"regions": [...]}),
DIR/{train,val}/counts.json (images and captions per shard, epic.data.shards), DIR/manifest.json (counts, seed, shard lists) and DIR/tokenizer (byte-level BPE, RoBERTa specials, HF format).
Everything is a pure function of the seed: same seed, identical bytes.

Regions (X-VLM's region data): "regions" holds one entry per object, {"caption": "the small red circle" (count
scenes add the quadrant: "... at the top left"), "content_words": flags, "attributes": {"size", "colour", "shape"
[, "position"]}, "bbox": [x, y, w, h]} with the box in pixels of the stored image: the smallest integer box that
holds every pixel the object is drawn on. They are derived from the scene, drawing no random numbers, so images
and captions are the same as without them.

Augmentation note: colour, count and position are labels here, so the train transform must not change colours
(RandAugment without colour ops, paper App. F) and must not flip; objects stay inside the central 80% of the
image so that a mild random resized crop keeps them.
"""
from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from .shards import write_shard_counts

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
SIZES = {"small": 0.09, "large": 0.16}  # radius as a fraction of the image side
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# Single-object anchors (fraction of the side) and the phrase naming them; the last word is the content word.
POSITIONS = {
    "left": ((0.27, 0.5), "on the left"),
    "right": ((0.73, 0.5), "on the right"),
    "top": ((0.5, 0.27), "at the top"),
    "bottom": ((0.5, 0.73), "at the bottom"),
    "center": ((0.5, 0.5), "in the center"),
}
# "A <relation> B": the phrase (content word marked with *) and the inverse relation.
RELATIONS = {
    "left": ("to the *left of", "right"),
    "right": ("to the *right of", "left"),
    "above": ("*above", "below"),
    "below": ("*below", "above"),
}
CONTENT_VOCABULARY = frozenset(
    [*COLOURS, *BACKGROUNDS, *SHAPES, *PLURALS.values(), *SIZES, *COUNT_WORDS.values(), *POSITIONS, *RELATIONS]
)

# Templates: {slot} is filled with content words (a slot value may be a phrase whose filler words are unmarked
# and content words are *marked); "a~" is the article a/an chosen by the next word; everything else is filler.
SINGLE_TEMPLATES = (
    "a~ picture of a~ {size} {colour} {shape} {where}",
    "there is a~ {colour} {shape} {where} of the image",
    "in this image we can see a~ {size} {shape} that is {colour}",
    "a~ {colour} {shape} on a~ {background} background",
    "this photo shows {count} {size} {colour} {shape}",
    "the {shape} {where} is {colour}",
    "a~ {background} background with a~ {size} {colour} {shape} {where}",
    "here we see a~ {shape} that is {size} and {colour}",
    "an image of a~ {colour} {shape} on a~ {background} background",
)
PAIR_TEMPLATES = (
    "a~ {colour1} {shape1} {relation} a~ {colour2} {shape2}",
    "a~ picture of a~ {colour2} {shape2} {inverse} a~ {colour1} {shape1}",
    "in this image we can see {count} shapes on a~ {background} background",
    "the {colour1} {shape1} is {relation} the {colour2} {shape2}",
    "a~ {size1} {shape1} and a~ {size2} {shape2} on a~ {background} background",
    "there is a~ {size1} {colour1} {shape1} {relation} a~ {size2} {colour2} {shape2}",
)
COUNT_TEMPLATES = (
    "a~ picture of {count} {colour} {shapes}",
    "there are {count} {size} {colour} {shapes} on a~ {background} background",
    "in this image we can see {count} {shapes} and they are all {colour}",
    "{count} {size} {shapes} on a~ {background} background",
    "this photo shows {count} {colour} {shapes} of the same size",
    "we can see exactly {count} {shapes} in this picture",
)
SCENES = ("single", "pair", "count")
MIN_CAPTIONS, MAX_CAPTIONS = 3, 5
JPEG_QUALITY = 95
FIXED_MTIME = 0  # tar member mtime, so that shards are byte-identical for a seed


# ----------------------------------------------------------------------------------------------- scene sampling
def _obj(shape: str, colour: str, size: str, x: float, y: float) -> dict:
    return {"shape": shape, "colour": colour, "size": size, "x": round(x, 4), "y": round(y, 4), "radius": SIZES[size]}


def _jitter(rng: random.Random, amount: float = 0.04) -> float:
    return rng.uniform(-amount, amount)


def sample_scene(rng: random.Random) -> dict:
    """Attributes of one image: scene kind, background and the objects (positions are fractions of the side)."""
    kind = rng.choice(SCENES)
    background = rng.choice(sorted(BACKGROUNDS))
    if kind == "single":
        position = rng.choice(sorted(POSITIONS))
        (x, y), _ = POSITIONS[position]
        obj = _obj(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES)), x + _jitter(rng), y + _jitter(rng))
        return {"scene": kind, "background": background, "position": position, "objects": [obj]}
    if kind == "pair":
        while True:  # the two objects must be distinguishable by colour or shape
            c1, c2 = rng.choice(sorted(COLOURS)), rng.choice(sorted(COLOURS))
            s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
            if c1 != c2 or s1 != s2:
                break
        relation = rng.choice(sorted(RELATIONS))
        near, far, mid = 0.28, 0.72, 0.5
        first, second = {"left": ((near, mid), (far, mid)), "right": ((far, mid), (near, mid)),
                         "above": ((mid, near), (mid, far)), "below": ((mid, far), (mid, near))}[relation]
        objs = [
            _obj(s1, c1, rng.choice(sorted(SIZES)), first[0] + _jitter(rng, 0.03), first[1] + _jitter(rng, 0.03)),
            _obj(s2, c2, rng.choice(sorted(SIZES)), second[0] + _jitter(rng, 0.03), second[1] + _jitter(rng, 0.03)),
        ]
        return {"scene": kind, "background": background, "relation": relation, "objects": objs}
    count = rng.randint(2, 4)
    shape, colour, size = rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES))
    cells = rng.sample([(0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7)], count)  # one object per quadrant
    objs = [_obj(shape, colour, size, x + _jitter(rng, 0.03), y + _jitter(rng, 0.03)) for x, y in cells]
    return {"scene": kind, "background": background, "objects": objs}


# ------------------------------------------------------------------------------------------------------ drawing
def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * math.sqrt(3) / 2, cy + r / 2), (cx - r * math.sqrt(3) / 2, cy + r / 2)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: dict, image_size: int) -> Image.Image:
    """Draw the scene's objects on its background colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        cx, cy, r = obj["x"] * image_size, obj["y"] * image_size, obj["radius"] * image_size
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_points(obj["shape"], cx, cy, r), fill=fill)
    return image


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps small shapes' colours
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------- captions
def _phrase(text: str) -> list[tuple[str, bool]]:
    """A slot value: words marked with a leading * are content words, the others filler."""
    return [(w[1:], True) if w.startswith("*") else (w, False) for w in text.split()]


def _slots(scene: dict) -> dict[str, list[tuple[str, bool]]]:
    objs = scene["objects"]
    slots = {"background": _phrase("*" + scene["background"]), "count": _phrase("*" + COUNT_WORDS[len(objs)])}
    if scene["scene"] == "single":
        obj = objs[0]
        slots.update(colour=_phrase("*" + obj["colour"]), shape=_phrase("*" + obj["shape"]), size=_phrase("*" + obj["size"]))
        words = POSITIONS[scene["position"]][1].split()
        slots["where"] = _phrase(" ".join(words[:-1] + ["*" + words[-1]]))
    elif scene["scene"] == "pair":
        for i, obj in enumerate(objs, start=1):
            slots.update({f"colour{i}": _phrase("*" + obj["colour"]), f"shape{i}": _phrase("*" + obj["shape"]),
                          f"size{i}": _phrase("*" + obj["size"])})
        phrase, inverse = RELATIONS[scene["relation"]]
        slots["relation"], slots["inverse"] = _phrase(phrase), _phrase(RELATIONS[inverse][0])
    else:
        obj = objs[0]
        slots.update(colour=_phrase("*" + obj["colour"]), shapes=_phrase("*" + PLURALS[obj["shape"]]), size=_phrase("*" + obj["size"]))
    return slots


def fill_template(template: str, slots: dict[str, list[tuple[str, bool]]]) -> tuple[str, list[bool]]:
    """Caption text and one content flag per whitespace word."""
    words: list[tuple[str, bool]] = []
    for token in template.split():
        if token.startswith("{") and token.endswith("}"):
            words.extend(slots[token[1:-1]])
        else:
            words.append((token, False))
    for i, (word, flag) in enumerate(words):  # articles agree with the next word
        if word == "a~":
            words[i] = ("an" if i + 1 < len(words) and words[i + 1][0][0] in "aeiou" else "a", flag)
    return " ".join(w for w, _ in words), [f for _, f in words]


def make_captions(scene: dict, rng: random.Random) -> tuple[list[str], list[list[bool]]]:
    """3-5 distinct captions of the scene with their per-word content flags."""
    templates = {"single": SINGLE_TEMPLATES, "pair": PAIR_TEMPLATES, "count": COUNT_TEMPLATES}[scene["scene"]]
    if scene["scene"] == "pair" and scene["objects"][0]["shape"] == scene["objects"][1]["shape"]:
        templates = tuple(t for t in templates if "{colour1}" in t)  # shapes alone would not tell them apart
    chosen = rng.sample(templates, min(len(templates), rng.randint(MIN_CAPTIONS, MAX_CAPTIONS)))
    slots = _slots(scene)
    filled = [fill_template(t, slots) for t in chosen]
    return [c for c, _ in filled], [f for _, f in filled]


# ------------------------------------------------------------------------------------------------------ regions
def object_pixel_box(obj: dict, image_size: int) -> list[int]:
    """[x, y, w, h] (integers, pixels) holding every pixel ``render_scene`` draws for ``obj``: PIL fills pixel
    column i only if the shape reaches into [i - 1, i + 1), so floor(min) .. floor(max) + 1 covers it, within one
    pixel of tight on each side."""
    cx, cy, r = obj["x"] * image_size, obj["y"] * image_size, obj["radius"] * image_size
    points = [(cx - r, cy - r), (cx + r, cy + r)] if obj["shape"] == "circle" else _shape_points(obj["shape"], cx, cy, r)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x1, y1 = min(image_size, math.floor(max(xs)) + 1), min(image_size, math.floor(max(ys)) + 1)
    return [x0, y0, x1 - x0, y1 - y0]


def quadrant(obj: dict) -> str:
    """'top left' / 'top right' / 'bottom left' / 'bottom right' of the object's centre."""
    return f"{'top' if obj['y'] < 0.5 else 'bottom'} {'left' if obj['x'] < 0.5 else 'right'}"


def make_regions(scene: dict, image_size: int) -> list[dict]:
    """One region per object: its caption (unique within the image), content flags, attributes and pixel box."""
    regions = []
    for obj in scene["objects"]:
        words = [("the", False), (obj["size"], True), (obj["colour"], True), (obj["shape"], True)]
        attributes = {"size": obj["size"], "colour": obj["colour"], "shape": obj["shape"]}
        if scene["scene"] == "count":  # identical objects: the quadrant tells them apart
            vertical, horizontal = quadrant(obj).split()
            words += [("at", False), ("the", False), (vertical, True), (horizontal, True)]
            attributes["position"] = quadrant(obj)
        regions.append({"caption": " ".join(w for w, _ in words), "content_words": [f for _, f in words],
                        "attributes": attributes, "bbox": object_pixel_box(obj, image_size)})
    return regions


# ------------------------------------------------------------------------------------------------------ writing
def sample_key(shard: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: shard number then index within the shard, zero-padded."""
    return f"{shard:05d}{index:0{max(4, len(str(samples_per_shard - 1)))}d}"


def make_sample(seed: int, split: str, index: int, image_size: int, key: str) -> dict:
    rng = random.Random(f"shapes-world/{seed}/{split}/{index}")
    scene = sample_scene(rng)
    captions, flags = make_captions(scene, rng)
    meta = {"key": key, "caption": captions, "content_words": flags, **scene, "regions": make_regions(scene, image_size)}
    return {
        "__key__": key,
        "jpg": encode_jpeg(render_scene(scene, image_size)),
        "txt": captions[0].encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        "captions": captions,
    }


def write_split(out: Path, split: str, count: int, image_size: int, seed: int, samples_per_shard: int) -> tuple[list[str], list[str]]:
    """Write one split's shards; returns (shard paths relative to `out`, all captions in order)."""
    import webdataset as wds

    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    shards, captions, counts = [], [], {}
    for shard in range(math.ceil(count / samples_per_shard)):
        path = split_dir / f"{shard:05d}.tar"
        before = len(captions)
        indices = range(shard * samples_per_shard, min(count, (shard + 1) * samples_per_shard))
        with wds.TarWriter(str(path), encoder=False, mtime=FIXED_MTIME) as writer:
            for index in indices:
                key = sample_key(shard, index - shard * samples_per_shard, samples_per_shard)
                sample = make_sample(seed, split, index, image_size, key)
                captions.extend(sample.pop("captions"))
                writer.write(sample)
        shards.append(str(path.relative_to(out)))
        counts[path.name] = {"images": len(indices), "captions": len(captions) - before}
    write_shard_counts(split_dir, counts)
    return shards, captions


def train_tokenizer(captions: Sequence[str], out_dir: Path, vocab_size: int = 2000) -> None:
    """Byte-level BPE with RoBERTa's specials (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4), saved in HF format."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a word is one token anywhere
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")), trim_offsets=True, add_prefix_space=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        pad_token="<pad>", unk_token="<unk>", mask_token=AddedToken("<mask>", lstrip=True, normalized=False),
        model_max_length=512)
    hf.save_pretrained(str(out_dir))


def generate_shapes_world(out, n_train: int, n_val: int, image_size: int = 96, seed: int = 0,
                          samples_per_shard: int = 1000, vocab_size: int = 2000) -> Path:
    """Write the shapes world to `out` (train/, val/, tokenizer/, manifest.json); returns the output path."""
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    if image_size < 16:
        raise ValueError(f"image_size {image_size} is too small to tell shapes apart; use 16 or more (default 96)")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_shards, train_captions = write_split(out, "train", n_train, image_size, seed, samples_per_shard)
    val_shards, val_captions = write_split(out, "val", n_val, image_size, seed, samples_per_shard) if n_val else ([], [])
    train_tokenizer(train_captions + val_captions, out / "tokenizer", vocab_size)
    manifest = {
        "dataset": "shapes_world",
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "splits": {
            "train": {"count": n_train, "captions": len(train_captions), "shards": train_shards},
            "val": {"count": n_val, "captions": len(val_captions), "shards": val_shards},
        },
        "tokenizer": "tokenizer",
        "content_vocabulary": sorted(CONTENT_VOCABULARY),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def shard_spec(out, split: str) -> str:
    """Brace pattern naming all shards of a split of a generated shapes world (e.g. for build_train_loader)."""
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    shards = manifest["splits"][split]["shards"]
    if not shards:
        raise ValueError(f"split '{split}' of {out} has no shards")
    last = len(shards) - 1
    return str(Path(out) / split / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))
