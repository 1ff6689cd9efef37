"""The teacher-saliency cache: sidecar format, tools/precompute_saliency.py (resumable), the loader attaching alpha,
masks identical to the teacher's for the same RNG state (un-augmented images), the fallback on a missing entry,
and the FLOP count without the teacher."""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))


from epic.data.saliency_cache import (ALPHA_MIN, SaliencyCache, Sidecar, sidecar_relpath,  # noqa: E402
                                      write_sidecar)

BATCH = 8


def test_sidecar_relpath_keeps_the_source_folder():
    assert sidecar_relpath("/data/cc3m/00012.tar") == "cc3m/00012.safetensors"
    assert sidecar_relpath("/data/coco/00012.tar") == "coco/00012.safetensors"  # same stem, other source
    assert sidecar_relpath("pipe:cat /data/sbu/007.tar") == "sbu/007.safetensors"


def test_sidecar_round_trip_and_misses(tmp_path):
    alphas = [np.array([0.5, 0.25, 0.25]), np.array([1.0]), np.array([0.7, 0.3, 0.0])]
    write_sidecar(tmp_path / "src" / "000.safetensors", ["a", "a", "b"], [0, 1, 0], alphas, "/x/src/000.tar")
    (tmp_path / "manifest.json").write_text('{"format": "epic-saliency-v1"}')
    side = Sidecar(tmp_path / "src" / "000.safetensors")
    assert len(side) == 3 and side.alpha.dtype == np.float16
    np.testing.assert_array_equal(side.get("a", 0), np.float16([0.5, 0.25, 0.25]))
    assert side.get("b", 0)[2] == np.float16(ALPHA_MIN)  # a zero would make the token unselectable
    assert side.get("b", 1) is None
    cache = SaliencyCache(tmp_path)
    assert cache.lookup("/y/src/000.tar", "a", 1, 1) is not None
    assert cache.lookup("/y/src/001.tar", "a", 0, 3) is None  # no sidecar
    assert cache.lookup("/y/src/000.tar", "c", 0, 3) is None  # no entry
    assert cache.lookup("/y/src/000.tar", "a", 0, 4) is None  # other tokenisation
    assert dict(cache.misses) == {"no_sidecar": 1, "no_entry": 1, "length_mismatch": 1}


# ------------------------------------------------------------------------------------------- with a real teacher
@pytest.fixture(scope="module")
def cached(shapes_world, tmp_path_factory, gloo_rank):
    """A random-init teacher export and its saliency cache over the val shard (every caption)."""
    import precompute_saliency
    from test_epic_engines import make_config

    from epic.engine.build import build_model, resolve_data_paths

    tmp = tmp_path_factory.mktemp("saliency_cache")
    cfg = make_config(shapes_world, tmp / "teacher")
    paths = resolve_data_paths(cfg)
    torch.manual_seed(123)
    teacher_model, tokenizer = build_model(cfg, paths)
    teacher_model.save_pretrained(str(tmp / "teacher"))
    args = ["--teacher", str(tmp / "teacher"), "--shards", *paths.val_shards, "--tokenizer", paths.tokenizer,
            "--out", str(tmp / "cache"), "--image-size", str(cfg.data.image_size), "--max-text-len",
            str(cfg.data.max_text_len), "--batch-size", "48", "--num-workers", "0"]
    first = precompute_saliency.main(args)
    return SimpleNamespace(tmp=tmp, cfg=cfg, paths=paths, tokenizer=tokenizer, args=args, first=first,
                           world=shapes_world)


def eval_batch(cached, all_captions=False):
    """Un-augmented images (eval transform) of the val shard, plus what the training loader adds (caption index,
    shard); with ``all_captions`` one row per (image, caption), so later captions are looked up too."""
    from epic.data import build_eval_loader

    loader = build_eval_loader(cached.paths.val_shards, cached.tokenizer, image_size=cached.cfg.data.image_size,
                               max_text_len=cached.cfg.data.max_text_len, batch_size=BATCH, all_captions=all_captions)
    batch = next(iter(loader))
    images = batch["image_index"].tolist()  # rows of one image are consecutive, captions in order
    batch["caption_index"] = torch.tensor([images[:i].count(image) for i, image in enumerate(images)])
    batch["shards"] = [cached.paths.val_shards[0]] * len(images)
    return batch


