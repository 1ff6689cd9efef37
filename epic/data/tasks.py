"""Downstream task data: METER/ALBEF JSON annotations, images from a folder or from shards, loaders, and the
shapes-world versions of every task.

Annotation files (a JSON list of records, the formats ALBEF ships and METER's arrow files hold):

  retrieval  {"image": "val2014/x.jpg", "caption": "..." | ["...", ...]}      (rows: one per caption)
  vqa        {"image": ..., "question": "...", "answer": ["yes", "yes", ...] | {"yes": 1.0} , "question_id": ...}
  nlvr2      {"images": ["a-img0.png", "a-img1.png"], "sentence": "...", "label": "True" | "False"}
  snli_ve    {"image": ..., "sentence": "...", "label": "entailment" | "neutral" | "contradiction"}

Images (`finetune.images`): a folder (record paths are relative to it; a bare file name is also looked up by its
base name) or a shard spec (`DIR/{00000..00012}.tar`): shard members are indexed once by their webdataset key
(file name up to the first dot) and a record's image is found by its base name without extension, so shards
written by img2dataset or tools/make_shards.py from the same images work.

Training loader: a seeded permutation per epoch, split across ranks, micro-batches in order; its state (epoch,
batches taken) is saved with the checkpoint and a resumed run continues with the very next batch; augmentation
is seeded by (seed, epoch, example) so resumed batches are identical. Evaluation loaders split the examples
(retrieval: the images) across ranks, as epic.eval expects.
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from epic.eval import nlvr2 as nlvr2_metric
from epic.eval import snli_ve as snli_metric
from epic.eval import vqa as vqa_metric

from .shards import expand_shard_spec
from .transforms import eval_transform, seeded_transform, train_transform

TASKS = ("retrieval", "vqa", "nlvr2", "snli_ve")


def _seed(*keys: int) -> int:
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


# ------------------------------------------------------------------------------------------------ images
class ImageFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_of(self, name: str) -> Path:
        for candidate in (self.root / name, self.root / Path(name).name):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"image {name!r} not found under {self.root} (looked for {self.root / name} and "
                                f"{self.root / Path(name).name}); check finetune.images")

    def load(self, name: str) -> Image.Image:
        with Image.open(self.path_of(name)) as image:
            return image.convert("RGB")


def image_key(name: str) -> str:
    """webdataset's key of a member / a record's image: base name up to the first dot."""
    return Path(name).name.split(".", 1)[0]


class ImageShards:
    """Random access to the images inside tar shards through an index of member offsets (headers read once)."""

    IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

    def __init__(self, spec: str):
        self.shards = expand_shard_spec(spec, name="finetune.images shards")
        self.index: dict[str, tuple[int, int, int]] = {}  # key -> (shard, offset, size)
        for shard_id, shard in enumerate(self.shards):
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith(self.IMAGE_EXTENSIONS):
                        self.index.setdefault(image_key(member.name), (shard_id, member.offset_data, member.size))
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def _read(self, shard_id: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker: open our own file handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard_id)
        if handle is None:
            handle = self._handles[shard_id] = open(self.shards[shard_id], "rb")
        handle.seek(offset)
        return handle.read(size)

    def load(self, name: str) -> Image.Image:
        key = image_key(name)
        if key not in self.index:
            raise FileNotFoundError(f"image {name!r} (key {key!r}) is in none of the {len(self.shards)} shards of "
                                    f"finetune.images")
        with Image.open(io.BytesIO(self._read(*self.index[key]))) as image:
            return image.convert("RGB")

    def __getstate__(self):  # handles do not cross process boundaries
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def open_images(spec: str):
    if spec is None:
        raise ValueError("finetune.images is not set: give the image folder or the image shards")
    if spec.endswith(".tar") or "{" in spec or "*" in spec or "::" in spec:
        return ImageShards(spec)
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"finetune.images={spec} is neither a folder nor a shard spec ending in .tar")
    return ImageFolder(spec)


# ------------------------------------------------------------------------------------------------ annotations
def read_records(path: str | Path, task: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task} annotation file {path} does not exist")
    with open(path) as f:
        records = json.load(f)
    if isinstance(records, dict) and "data" in records:
        records = records["data"]
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of {task} records")
    required = {"retrieval": ("image", "caption"), "vqa": ("image", "question"), "nlvr2": ("images", "sentence", "label"),
                "snli_ve": ("image", "sentence", "label")}[task]
    for i, record in enumerate(records):
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing} (a {task} record needs {list(required)}; "
                             f"see epic/data/tasks.py for the formats)")
    return records


def retrieval_images(records: list[dict]) -> list[tuple[str, list[str]]]:
    """(image, captions) per distinct image, in first-seen order; ALBEF's train files list one caption a row."""
    grouped: dict[str, list[str]] = {}
    for record in records:
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        grouped.setdefault(record["image"], []).extend(captions)
    return list(grouped.items())


