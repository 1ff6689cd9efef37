"""The data pipeline: batch contract, MLM masking, exact resume across ranks x workers, mixture weights, skipped
corrupt samples by reason, the eval loader's one-pass split, transforms without colour ops, inspect_data."""
from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from epic.data import build_eval_loader, build_train_loader, load_tokenizer, shard_spec
from epic.data.loader import shard_for_visit
from epic.data.shards import SKIP_REASONS
from epic.data.synthetic import CONTENT_VOCABULARY
from epic.data.text import mask_tokens_for_mlm
from epic.data.transforms import CLIP_MEAN, CLIP_STD, COLOUR_OPS, RandAugmentNoColour, seeded_transform

CONTRACT_KEYS = {"pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "special_tokens_mask",
                 "content_mask", "keys", "caption_index", "shards", "real_lengths"}
TRAIN_ONLY_KEYS = {"shards"}  # with caption_index, what the saliency cache looks alpha up by
ROOT = Path(__file__).resolve().parents[1]


def train_loader(world, sources=None, *, rank=0, world_size=1, num_workers=0, batch_size=4, state=None, **kw):
    return build_train_loader(sources or shard_spec(world, "train"), world / "tokenizer", image_size=16, max_text_len=16,
                              batch_size=batch_size, num_workers=num_workers, seed=7, rank=rank, world_size=world_size,
                              state=state, **kw)


def take(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["shards"] == y["shards"] and x["real_lengths"] == y["real_lengths"]
        for name in CONTRACT_KEYS - {"keys", "shards", "real_lengths"}:
            assert torch.equal(x[name], y[name]), name


# ---------------------------------------------------------------------------------------------- batch contract
def test_batch_has_exactly_the_contract_keys_and_types(shapes_world):
    batch = take(train_loader(shapes_world, batch_size=6), 1)[0]
    assert set(batch) == CONTRACT_KEYS
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    for name in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        assert batch[name].shape == (6, 16) and batch[name].dtype == torch.int64
    for name in ("special_tokens_mask", "content_mask"):
        assert batch[name].dtype == torch.bool
    assert batch["caption_index"].shape == (6,) and batch["caption_index"].dtype == torch.int64
    assert len(batch["shards"]) == 6 and all(url.endswith(".tar") for url in batch["shards"])
    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    ids, special = batch["input_ids"], batch["special_tokens_mask"]
    assert torch.equal(special, (ids == 0) | (ids == 1) | (ids == 2))
    assert torch.equal(batch["attention_mask"].bool(), ids != tokenizer.pad_token_id)
    assert not (batch["content_mask"] & special).any() and batch["content_mask"].any()
    for row in range(6):  # content tokens are exactly the content-vocabulary words of the caption
        words = tokenizer.decode(ids[row][batch["content_mask"][row]].tolist()).split()
        fillers = tokenizer.decode(ids[row][~batch["content_mask"][row] & ~special[row]].tolist()).split()
        assert words and set(words) <= CONTENT_VOCABULARY and not set(fillers) & CONTENT_VOCABULARY
    selected = batch["mlm_labels"] != -100
    assert not (selected & special).any()
    assert torch.equal(batch["mlm_labels"][selected], ids[selected])
    assert torch.equal(batch["mlm_input_ids"][~selected], ids[~selected])


def test_mlm_masking_is_80_10_10_over_real_tokens_only():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 400, (400, 50), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, 40:] = True
    replacement = torch.arange(5, 400)
    masked, labels = mask_tokens_for_mlm(ids, special, 4, replacement, 0.15, generator)
    selected = labels != -100
    assert not (selected & special).any()
    assert abs(selected[~special].float().mean().item() - 0.15) < 0.01
    to_mask = (masked == 4) & selected
    kept = (masked == ids) & selected
    changed = selected & ~to_mask & ~kept
    n = selected.sum().item()
    assert abs(to_mask.sum().item() / n - 0.8) < 0.03
    assert abs(kept.sum().item() / n - 0.1) < 0.03 + 1 / 395  # a random draw can equal the original
    assert abs(changed.sum().item() / n - 0.1) < 0.03
    assert (masked[changed] >= 5).all() and torch.equal(masked[~selected], ids[~selected])