def test_precompute_covers_every_caption_and_resumes(cached):
    import precompute_saliency

    cache = SaliencyCache(cached.tmp / "cache")
    side = cache.sidecar(cached.paths.val_shards[0])
    assert cached.first["entries"] == len(side) > 64  # 64 images, several captions each
    assert cache.manifest["max_text_len"] == cached.cfg.data.max_text_len
    again = precompute_saliency.main(cached.args)  # resumable: the shard is done
    assert again["shards_written"] == 0 and again["shards_skipped_done"] == 1
    bad = cached.args[:-6] + ["--max-text-len", "12", "--batch-size", "48", "--num-workers", "0"]
    with pytest.raises(ValueError, match="other settings"):
        precompute_saliency.main(bad)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cached_alpha_gives_the_teachers_masks(cached, backend, monkeypatch):
    """Same RNG state -> the same masked positions from the cache as from the teacher (un-augmented images)."""
    from epic.models.teacher import load_teacher
    from epic.objectives.saliency import cached_alpha_query_keys, real_text_tokens, saliency_masking

    monkeypatch.setenv("EPIC_KERNELS", backend)
    teacher = load_teacher(str(cached.tmp / "teacher"), "cpu", "fp32")
    cache = SaliencyCache(cached.tmp / "cache")
    for all_captions in (False, True):
        batch = cache.attach(eval_batch(cached, all_captions))
        assert all_captions == bool(batch["caption_index"].max() > 0)
        assert batch["saliency_misses"] == 0 and bool(batch["saliency_cached"].all())
        real = real_text_tokens(batch)
        query, keys = teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        rng_teacher, rng_cache = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        mask_t, alpha_t = saliency_masking(query, keys, real, 0.35, rng_teacher)
        mask_c, alpha_c = saliency_masking(*cached_alpha_query_keys(batch["saliency_alpha"]), real, 0.35, rng_cache)
        torch.testing.assert_close(alpha_c, alpha_t, rtol=2e-3, atol=1e-6)  # fp16 storage
        torch.testing.assert_close(batch["saliency_alpha"], alpha_t, rtol=2e-3, atol=1e-6)
        assert torch.equal(mask_c, mask_t)
        assert torch.equal(rng_teacher.get_state(), rng_cache.get_state())  # the same noise was drawn


def test_fallback_to_the_teacher_counts_the_misses():
    from epic.objectives.consistency import EpicObjective

    calls = []
    fake = SimpleNamespace(teacher=object(), epic=SimpleNamespace(saliency_cache="DIR"), saliency_cache_misses=0,
                           _teacher_query_keys=lambda batch: calls.append(1) or "teacher")
    alpha = torch.tensor([[0.0, 0.6, 0.4, 0.0]])
    hit = EpicObjective._saliency_query_keys(fake, {"saliency_alpha": alpha, "saliency_misses": 0,
                                                   "input_ids": torch.zeros(1, 4)})
    assert not calls and hit[1].shape == (1, 1, 4, 1)
    assert EpicObjective._saliency_query_keys(fake, {"saliency_alpha": alpha, "saliency_misses": 1,
                                                    "input_ids": torch.zeros(1, 4)}) == "teacher"
    assert EpicObjective._saliency_query_keys(fake, {"input_ids": torch.zeros(3, 4)}) == "teacher"  # no α at all
    assert calls == [1, 1] and fake.saliency_cache_misses == 4


def test_epic_step_with_the_cache_skips_the_teacher_and_matches(cached, monkeypatch):
    """The whole EPIC step (real engines): identical losses with and without the cache; the teacher never runs."""
    from test_epic_engines import build, train_step

    setup = {"world": cached.world, "tmp": cached.tmp, "paths": cached.paths}
    cache = SaliencyCache(cached.tmp / "cache")
    batch = cache.attach(eval_batch(cached))
    _, engine, plain = build(setup)
    out_plain = train_step(engine, plain, batch, 0)
    _, engine, with_cache = build(setup, f"epic.saliency_cache={cached.tmp / 'cache'}")
    monkeypatch.setattr(with_cache.teacher, "query_keys", lambda *a: pytest.fail("the teacher ran"))
    out_cache = train_step(engine, with_cache, batch, 0)
    for key in ("loss", "loss_itm", "loss_mlm", "loss_itc", "loss_gen"):
        torch.testing.assert_close(out_cache[key], out_plain[key], rtol=0, atol=0)
    assert with_cache.log_values(1)["epic/saliency_cache_misses"] == 0.0
    missing = dict(batch, saliency_misses=2)  # two rows without alpha: the micro-batch falls back to the teacher
    monkeypatch.undo()
    train_step(engine, with_cache, missing, 1)
    assert with_cache.log_values(2)["epic/saliency_cache_misses"] == 2.0


def test_flops_without_the_teacher():
    from epic.config import load_config
    from epic.objectives.consistency import epic_vlm_passes
    from epic.objectives.epic_flops import epic_step_flops_per_sample

    cfg = load_config("epic_shapes_tiny", ["epic.teacher=/teacher", "model.vocab_size=300"])
    full = epic_step_flops_per_sample(cfg, vlm_passes=epic_vlm_passes)
    cached = epic_step_flops_per_sample(cfg, vlm_passes=epic_vlm_passes, saliency_cache=True)
    assert full["teacher"] > 0 and cached["teacher"] == 0
    assert cached["total"] == pytest.approx(full["total"] - full["teacher"])