# ------------------------------------------------------------------------------------------------ datasets
@dataclass
class TaskData:
    """One task split: examples as plain records + the image store + what the collate needs."""

    task: str
    examples: list[dict]  # per example: the fields its task reads (see _item)
    images: object
    answers: Sequence[str] = ()  # VQA answer list (class index = position)


def load_task_data(task: str, annotation: str, images: str, answers: Sequence[str] = (), for_training: bool = True) -> TaskData:
    records = read_records(annotation, task)
    store = open_images(images)
    if task == "retrieval":
        grouped = retrieval_images(records)
        if for_training:  # one example per caption, `image_id` tells the captions of one image apart
            examples = [{"image": img, "text": cap, "image_id": i} for i, (img, caps) in enumerate(grouped)
                        for cap in caps]
        else:  # one example per image, all its captions
            examples = [{"image": img, "captions": caps, "image_id": i} for i, (img, caps) in enumerate(grouped)]
    elif task == "vqa":
        index = {a: i for i, a in enumerate(answers)}
        if not index:
            raise ValueError("VQA needs an answer list (finetune.answer_list, or built from the training file)")
        examples = [{"image": r["image"], "text": r["question"],
                     "target": vqa_metric.target_vector(vqa_metric.answer_scores(r.get("answer", r.get("answers", []))),
                                                        index),
                     "question_id": r.get("question_id", i)} for i, r in enumerate(records)]
    elif task == "nlvr2":
        examples = []
        for r in records:
            if len(r["images"]) != 2:
                raise ValueError(f"NLVR2 record has {len(r['images'])} images, expected 2: {r}")
            examples.append({"images": list(r["images"]), "text": r["sentence"],
                             "label": nlvr2_metric.parse_label(r["label"])})
        kinds = [nlvr2_statement_kind(e["text"]) for e in examples]
        if examples and None not in kinds:  # the shapes world's statements: evaluation reports accuracy per kind
            for example, kind in zip(examples, kinds):
                example["kind"] = NLVR2_KINDS.index(kind)
    elif task == "snli_ve":
        examples = [{"image": r["image"], "text": r["sentence"], "label": snli_metric.parse_label(r["label"])}
                    for r in records]
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    return TaskData(task, examples, store, tuple(answers))


def answers_from_training_file(annotation: str, min_count: int = 1, max_answers: int = 0) -> list[str]:
    records = read_records(annotation, "vqa")
    return vqa_metric.build_answer_list((r.get("answer", r.get("answers", [])) for r in records), min_count,
                                        max_answers)


NEGATIVE_TEXT_SLOT = 7  # seed slot of the negative-caption draw (image slots are 0 and 1)


def draw_negative_captions(examples: Sequence[dict], index: int, count: int, rng: random.Random) -> list[int]:
    """`count` distinct caption examples of *other* images, uniformly (METER's draw_false_text: random captions of
    the training set; METER does not exclude the image's own captions or repeats, we do)."""
    own = examples[index]["image_id"]
    chosen: list[int] = []
    seen = set()
    while len(chosen) < count:
        candidate = rng.randrange(len(examples))
        if candidate not in seen and examples[candidate]["image_id"] != own:
            seen.add(candidate)
            chosen.append(candidate)
    return chosen