# ----------------------------------------------------------------------------------------- resumable stream
def test_exact_resume_across_two_ranks_and_two_workers(shapes_world):
    """K batches, save, resume in a fresh loader: identical to the uninterrupted stream; ranks differ."""
    first, rest = 3, 3  # odd: the resumed loader must start from the second worker's stream
    keys_by_rank = []
    for rank in range(2):
        uninterrupted = take(train_loader(shapes_world, rank=rank, world_size=2, num_workers=2), first + rest)
        interrupted = train_loader(shapes_world, rank=rank, world_size=2, num_workers=2)
        head = take(interrupted, first)  # the workers have prefetched more than this by now
        state = json.loads(json.dumps(interrupted.state_dict()))
        assert state["batches"] == first
        resumed = train_loader(shapes_world, rank=rank, world_size=2, num_workers=2, state=state)
        assert_same_batches(head + take(resumed, rest), uninterrupted)
        keys_by_rank.append([k for b in uninterrupted for k in b["keys"]])
    assert keys_by_rank[0] != keys_by_rank[1]


def test_concurrent_streams_read_different_shards(shapes_world):
    """2 ranks x 2 workers, one open shard each, 4 shards: the first epoch deals every stream its own shard."""
    shards = [{k[:5] for b in take(train_loader(shapes_world, rank=r, world_size=2, num_workers=2, shards_open=1), 2)
               for k in b["keys"]} for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]


def test_resume_in_process_and_iterating_again_continue_the_stream(shapes_world):
    loader = train_loader(shapes_world)
    full = take(train_loader(shapes_world), 4)
    assert_same_batches(take(loader, 2) + take(loader, 2), full)  # a second iter() continues where the first stopped


def test_resume_with_other_settings_is_refused(shapes_world):
    loader = train_loader(shapes_world, rank=0, world_size=2)
    take(loader, 1)
    with pytest.raises(ValueError, match="world_size"):
        train_loader(shapes_world, rank=0, world_size=1, state=loader.state_dict())


