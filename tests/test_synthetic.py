"""The shapes world: determinism, captions that agree with the image, tokenizer round-trip, content-token mask."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from epic.data.synthetic import BACKGROUNDS, COLOURS, CONTENT_VOCABULARY, COUNT_WORDS, PLURALS, generate_shapes_world
from epic.data.text import content_token_mask, load_tokenizer


def file_digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def read_samples(tar_path: Path) -> list[dict]:
    """Members of a shard grouped by key (plain tarfile, independent of the pipeline)."""
    samples: dict = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [dict(v, key=k) for k, v in samples.items()]


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    kwargs = dict(n_train=24, n_val=8, image_size=32, samples_per_shard=10)
    a = file_digests(generate_shapes_world(tmp_path / "a", seed=3, **kwargs))
    b = file_digests(generate_shapes_world(tmp_path / "b", seed=3, **kwargs))
    c = file_digests(generate_shapes_world(tmp_path / "c", seed=4, **kwargs))
    assert a == b
    assert {"train/00000.tar", "train/00002.tar", "val/00000.tar", "manifest.json", "tokenizer/tokenizer.json"} <= set(a)
    assert a["train/00000.tar"] != c["train/00000.tar"] and a["val/00000.tar"] != c["val/00000.tar"]


def test_manifest_and_layout(shapes_world):
    manifest = json.loads((shapes_world / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 256 and manifest["splits"]["val"]["count"] == 64
    assert manifest["splits"]["train"]["shards"] == [f"train/{i:05d}.tar" for i in range(4)]
    samples = read_samples(shapes_world / "train" / "00001.tar")
    assert len(samples) == 64 and all({"jpg", "txt", "json"} <= set(s) for s in samples)
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["key"] and s["txt"].decode() == meta["caption"][0]
        assert 3 <= len(meta["caption"]) <= 5 and len(set(meta["caption"])) == len(meta["caption"])


def test_train_and_val_images_are_disjoint(shapes_world):
    def image_hashes(split):
        return {hashlib.sha256(s["jpg"]).hexdigest() for p in (shapes_world / split).glob("*.tar") for s in read_samples(p)}

    train, val = image_hashes("train"), image_hashes("val")
    assert len(train) == 256 and len(val) == 64 and not train & val


def test_content_words_are_the_image_attributes(shapes_world):
    """Flags mark exactly the content vocabulary, and every content word is true of the scene."""
    for sample in read_samples(shapes_world / "train" / "00000.tar"):
        meta = json.loads(sample["json"])
        objects = meta["objects"]
        allowed = {meta["background"], COUNT_WORDS[len(objects)]}
        allowed |= {o["colour"] for o in objects} | {o["shape"] for o in objects} | {o["size"] for o in objects}
        allowed |= {PLURALS[o["shape"]] for o in objects}
        allowed |= {meta.get("position"), meta.get("relation"), {"left": "right", "right": "left", "above": "below",
                                                                  "below": "above"}.get(meta.get("relation"))}
        for caption, flags in zip(meta["caption"], meta["content_words"]):
            words = caption.split()
            assert len(words) == len(flags)
            for word, is_content in zip(words, flags):
                assert is_content == (word in CONTENT_VOCABULARY), (caption, word)
                if is_content:
                    assert word in allowed, (caption, word, meta)


def test_colours_are_decidable_from_the_pixels(shapes_world):
    """Each object's centre pixel shows its colour and the corner shows the background (JPEG tolerance)."""
    for sample in read_samples(shapes_world / "val" / "00000.tar"):
        meta = json.loads(sample["json"])
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(int)
        side = image.shape[0]
        assert np.abs(image[1, 1] - BACKGROUNDS[meta["background"]]).max() < 30
        for obj in meta["objects"]:
            centre = image[int(obj["y"] * side), int(obj["x"] * side)]
            assert np.abs(centre - COLOURS[obj["colour"]]).max() < 40, (obj, centre)


def test_tokenizer_round_trip_with_auto_tokenizer(shapes_world):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(str(shapes_world / "tokenizer"))
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id) == (0, 1, 2, 4)
    for sample in read_samples(shapes_world / "val" / "00000.tar")[:16]:
        for caption in json.loads(sample["json"])["caption"]:
            encoded = tokenizer(caption)["input_ids"]
            assert encoded[0] == 0 and encoded[-1] == 2 and 3 not in encoded
            assert tokenizer.decode(encoded, skip_special_tokens=True).strip() == caption