class TaskDataset(Dataset):
    """Map-style; an index is (epoch, example) so that augmentation is seeded per epoch and example.

    Retrieval training with `num_negative_texts` > 0: every item also carries that many captions of other images,
    drawn from the whole training set with a seed of (seed, epoch, example), so a resumed run sees the same ones.
    """

    def __init__(self, data: TaskData, image_size: int, training: bool, randaugment: bool, seed: int,
                 num_negative_texts: int = 0, normalization: str = "clip"):
        self.data, self.training, self.seed = data, training, seed
        self.transform = (train_transform(image_size, randaugment, normalization=normalization) if training
                          else eval_transform(image_size, normalization))
        self.num_negative_texts = num_negative_texts
        if num_negative_texts:
            if data.task != "retrieval" or not training:
                raise ValueError("negative captions are drawn only for retrieval training")
            per_image: dict[int, int] = {}
            for example in data.examples:
                per_image[example["image_id"]] = per_image.get(example["image_id"], 0) + 1
            fewest = len(data.examples) - max(per_image.values())
            if fewest < num_negative_texts:
                raise ValueError(f"finetune.num_negatives={num_negative_texts} but an image has only {fewest} captions "
                                 f"of other images in the training file; lower finetune.num_negatives")

    def __len__(self) -> int:
        return len(self.data.examples)

    def _pixels(self, name: str, epoch: int, index: int, slot: int = 0) -> torch.Tensor:
        image = self.data.images.load(name)
        if self.training:
            return seeded_transform(self.transform, image, _seed(self.seed, epoch, index, slot))
        return self.transform(image)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        example = self.data.examples[index]
        item = {"text": example.get("text")}
        if self.data.task == "nlvr2":
            item["pixel_values_0"] = self._pixels(example["images"][0], epoch, index, 0)
            item["pixel_values_1"] = self._pixels(example["images"][1], epoch, index, 1)
        else:
            item["pixel_values"] = self._pixels(example["image"], epoch, index)
        for field in ("label", "target", "image_id", "kind"):
            if field in example:
                item[field] = example[field]
        if self.num_negative_texts:
            rng = random.Random(_seed(self.seed, epoch, index, NEGATIVE_TEXT_SLOT))
            chosen = draw_negative_captions(self.data.examples, index, self.num_negative_texts, rng)
            item["negative_texts"] = [self.data.examples[i]["text"] for i in chosen]
            item["negative_examples"] = chosen
        return item