def test_shard_visits_deal_each_epoch_permutation_to_the_streams():
    for streams in (1, 2, 3, 8):
        visits = [shard_for_visit(0, 5, 11, s, streams, v) for v in range(10) for s in range(streams)]
        for epoch in range(len(visits) // 5):  # in global visit order every shard appears once per epoch
            ordered = sorted(range(len(visits)), key=lambda i: (i % streams) + (i // streams) * streams)
            assert sorted(visits[i] for i in ordered[epoch * 5:(epoch + 1) * 5]) == list(range(5))


def test_mixture_weights_are_sample_shares(shapes_world):
    train = shapes_world / "train"
    sources = [{"name": "a", "shards": str(train / "{00000..00001}.tar"), "weight": 3.0},
               {"name": "b", "shards": str(train / "{00002..00003}.tar"), "weight": 1.0}]
    batches = take(train_loader(shapes_world, sources, batch_size=20, randaugment=False), 25)
    keys = [k for b in batches for k in b["keys"]]
    share_a = sum(k[:5] in ("00000", "00001") for k in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.06, share_a


def test_missing_shards_fail_at_build_time_naming_them(shapes_world):
    with pytest.raises(FileNotFoundError, match=r"00005\.tar.*all listed shards must exist"):
        train_loader(shapes_world, str(shapes_world / "train" / "{00000..00005}.tar"))
    with pytest.raises(FileNotFoundError, match="nothing"):
        train_loader(shapes_world, [{"name": "nothing", "shards": str(shapes_world / "nowhere" / "*.tar")}])


# ------------------------------------------------------------------------------------------ corrupt samples
def jpeg_bytes(colour=(200, 20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def dirty_shards(tmp_path_factory):
    """One tar with a sample per sample-level problem (plus two good ones), one truncated tar, one empty file."""
    root = tmp_path_factory.mktemp("dirty")
    good = jpeg_bytes()
    write_tar(root / "bad.tar", [
        ("good1.jpg", good), ("good1.txt", b"a red square"),
        ("badimg.jpg", b"this is not a jpeg"), ("badimg.txt", b"a caption"),
        ("zero.jpg", b""), ("zero.txt", b"a caption"),
        ("nocap.jpg", good),
        ("blank.jpg", good), ("blank.txt", b"   \n"),
        ("latin.jpg", good), ("latin.txt", "caf\xe9".encode("latin-1")),
        ("noimage.txt", b"a caption without an image"),
        ("badjson.jpg", good), ("badjson.json", b"{not json"),
        ("good2.png", good), ("good2.json", json.dumps({"caption": ["", "a red square"]}).encode()),
    ])
    full = write_tar(root / "full.tar", [m for i in range(3) for m in [(f"t{i}.jpg", good), (f"t{i}.txt", b"a red square")]])
    data = full.read_bytes()
    third_jpeg = data.index(b"t2.jpg")  # header of the third sample's image
    (root / "truncated.tar").write_bytes(data[: third_jpeg + 512 + 100])  # cut inside that image's bytes
    (root / "empty.tar").write_bytes(b"")
    return root


def test_every_corruption_is_skipped_and_counted_once_in_one_pass(dirty_shards, shapes_world):
    loader = build_eval_loader([str(dirty_shards / n) for n in ("bad.tar", "truncated.tar", "empty.tar")],
                               shapes_world / "tokenizer", image_size=16, max_text_len=16, batch_size=4)
    keys = [k for batch in loader for k in batch["keys"]]
    assert keys == ["good1", "good2", "t0", "t1"]
    assert loader.skip_counts() == {reason: 0 for reason in SKIP_REASONS} | {
        "bad_image": 1, "empty_file": 2, "missing_caption": 1, "empty_caption": 1, "bad_text": 2, "missing_image": 1,
        "truncated_tar": 1}


def test_training_stream_survives_corruption_and_reports_skips(dirty_shards, shapes_world):
    sources = {"shards": [str(dirty_shards / n) for n in ("bad.tar", "truncated.tar", "empty.tar")]}
    loader = train_loader(shapes_world, sources, batch_size=4, num_workers=2)
    batches = take(loader, 6)
    assert {k for b in batches for k in b["keys"]} <= {"good1", "good2", "t0", "t1"}
    counts = loader.skip_counts()
    assert all(counts[r] > 0 for r in SKIP_REASONS if r not in ("unreadable_shard", "bad_tar")), counts
    assert loader.state_dict()["skips"] == {k: v for k, v in counts.items() if v}


def test_all_bad_shards_stop_with_a_clear_error(dirty_shards, shapes_world):
    only_bad = write_tar(dirty_shards / "only_bad.tar", [("x.jpg", b"junk"), ("x.txt", b"caption")])
    with pytest.raises(RuntimeError, match="in a row were unusable"):
        take(train_loader(shapes_world, str(only_bad), max_consecutive_skips=50), 1)


# ---------------------------------------------------------------------------------------------- evaluation
def test_eval_loader_visits_each_image_once_across_ranks(shapes_world):
    manifest = json.loads((shapes_world / "manifest.json").read_text())
    ranks_of_image, rows = {}, 0
    for rank in range(2):
        loader = build_eval_loader(shard_spec(shapes_world, "val"), shapes_world / "tokenizer", image_size=16,
                                   max_text_len=16, batch_size=24, rank=rank, world_size=2, num_workers=rank)
        for batch in loader:
            assert set(batch) == (CONTRACT_KEYS - TRAIN_ONLY_KEYS) | {"image_index"}
            rows += len(batch["keys"])
            for index, key in zip(batch["image_index"].tolist(), batch["keys"]):
                ranks_of_image.setdefault((index, key), set()).add(rank)
    assert sorted(i for i, _ in ranks_of_image) == list(range(64))  # one key per index, every index once
    assert all(len(ranks) == 1 for ranks in ranks_of_image.values())
    assert rows == manifest["splits"]["val"]["captions"]
    single = build_eval_loader(shard_spec(shapes_world, "val"), shapes_world / "tokenizer", image_size=16,
                               max_text_len=16, batch_size=24, all_captions=False)
    assert [i for b in single for i in b["image_index"].tolist()] == list(range(64))


# ---------------------------------------------------------------------------------------------- transforms
def centre_pixel_changes(augment, colour=(220, 30, 30), seeds=40) -> int:
    image = Image.new("RGB", (32, 32), colour)
    changed = 0
    for seed in range(seeds):
        out = seeded_transform(augment, image, seed)
        changed += T.functional.pil_to_tensor(out)[:, 16, 16].tolist() != list(colour)
    return changed


def test_randaugment_without_colour_ops_keeps_colours():
    assert not COLOUR_OPS & set(RandAugmentNoColour()._augmentation_space(31, (32, 32)))
    assert centre_pixel_changes(RandAugmentNoColour(num_ops=2, magnitude=9)) == 0
    assert centre_pixel_changes(T.RandAugment(num_ops=2, magnitude=9)) > 0  # the stock one recolours


def test_train_pixels_are_clip_normalised_and_seeded(shapes_world):
    batch = take(train_loader(shapes_world, randaugment=False), 1)[0]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = batch["pixel_values"] * std + mean
    assert pixels.min() >= -0.02 and pixels.max() <= 1.02
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    take(train_loader(shapes_world), 1)  # in-process augmentation must not move the caller's RNG
    assert torch.equal(torch.rand(3), expected)


def test_normalization_is_the_configured_mean_and_std(shapes_world, tmp_path):
    """data.normalization: the same pixels, normalised with the named statistics, in the train and eval loaders
    and the task loaders; ViLT's 'inception' maps [0, 1] to [-1, 1] (mean = std = 0.5)."""
    from epic.config import ConfigError, load_config
    from epic.data.tasks import (build_task_eval_loader, build_task_train_loader, generate_shapes_tasks, load_task_data,
                                 shapes_task_paths)

    def raw(pixels, name):
        mean, std = {"clip": (CLIP_MEAN, CLIP_STD), "inception": ((0.5,) * 3, (0.5,) * 3),
                     "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}[name]
        return pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)

    clip = take(train_loader(shapes_world, randaugment=False), 1)[0]["pixel_values"]
    for name in ("inception", "imagenet"):
        other = take(train_loader(shapes_world, randaugment=False, normalization=name), 1)[0]["pixel_values"]
        torch.testing.assert_close(raw(other, name), raw(clip, "clip"), atol=1e-5, rtol=0)
    assert float((clip - other).abs().max()) > 0.1
    evals = [next(iter(build_eval_loader(shard_spec(shapes_world, "val"), shapes_world / "tokenizer", image_size=16,
                                         max_text_len=16, batch_size=4, normalization=name)))["pixel_values"]
             for name in ("clip", "inception")]
    torch.testing.assert_close(raw(evals[1], "inception"), raw(evals[0], "clip"), atol=1e-5, rtol=0)
    assert float(evals[1].min()) >= -1.0 - 1e-6 and float(evals[1].max()) <= 1.0 + 1e-6

    tasks = generate_shapes_tasks(tmp_path / "tasks", n_train=8, n_val=4, image_size=16, write_shards=False)
    paths = shapes_task_paths(tasks, "vqa")
    data = load_task_data("vqa", paths["val_json"], paths["images"], json.loads(Path(paths["answer_list"]).read_text()),
                          for_training=False)
    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    task_pixels = [next(iter(build_task_eval_loader(data, tokenizer, image_size=16, max_text_len=16,
                                                    batch_size=4, normalization=name)))["pixel_values"]
                   for name in ("clip", "inception")]
    torch.testing.assert_close(raw(task_pixels[1], "inception"), raw(task_pixels[0], "clip"), atol=1e-5, rtol=0)
    train_pixels = [next(iter(build_task_train_loader(data, tokenizer, image_size=16,
                                                      max_text_len=16, batch_size=4, seed=0, rank=0, world_size=1,
                                                      randaugment=False, normalization=name)))["pixel_values"]
                    for name in ("clip", "inception")]
    torch.testing.assert_close(raw(train_pixels[1], "inception"), raw(train_pixels[0], "clip"), atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="unknown image normalization 'pixelbert'.*data.normalization"):
        train_loader(shapes_world, normalization="pixelbert")
    with pytest.raises(ConfigError, match="'data.normalization' must be one of .*'inception'"):
        load_config("vilt_shapes_tiny", ["data.normalization=pixelbert"])
    assert load_config("vilt_shapes_tiny").data.normalization == "inception"
    assert load_config("shapes_tiny").data.normalization == "clip"  # METER (and the default) stay CLIP's


def test_config_normalization_choices_are_the_pipeline_table():
    from epic.config import _CHOICES
    from epic.data.transforms import NORMALIZATIONS

    assert set(_CHOICES["data.normalization"]) == set(NORMALIZATIONS)


# ----------------------------------------------------------------------------------------------- inspect_data
def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inspect_data_exit_codes(shapes_world, dirty_shards, capsys):
    inspect = load_tool("inspect_data")
    common = ["--tokenizer", str(shapes_world / "tokenizer"), "--image-size", "16", "--batch-size", "2"]
    assert inspect.main(["--shards", str(shapes_world / "train" / "*.tar"), "--num-batches", "2", *common]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("batch") for line in lines[:2]] == [0, 1] and lines[-1]["batches"] == 2
    assert lines[0]["tensors"]["pixel_values"] == {"shape": [2, 3, 16, 16], "dtype": "float32"}
    assert set(lines[-1]["skips"]) == set(SKIP_REASONS)
    assert inspect.main(["--shards", str(shapes_world / "train" / "{00000..00009}.tar"), *common]) == 2
    assert "00004.tar" in capsys.readouterr().err
    assert inspect.main(["--shards", str(dirty_shards / "only_bad.tar"), "--max-skips", "20", *common]) == 1
    captured = capsys.readouterr()
    assert "no batch" in captured.err and "bad_image" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["batches"] == 0