def test_content_mask_hand_case(shapes_world):
    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    caption = "a picture of a reddish circle on the left"
    flags = [False, False, False, False, True, True, False, False, True]
    mask = content_token_mask(caption, flags, tokenizer, max_length=20)
    ids = tokenizer(caption, max_length=20, truncation=True, padding="max_length")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    reddish = [i for i, t in enumerate(tokens) if t not in ("<s>", "</s>", "<pad>")][4:-4]  # the unseen word's pieces
    assert len(reddish) >= 2, tokens  # "reddish" is not in the training captions: several BPE pieces
    expected = [i in reddish or t in ("Ġcircle", "Ġleft") for i, t in enumerate(tokens)]
    assert mask.tolist() == expected
    assert mask.shape == (20,)
    with pytest.raises(ValueError, match="whitespace words"):
        content_token_mask(caption, flags[:-1], tokenizer)


def test_world_version_2_has_no_text_leaks_of_content_words():
    """Version 2: a content word's filler context no longer names it (the modality-bias study needs that)."""
    import random
    from collections import Counter, defaultdict

    from epic.data.synthetic import make_captions, sample_scene, world_tables

    contexts = defaultdict(Counter)  # two filler words before a content word -> the content words seen there
    for i in range(3000):
        rng = random.Random(i)
        scene = sample_scene(rng, 2)
        for caption, flags in zip(*make_captions(scene, rng)):
            words = caption.split()
            assert "orange" not in words
            assert not any(flags[j] for j in range(1, len(words)) if words[j - 1] == "an"), caption  # a/an
            for j, (word, content) in enumerate(zip(words, flags)):
                if content and j >= 2 and not flags[j - 1] and not flags[j - 2]:
                    contexts[(words[j - 2], words[j - 1])][word] += 1
    assert world_tables(2)["positions"]["center"][1] == "at the center"
    # every position word follows "at the"; no filler context fixes its content word
    assert {w for w in contexts[("at", "the")]} >= {"left", "right", "top", "bottom", "center"}
    for context, seen in contexts.items():
        assert len(seen) > 1, (context, seen)
    with pytest.raises(ValueError, match="version"):
        world_tables(3)


def test_world_version_1_is_the_default_and_unchanged(tmp_path):
    import random

    from epic.data.synthetic import make_captions, sample_scene

    rng = random.Random(0)
    scene = sample_scene(rng)
    assert "version" not in scene and make_captions(scene, rng)  # v1 scenes carry no version field
    manifest = json.loads((generate_shapes_world(tmp_path / "v2", n_train=4, n_val=2, image_size=32,
                                                 version=2) / "manifest.json").read_text())
    assert manifest["version"] == 2 and "pink" in manifest["content_vocabulary"]


def nlvr2_statements(version: int, count: int, seed: int) -> list[tuple[str, bool]]:
    """NLVR2 statements as generate_shapes_tasks draws them (image i with a random image j, labels alternating)."""
    import random

    from epic.data.synthetic import sample_scene
    from epic.data.tasks import _truth_statement

    rng = random.Random(seed)
    scenes = [sample_scene(random.Random(f"{seed}/{i}"), version) for i in range(count)]
    return [(_truth_statement([scenes[i], scenes[rng.randrange(count)]], i % 2 == 0, rng, version), i % 2 == 0)
            for i in range(count)]


def test_every_nlvr2_statement_is_told_its_template_kind():
    """nlvr2_statement_kind names the template of each generated statement (the per-kind NLVR2 accuracy): one
    hand-written statement per kind, every kind drawn by version 2 (version 1 has no relation or binding)."""
    from collections import Counter

    from epic.data.tasks import NLVR2_KINDS, nlvr2_statement_kind

    hand = ["the left image has a red background", "both images have a black background",
            "there is a red circle in the right image", "the right image contains more shapes than the left image",
            "in the left image the purple triangle is to the right of the pink diamond",
            "the right image has a red diamond"]
    assert [nlvr2_statement_kind(s) for s in hand] == list(NLVR2_KINDS)
    assert nlvr2_statement_kind("the dog is asleep") is None
    for version, kinds in ((1, NLVR2_KINDS[:4]), (2, NLVR2_KINDS)):
        drawn = Counter(nlvr2_statement_kind(s) for s, _ in nlvr2_statements(version, 1000, seed=0))
        assert set(drawn) == set(kinds), (version, drawn)


def test_v2_nlvr2_statements_tell_nothing_about_their_label():
    """A text-only classifier is at chance on version 2's NLVR2 statements, and every template is as often true as
    false; on version 1 (kept as it was) the same classifier reads the label off "both images have ...", which
    shows the probe can see a shortcut."""
    from collections import Counter

    from epic.studies.text_prior import text_only_accuracy

    v2 = nlvr2_statements(2, 4000, seed=0)
    assert text_only_accuracy(v2, nlvr2_statements(2, 2000, seed=1)) < 0.53
    per_template = Counter((" ".join(s.split()[:3]), label) for s, label in v2)
    for template in {t for t, _ in per_template}:
        true, false = per_template[(template, True)], per_template[(template, False)]
        assert abs(true - false) <= 4 * (true + false) ** 0.5, (template, true, false)
    assert text_only_accuracy(nlvr2_statements(1, 4000, seed=0), nlvr2_statements(1, 2000, seed=1)) > 0.54