def make_collate(tokenizer, max_text_len: int):
    def collate(items: list[dict]) -> dict:
        batch = {}
        encoded = tokenizer([it["text"] for it in items], max_length=max_text_len, truncation=True,
                            padding="max_length", return_tensors="pt")
        batch["input_ids"] = encoded["input_ids"].long()
        batch["attention_mask"] = encoded["attention_mask"].long()
        for key in ("pixel_values", "pixel_values_0", "pixel_values_1"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items]).float()
        if "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if "target" in items[0]:
            batch["target_scores"] = torch.stack([it["target"] for it in items]).float()
        if "image_id" in items[0]:
            batch["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
        if "kind" in items[0]:
            batch["kinds"] = torch.tensor([it["kind"] for it in items], dtype=torch.long)
        if "negative_texts" in items[0]:  # retrieval: [B, n, L] captions of other images
            count = len(items[0]["negative_texts"])
            negatives = tokenizer([t for it in items for t in it["negative_texts"]], max_length=max_text_len,
                                  truncation=True, padding="max_length", return_tensors="pt")
            batch["negative_input_ids"] = negatives["input_ids"].long().view(len(items), count, -1)
            batch["negative_attention_mask"] = negatives["attention_mask"].long().view(len(items), count, -1)
            batch["negative_examples"] = torch.tensor([it["negative_examples"] for it in items], dtype=torch.long)
        return batch
    return collate


# ------------------------------------------------------------------------------------------------ training loader
def epoch_batches(num_examples: int, epoch: int, seed: int, rank: int, world_size: int,
                  batch_size: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of one epoch: a seeded permutation, dealt round-robin, incomplete batch dropped."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(_seed(seed, epoch)))
    per_rank = num_examples // world_size
    mine = order[rank::world_size][:per_rank].tolist()
    return [[(epoch, i) for i in mine[s:s + batch_size]] for s in range(0, per_rank - batch_size + 1, batch_size)]


class TaskTrainLoader:
    """Infinite, exactly resumable training batches over epochs (interface of epic.data's TrainLoader)."""

    def __init__(self, dataset: TaskDataset, collate, *, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int = 0):
        if len(dataset) // world_size < batch_size:
            raise ValueError(f"{len(dataset)} training examples cannot fill one micro-batch of {batch_size} on each "
                             f"of {world_size} ranks: lower data.micro_batch_size")
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = num_workers
        self.epoch, self.batch_in_epoch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return (len(self.dataset) // self.world_size) // self.batch_size

    def __iter__(self):
        while True:
            batches = epoch_batches(len(self.dataset), self.epoch, self.seed, self.rank, self.world_size,
                                    self.batch_size)[self.batch_in_epoch:]
            loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate,
                                num_workers=self.num_workers)
            for batch in loader:
                self.batch_in_epoch += 1  # counted when handed out, so prefetched batches are not
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "world_size": self.world_size, "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "num_examples"):
            mine = {"seed": self.seed, "world_size": self.world_size, "num_examples": len(self.dataset)}[key]
            if state.get(key) != mine:
                raise ValueError(f"cannot resume the task data stream: it was saved with {key}={state.get(key)}, "
                                 f"this run has {mine}")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    def skip_counts(self) -> dict:
        return {}


def build_task_train_loader(data: TaskData, tokenizer, *, image_size: int, max_text_len: int, batch_size: int,
                            seed: int, rank: int, world_size: int, randaugment: bool = True,
                            num_workers: int = 0, num_negative_texts: int = 0,
                            normalization: str = "clip") -> TaskTrainLoader:
    """`num_negative_texts` > 0 (retrieval): each row also brings that many random captions of other images;
    `normalization`: data.normalization (epic.data.transforms.NORMALIZATIONS)."""
    dataset = TaskDataset(data, image_size, training=True, randaugment=randaugment, seed=seed,
                          num_negative_texts=num_negative_texts, normalization=normalization)
    return TaskTrainLoader(dataset, make_collate(tokenizer, max_text_len), batch_size=batch_size, seed=seed,
                           rank=rank, world_size=world_size, num_workers=num_workers)


# ------------------------------------------------------------------------------------------------ eval loaders
class _RetrievalEvalRows(Dataset):
    """One item per image of this rank (image_index = its position in the file), with all its captions."""

    def __init__(self, data: TaskData, image_size: int, rank: int, world_size: int, normalization: str = "clip"):
        self.data, self.transform = data, eval_transform(image_size, normalization)
        self.mine = list(range(rank, len(data.examples), world_size))

    def __len__(self) -> int:
        return len(self.mine)

    def __getitem__(self, i: int) -> dict:
        index = self.mine[i]
        example = self.data.examples[index]
        return {"pixel_values": self.transform(self.data.images.load(example["image"])),
                "captions": example["captions"], "image_index": index}


def _retrieval_eval_collate(tokenizer, max_text_len: int):
    def collate(items: list[dict]) -> dict:
        rows = [(it["pixel_values"], caption, it["image_index"]) for it in items for caption in it["captions"]]
        encoded = tokenizer([c for _, c, _ in rows], max_length=max_text_len, truncation=True,
                            padding="max_length", return_tensors="pt")
        return {"pixel_values": torch.stack([p for p, _, _ in rows]).float(),
                "input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long(),
                "image_index": torch.tensor([i for _, _, i in rows], dtype=torch.long)}
    return collate


def build_task_eval_loader(data: TaskData, tokenizer, *, image_size: int, max_text_len: int, batch_size: int,
                           rank: int = 0, world_size: int = 1, num_workers: int = 0,
                           normalization: str = "clip") -> DataLoader:
    """Every example once across ranks (example i on rank i % world_size), in order, with the eval transform.

    Retrieval: rows are (image, caption) pairs with `image_index` (epic.eval.retrieval's contract); `batch_size`
    counts images there (each brings all its captions).
    """
    if data.task == "retrieval":
        return DataLoader(_RetrievalEvalRows(data, image_size, rank, world_size, normalization), batch_size=batch_size,
                          collate_fn=_retrieval_eval_collate(tokenizer, max_text_len), num_workers=num_workers)
    dataset = TaskDataset(data, image_size, training=False, randaugment=False, seed=0, normalization=normalization)
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                      collate_fn=make_collate(tokenizer, max_text_len), num_workers=num_workers)


def build_shuffled_eval_loader(data: TaskData, tokenizer, *, image_size: int, max_text_len: int, batch_size: int,
                               seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                               normalization: str = "clip") -> DataLoader:
    """One finite pass over the examples in a seeded order with the eval transform, full micro-batches only (as
    training deals them): for evaluations whose pairs are drawn inside a batch (ALBEF's NLVR2 text assignment), so
    the batches mix images and every rank runs the same number of them. The training loader would never end."""
    dataset = TaskDataset(data, image_size, training=False, randaugment=False, seed=seed, normalization=normalization)
    batches = epoch_batches(len(dataset), 0, seed, rank, world_size, batch_size)
    if not batches:
        raise ValueError(f"{len(dataset)} examples cannot fill one evaluation batch of {batch_size} on each of "
                         f"{world_size} ranks: lower eval.batch_size")
    return DataLoader(dataset, batch_sampler=[[index for _, index in batch] for batch in batches],
                      collate_fn=make_collate(tokenizer, max_text_len), num_workers=num_workers)


# ------------------------------------------------------------------------------------------------ shapes world
# Task versions of the shapes world: images from the same scene generator, annotations in the formats above.
#   vqa      "what colour is the background?", "how many squares are there?", "what colour is the circle?"
#   nlvr2    true/false statements about a pair of images (background, "there is a red circle in the left
#            image", "the left image contains more shapes than the right image"); the template is drawn first and
#            filled to be true or false, so the sentence alone does not give the label away
#   snli_ve  entailment / contradiction: a background or "there is a <colour> <shape>" statement made true or false;
#            neutral: statements the image cannot decide ("the circle is made of wood"); like SNLI-VE's
#            hypotheses, neutral ones are recognisable from the text
#   retrieval the scenes' captions (ALBEF layout: train one row per caption, val all captions per image)
NEUTRAL_STATEMENTS = ("the {shape} is made of {material}", "the picture was taken {when}",
                      "the {shape} belongs to {owner}", "someone drew the {shape} {when}")
MATERIALS = ("wood", "paper", "metal", "glass")
WHENS = ("yesterday", "last year", "in the morning", "at night")
OWNERS = ("a child", "my friend", "the teacher", "a painter")


def _scene_facts(scene: dict) -> dict:
    objs = scene["objects"]
    return {"background": scene["background"], "count": len(objs),
            "pairs": {(o["colour"], o["shape"]) for o in objs}, "colours": {o["colour"] for o in objs},
            "shapes": {o["shape"] for o in objs}}


def _vqa_example(scene: dict, image: str, rng: random.Random, qid: int) -> dict:
    from .synthetic import COUNT_WORDS, PLURALS

    facts = _scene_facts(scene)
    objs = scene["objects"]
    kinds = ["background", "count"]
    unique_shapes = [s for s in facts["shapes"] if sum(o["shape"] == s for o in objs) == 1 or len(facts["colours"]) == 1]
    if unique_shapes:
        kinds.append("colour")
    kind = rng.choice(kinds)
    if kind == "background":
        question, answer = "what colour is the background?", scene["background"]
    elif kind == "count":
        shape = rng.choice(sorted(facts["shapes"]))
        count = sum(o["shape"] == shape for o in objs)
        question, answer = f"how many {PLURALS[shape]} are there?", COUNT_WORDS[count]
    else:
        shape = rng.choice(sorted(unique_shapes))
        colour = next(o["colour"] for o in objs if o["shape"] == shape)
        question, answer = f"what colour is the {shape}?", colour
    return {"question_id": qid, "image": image, "question": question, "answer": [answer] * 10}


NLVR2_TEMPLATES = ("bg_one", "pair_in", "more", "bg_both", "relation", "binding")  # in NLVR2_KINDS' order


def _truth_statement(scenes: list[dict], want: bool, rng: random.Random, version: int = 1) -> str:
    """An NLVR2-style statement about (left, right) whose truth is `want`.

    The template is drawn first and its slots are then filled to make the statement true or false. From version 2
    on, a template is used for a pair of scenes only if the pair allows both a true and a false statement of it, so
    every template is as often true as false and the sentence alone tells nothing about the label (no language
    shortcut). Version 1 (kept as it was) accepts "both images have a <bg> background" for a false statement on
    any pair but for a true one only on pairs that share a background: a text-only classifier reads the label off
    that template.
    World version 2 adds the fine-grained kinds: a relation between the two objects of a pair scene (false: the
    inverse relation) and attribute binding (false pairs are a colour and a shape that are both in the image,
    on different objects, whenever the image has such a pair). A template that does not fit the pair is drawn
    again, so the kinds that fit fewer pairs (relation, binding) are rarer: see _balanced_pair.
    """
    templates = NLVR2_TEMPLATES[:4] + (NLVR2_TEMPLATES[4:] if version >= 2 else ())
    while True:
        template = rng.choice(templates)
        side = rng.randrange(2)
        statement = _statement_of(template, side, scenes, want, rng, version)
        if statement is not None:
            return statement


def _statement_of(template: str, side: int, scenes: list[dict], want: bool, rng: random.Random,
                  version: int) -> Optional[str]:
    """One template's statement about (left, right) with truth `want`, about image `side` where the template names
    one; None where the template does not fit the pair (for either label, from version 2 on)."""
    from .synthetic import BACKGROUNDS, RELATIONS, SHAPES, world_tables

    COLOURS = world_tables(version)["colours"]  # noqa: N806
    facts = [_scene_facts(s) for s in scenes]
    sides = ("left", "right")
    if template == "relation":
        scene = scenes[side]
        if scene["scene"] != "pair":
            return None
        first, second = scene["objects"]
        relation = scene["relation"] if want else RELATIONS[scene["relation"]][1]
        phrase = RELATIONS[relation][0].replace("*", "")
        return (f"in the {sides[side]} image the {first['colour']} {first['shape']} is {phrase} the "
                f"{second['colour']} {second['shape']}")
    if template == "binding":
        pairs = facts[side]["pairs"]
        swapped = sorted({(c, s) for c in facts[side]["colours"] for s in facts[side]["shapes"]} - pairs)
        if not swapped:
            return None
        colour, shape = rng.choice(sorted(pairs) if want else swapped)
        return f"the {sides[side]} image has a {colour} {shape}"
    if template == "bg_one":
        actual = facts[side]["background"]
        bg = actual if want else rng.choice(sorted(set(BACKGROUNDS) - {actual}))
        return f"the {sides[side]} image has a {bg} background"
    if template == "pair_in":
        present = sorted(facts[side]["pairs"])
        absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - facts[side]["pairs"])
        colour, shape = rng.choice(present if want else absent)
        return f"there is a {colour} {shape} in the {sides[side]} image"
    if template == "more":
        counts = (facts[0]["count"], facts[1]["count"])
        if counts[0] == counts[1]:
            return None
        more = 0 if counts[0] > counts[1] else 1
        side = more if want else 1 - more
        return f"the {sides[side]} image contains more shapes than the {sides[1 - side]} image"
    backgrounds = {f["background"] for f in facts}  # "bg_both"
    if version >= 2:  # only pairs that share a background, for either label (else "both images have" is a
        if len(backgrounds) != 1:  # false statement three times as often as a true one: a language shortcut)
            return None
        shared = backgrounds.pop()
        bg = shared if want else rng.choice(sorted(set(BACKGROUNDS) - {shared}))
        return f"both images have a {bg} background"
    if want and len(backgrounds) == 1:  # version 1, unchanged
        return f"both images have a {backgrounds.pop()} background"
    if not want:
        bg = rng.choice(sorted(BACKGROUNDS))
        if not all(f["background"] == bg for f in facts):
            return f"both images have a {bg} background"
    return None