def statement_is_true(sentence: str, scenes: list[dict]) -> bool:
    """An NLVR2 statement's truth read off the two scenes, independently of the generator's templates."""
    import re

    def has(scene, colour, shape):
        return any(o["colour"] == colour and o["shape"] == shape for o in scene["objects"])

    side = {"left": 0, "right": 1}
    if m := re.fullmatch(r"the (left|right) image has an? (\w+) background", sentence):
        return scenes[side[m[1]]]["background"] == m[2]
    if m := re.fullmatch(r"both images have an? (\w+) background", sentence):
        return all(s["background"] == m[1] for s in scenes)
    if m := re.fullmatch(r"there is an? (\w+) (\w+) in the (left|right) image", sentence):
        return has(scenes[side[m[3]]], m[1], m[2])
    if m := re.fullmatch(r"the (left|right) image contains more shapes than the (left|right) image", sentence):
        return len(scenes[side[m[1]]]["objects"]) > len(scenes[side[m[2]]]["objects"])
    if m := re.fullmatch(r"in the (left|right) image the (\w+) (\w+) is (.+) the (\w+) (\w+)", sentence):
        scene = scenes[side[m[1]]]
        first, second = scene["objects"]
        words = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
        assert (first["colour"], first["shape"], second["colour"], second["shape"]) == m.group(2, 3, 5, 6)
        return words[m[4]] == scene["relation"]
    m = re.fullmatch(r"the (left|right) image has an? (\w+) (\w+)", sentence)
    assert m, sentence
    return has(scenes[side[m[1]]], m[2], m[3])


def nlvr2_task(tmp_path, **options) -> tuple[list[dict], dict[str, dict]]:
    """(NLVR2 train examples, scene of each image name) of generate_shapes_tasks with `options`."""
    import random

    from epic.data.synthetic import sample_scene
    from epic.data.tasks import generate_shapes_tasks

    root = generate_shapes_tasks(tmp_path, n_train=300, n_val=4, image_size=8, write_shards=False, version=2,
                                 **options)
    scenes = {f"train_{i:05d}.jpg": sample_scene(random.Random(f"shapes-tasks/0/train/{i}"), 2) for i in range(300)}
    return json.loads((root / "nlvr2" / "train.json").read_text()), scenes


@pytest.mark.parametrize("options", [{}, {"nlvr2_per_image": 3, "nlvr2_balanced": True}],
                         ids=["drawn", "balanced-3-per-image"])
def test_every_nlvr2_label_is_the_statements_truth_about_its_images(tmp_path, options):
    examples, scenes = nlvr2_task(tmp_path, **options)
    for example in examples:
        truth = statement_is_true(example["sentence"], [scenes[name] for name in example["images"]])
        assert truth == (example["label"] == "True"), example


def test_balanced_nlvr2_gives_every_kind_and_label_the_same_share(tmp_path):
    """nlvr2_balanced: each (kind, label) within one of the others; drawn per pair (the default) the fine-grained
    kinds are rare. nlvr2_per_image: every image is on the left that many times, half of them true."""
    from collections import Counter

    from epic.data.tasks import NLVR2_KINDS, nlvr2_statement_kind

    examples, _ = nlvr2_task(tmp_path / "balanced", nlvr2_per_image=4, nlvr2_balanced=True)
    assert len(examples) == 1200
    assert Counter(e["images"][0] for e in examples) == Counter({f"train_{i:05d}.jpg": 4 for i in range(300)})
    shares = Counter((nlvr2_statement_kind(e["sentence"]), e["label"]) for e in examples)
    assert set(shares) == {(k, label) for k in NLVR2_KINDS for label in ("True", "False")}
    assert max(shares.values()) - min(shares.values()) <= 1, shares
    drawn = Counter(nlvr2_statement_kind(e["sentence"]) for e in nlvr2_task(tmp_path / "drawn")[0])
    assert drawn["attribute binding"] < drawn["background (one image)"] / 2, drawn


def test_nlvr2_options_reject_what_they_cannot_make(tmp_path):
    from epic.data.tasks import generate_shapes_tasks

    with pytest.raises(ValueError, match="nlvr2_per_image"):
        generate_shapes_tasks(tmp_path, 4, 2, image_size=8, write_shards=False, version=2, nlvr2_per_image=0)
    with pytest.raises(ValueError, match="version 2"):
        generate_shapes_tasks(tmp_path, 4, 2, image_size=8, write_shards=False, version=1, nlvr2_balanced=True)
    with pytest.raises(ValueError, match="fits NLVR2's .* statements"):  # too few images for every kind to fit
        generate_shapes_tasks(tmp_path, 8, 4, image_size=8, write_shards=False, version=2, nlvr2_per_image=2,
                              nlvr2_balanced=True)