BALANCED_TRIES = 10_000  # a template fits about one random pair in ten (binding) or more often


def _balanced_pair(template: str, left: int, scenes: Sequence[dict], names: Sequence[str], want: bool,
                   rng: random.Random, version: int) -> tuple[int, str]:
    """(right image, statement) of a given template with image `left` on the left: right images (and the side the
    statement names) are drawn until the template fits the pair, so every kind is as frequent as any other
    (version 2 or later: whether a template fits does not depend on the label, so the pairing tells nothing)."""
    for _ in range(BALANCED_TRIES):
        right = rng.randrange(len(scenes))
        statement = _statement_of(template, rng.randrange(2), [scenes[left], scenes[right]], want, rng, version)
        if statement is not None:
            return right, statement
    raise ValueError(f"no pair of the split's {len(scenes)} images with {names[left]} on the left fits NLVR2's "
                     f"{template!r} statements after {BALANCED_TRIES} draws: generate more images, or leave "
                     "nlvr2_balanced off")


def _nlvr2_examples(scenes: Sequence[dict], names: Sequence[str], rng: random.Random, version: int,
                    per_image: int, balanced: bool) -> list[dict]:
    """`per_image` statements with each image on the left, alternately true and false; balanced: the templates
    in turn (each kind as often as any other), else drawn per pair (_truth_statement)."""
    examples = []
    for index in range(len(scenes) * per_image):
        left, want = index // per_image, index % 2 == 0
        if balanced:
            template = NLVR2_TEMPLATES[(index // 2) % len(NLVR2_TEMPLATES)]  # both labels of each template
            right, statement = _balanced_pair(template, left, scenes, names, want, rng, version)
        else:
            right = rng.randrange(len(scenes))
            statement = _truth_statement([scenes[left], scenes[right]], want, rng, version)
        examples.append({"images": [names[left], names[right]], "sentence": statement,
                         "label": "True" if want else "False"})
    return examples


NLVR2_KINDS = ("background (one image)", "background (both images)", "object present", "more shapes (counting)",
               "relation", "attribute binding")


def nlvr2_statement_kind(sentence: str) -> Optional[str]:
    """Which of _truth_statement's templates wrote `sentence` (one of NLVR2_KINDS); None for any other sentence.
    "attribute binding" ("the left image has a red circle") is false of an image holding a red object and a circle,
    apart; "object present" ("there is a red circle in the left image") is false of an image without one."""
    one_image = sentence.startswith(("the left image has a ", "the right image has a "))
    if one_image and sentence.endswith(" background"):
        return NLVR2_KINDS[0]
    if sentence.startswith("both images have a ") and sentence.endswith(" background"):
        return NLVR2_KINDS[1]
    if sentence.startswith("there is a ") and sentence.endswith((" in the left image", " in the right image")):
        return NLVR2_KINDS[2]
    if " image contains more shapes than the " in sentence:
        return NLVR2_KINDS[3]
    if sentence.startswith(("in the left image the ", "in the right image the ")):
        return NLVR2_KINDS[4]
    return NLVR2_KINDS[5] if one_image else None


def _snli_example(scene: dict, image: str, label: str, rng: random.Random, version: int = 1) -> dict:
    from .synthetic import BACKGROUNDS, SHAPES, world_tables

    COLOURS = world_tables(version)["colours"]  # noqa: N806

    facts = _scene_facts(scene)
    shape = rng.choice(sorted(facts["shapes"]))
    if label == "neutral":
        template = rng.choice(NEUTRAL_STATEMENTS)
        text = template.format(shape=shape, material=rng.choice(MATERIALS), when=rng.choice(WHENS),
                               owner=rng.choice(OWNERS))
    else:  # template first, then slots that make it true (entailment) or false (contradiction)
        want = label == "entailment"
        if rng.random() < 0.5:
            actual = facts["background"]
            bg = actual if want else rng.choice(sorted(set(BACKGROUNDS) - {actual}))
            text = f"the background is {bg}"
        else:
            absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - facts["pairs"])
            colour, shape = rng.choice(sorted(facts["pairs"]) if want else absent)
            text = f"there is a {colour} {shape}"
    return {"image": image, "sentence": text, "label": label}


def generate_shapes_tasks(out: str | Path, n_train: int = 512, n_val: int = 128, image_size: int = 64,
                          seed: int = 0, write_shards: bool = True, version: int = 1, nlvr2_per_image: int = 1,
                          nlvr2_balanced: bool = False) -> Path:
    """Write OUT/tasks: images/ (+ image_shards/), {retrieval,vqa,nlvr2,snli_ve}/{train,val}.json, vqa/answers.json.

    Pure function of the arguments. Images are scenes of the pretraining generator in their own seed space;
    `version` is the shapes-world version (epic.data.synthetic; 2 adds NLVR2's relation and binding statements).
    NLVR2 has `nlvr2_per_image` statements with each image on the left (half of them true); `nlvr2_balanced`
    (version 2 or later) gives every statement kind the same share instead of the share of pairs it fits.
    """
    if nlvr2_per_image < 1:
        raise ValueError(f"nlvr2_per_image must be at least 1, got {nlvr2_per_image}")
    if nlvr2_balanced and version < 2:
        raise ValueError("nlvr2_balanced needs world version 2 or later (version 1's 'both images' statements fit "
                         "a pair depending on their label)")
    from .synthetic import encode_jpeg, make_captions, render_scene, sample_scene

    if n_train < 2 or n_val < 2:
        raise ValueError(f"need at least 2 train and 2 val images, got {n_train} and {n_val}")
    root = Path(out) / "tasks"
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train": n_train, "val": n_val}
    annotations: dict[str, dict[str, list]] = {t: {} for t in TASKS}
    shard_rows = []
    for split, count in splits.items():
        rng = random.Random(f"shapes-tasks/{seed}/{split}")
        scenes, names = [], []
        for index in range(count):
            scene_rng = random.Random(f"shapes-tasks/{seed}/{split}/{index}")
            scene = sample_scene(scene_rng, version)
            captions, _ = make_captions(scene, scene_rng)
            name = f"{split}_{index:05d}.jpg"
            data = encode_jpeg(render_scene(scene, image_size))
            (root / "images" / name).write_bytes(data)
            shard_rows.append((name, data))
            scenes.append({**scene, "captions": captions})
            names.append(name)
        annotations["retrieval"][split] = (
            [{"image": n, "caption": c, "image_id": i} for i, (n, s) in enumerate(zip(names, scenes))
             for c in s["captions"]] if split == "train" else
            [{"image": n, "caption": s["captions"]} for n, s in zip(names, scenes)])
        annotations["vqa"][split] = [_vqa_example(s, n, rng, qid) for qid, (s, n) in
                                     enumerate((s, n) for s, n in zip(scenes, names) for _ in range(2))]
        annotations["nlvr2"][split] = _nlvr2_examples(scenes, names, rng, version, nlvr2_per_image, nlvr2_balanced)
        labels = ("entailment", "neutral", "contradiction")
        annotations["snli_ve"][split] = [_snli_example(s, n, labels[(i + k) % 3], rng, version)
                                         for i, (s, n) in enumerate(zip(scenes, names)) for k in range(2)]
    for task, per_split in annotations.items():
        (root / task).mkdir(exist_ok=True)
        for split, records in per_split.items():
            (root / task / f"{split}.json").write_text(json.dumps(records, indent=0) + "\n")
    answers = vqa_metric.build_answer_list(r["answer"] for r in annotations["vqa"]["train"])
    (root / "vqa" / "answers.json").write_text(json.dumps(answers) + "\n")
    if write_shards:
        import webdataset as wds

        (root / "image_shards").mkdir(exist_ok=True)
        with wds.TarWriter(str(root / "image_shards" / "00000.tar"), encoder=False, mtime=0) as writer:
            for name, data in shard_rows:
                writer.write({"__key__": image_key(name), "jpg": data})
    nlvr2_options = {**({"nlvr2_per_image": nlvr2_per_image} if nlvr2_per_image != 1 else {}),
                     **({"nlvr2_balanced": True} if nlvr2_balanced else {})}  # only where not the default
    (root / "manifest.json").write_text(json.dumps({"n_train": n_train, "n_val": n_val, "image_size": image_size,
                                                    "seed": seed, "tasks": list(TASKS),
                                                    **({"version": version} if version != 1 else {}),
                                                    **nlvr2_options},
                                                   indent=1) + "\n")
    return root


def shapes_task_paths(root: str | Path, task: str) -> dict:
    """finetune.* settings for a shapes-world task folder (OUT/tasks)."""
    root = Path(root)
    if (root / "tasks").is_dir() and not (root / task).is_dir():
        root = root / "tasks"
    paths = {"train_json": str(root / task / "train.json"), "val_json": str(root / task / "val.json"),
             "images": str(root / "images")}
    if task == "vqa":
        paths["answer_list"] = str(root / "vqa" / "answers.json")
    return paths


def main(argv=None) -> int:
    """`python -m epic.data.tasks --out DIR [--train N --val M --image-size S --seed K --world-version V
    --nlvr2-per-image K --nlvr2-balanced]` writes DIR/tasks."""
    import argparse

    parser = argparse.ArgumentParser(description=generate_shapes_tasks.__doc__)
    parser.add_argument("--out", required=True, help="the shapes world folder (tasks/ is written inside)")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--val", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-version", type=int, default=1, choices=(1, 2),
                        help="shapes-world version (2: fine-grained NLVR2 statements, no text leaks)")
    parser.add_argument("--nlvr2-per-image", type=int, default=1, help="NLVR2 statements with each image on the left")
    parser.add_argument("--nlvr2-balanced", action="store_true",
                        help="every NLVR2 statement kind equally often (version 2; default: as often as it fits)")
    args = parser.parse_args(argv)
    try:
        root = generate_shapes_tasks(args.out, args.train, args.val, args.image_size, args.seed,
                                     version=args.world_version, nlvr2_per_image=args.nlvr2_per_image,
                                     nlvr2_balanced=args.nlvr2_balanced)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps({"tasks": str(root), "train": args.train, "val": args.val}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
