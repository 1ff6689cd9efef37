"""The training mixture per caption (METER / ALBEF): source shares by caption count from counts.json, each
caption once per c passes over an image with c captions, caption_index in the batch, the per-image option, and
clear errors when counts are missing. The draw logic is tested without decoding images."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from epic.data import build_train_loader, load_tokenizer, shard_spec
from epic.data.loader import SampleStream, choose_caption, initial_position, visit_pass
from epic.data.shards import (MissingCountsError, epoch_length, iter_raw_samples, parse_sources, read_captions,
                              write_shard_counts)

# App. E, Table 7 (4M): images and captions per source
TABLE_7 = {"coco": (110_000, 550_000), "vg": (100_000, 5_700_000), "sbu": (860_000, 860_000),
           "cc3m": (2_900_000, 2_900_000)}


def fake_sources(tmp_path, table=TABLE_7, shards_per_source=3, with_counts=True):
    """Folders of (empty) shard files with counts.json splitting each source's counts over its shards."""
    specs = []
    for name, (images, captions) in table.items():
        folder = tmp_path / name
        folder.mkdir()
        counts = {}
        for k in range(shards_per_source):
            (folder / f"{k:05d}.tar").write_bytes(b"")
            counts[f"{k:05d}.tar"] = {"images": images // shards_per_source + (k < images % shards_per_source),
                                      "captions": captions // shards_per_source + (k < captions % shards_per_source)}
        if with_counts:
            write_shard_counts(folder, counts)
        specs.append({"name": name, "shards": str(folder / "*.tar"), "weight": "auto"})
    return specs


def shares_of_draws(sources, draws=10_000, streams=1):
    counter = Counter()
    for stream in range(streams):
        sample_stream = SampleStream(sources, seed=3, stream=stream, num_streams=streams,
                                     position=initial_position(len(sources), 2))
        counter.update(sources[sample_stream.draw(n)[0]].name for n in range(draws // streams))
    return {name: counter[name] / draws for name in (s.name for s in sources)}


@pytest.mark.parametrize("unit, column", [("caption", 1), ("image", 0)])
def test_source_shares_over_10k_samples_match_the_counts_within_one_point(tmp_path, unit, column):
    sources = parse_sources(fake_sources(tmp_path), sample_unit=unit)
    total = sum(v[column] for v in TABLE_7.values())
    assert [s.weight for s in sources] == [float(v[column]) for v in TABLE_7.values()]
    shares = shares_of_draws(sources)
    for name, counts in TABLE_7.items():
        assert abs(shares[name] - counts[column] / total) < 0.01, (name, shares[name], counts[column] / total)
    if unit == "caption":  # VG is 57% of the captions (2.7% of the sampled images under per-image weights)
        assert shares["vg"] > 0.55
    assert epoch_length(sources, unit) == total


def test_explicit_weights_stay_and_missing_counts_are_a_clear_error(tmp_path):
    specs = fake_sources(tmp_path, with_counts=False)
    with pytest.raises(MissingCountsError, match=r"source 'coco'.*counts\.json.*tools/count_shards\.py"):
        parse_sources(specs)
    explicit = parse_sources([dict(s, weight=w) for s, w in zip(specs, (1, 2, 3, 4))])
    assert [s.weight for s in explicit] == [1.0, 2.0, 3.0, 4.0] and epoch_length(explicit, "caption") is None
    single = parse_sources(specs[:1])  # one source needs no weight
    assert single[0].weight == 1.0 and single[0].captions is None
    with pytest.raises(ValueError, match="a number or 'auto'"):
        parse_sources([dict(specs[0], weight="many")])


def test_config_level_errors_and_auto_weights(shapes_world, tmp_path):
    from epic.config import ConfigError, load_config
    from epic.engine.build import resolve_data_paths

    specs = fake_sources(tmp_path, with_counts=False)
    sources = json.dumps([{"name": s["name"], "shards": s["shards"]} for s in specs])
    cfg = load_config("shapes_tiny", [f"data.root={shapes_world}", f"data.sources={sources}"])
    assert cfg.data.sources[0].weight == "auto"
    with pytest.raises(ConfigError, match="count_shards"):
        resolve_data_paths(cfg)
    paths = resolve_data_paths(load_config("shapes_tiny", [f"data.root={shapes_world}"]))
    manifest = json.loads((shapes_world / "manifest.json").read_text())
    assert paths.epoch_samples == manifest["splits"]["train"]["captions"] and paths.sample_unit == "caption"
    image_paths = resolve_data_paths(load_config("shapes_tiny", [f"data.root={shapes_world}", "data.sample_unit=image"]))
    assert image_paths.epoch_samples == manifest["splits"]["train"]["count"]
    with pytest.raises(ConfigError, match="sample_unit"):
        load_config("shapes_tiny", ["data.sample_unit=word"])


def test_caption_permutation_shows_each_caption_once_per_cycle():
    for c in (1, 2, 5):
        first = [choose_caption("caption", c, 0, 1, "000000012", e, sample_seed=e) for e in range(c)]
        second = [choose_caption("caption", c, 0, 1, "000000012", e, sample_seed=e) for e in range(c, 2 * c)]
        assert sorted(first) == sorted(second) == list(range(c))
    orders = {tuple(choose_caption("caption", 5, 0, 1, f"{k:09d}", e, 0) for e in range(5)) for k in range(20)}
    assert len(orders) > 10  # each image has its own order


def test_stream_per_caption_visits_every_pair_of_the_shapes_world(shapes_world):
    """One stream, 5 passes over the shards (raw samples, no image decoding): every (image, caption) pair comes,
    and an image with c captions shows each once in its first c passes."""
    sources = parse_sources(shard_spec(shapes_world, "train"))
    stream = SampleStream(sources, seed=1, stream=0, num_streams=1, position=initial_position(1, 1))
    num_images = sources[0].images
    seen = {}
    for _ in range(5 * num_images):
        raw, sample_seed, source, shard_pass = stream.next_raw()
        captions = read_captions(raw)[0]
        seen.setdefault(raw["__key__"], {"n": len(captions), "passes": []})["passes"].append(
            (shard_pass, choose_caption("caption", len(captions), 1, source, raw["__key__"], shard_pass, sample_seed)))
    assert len(seen) == num_images and sum(v["n"] for v in seen.values()) == sources[0].captions
    for item in seen.values():
        passes = sorted(item["passes"])
        assert [p for p, _ in passes] == list(range(5))  # one visit per pass
        assert sorted(c for p, c in passes if p < item["n"]) == list(range(item["n"]))
    assert visit_pass(4, 1, 2, 3) == (1 + 3 * 2) // 4


def test_batch_caption_index_names_the_caption_it_holds(shapes_world):
    captions = {}
    for spec in sorted((shapes_world / "train").glob("*.tar")):
        for raw in iter_raw_samples(str(spec), Counter()):
            captions[raw["__key__"]] = read_captions(raw)[0]
    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    for unit in ("caption", "image"):
        loader = build_train_loader(shard_spec(shapes_world, "train"), tokenizer, image_size=16, max_text_len=40,
                                    batch_size=8, num_workers=0, seed=0, rank=0, world_size=1, randaugment=False,
                                    sample_unit=unit)
        batch = next(iter(loader))
        for row, key in enumerate(batch["keys"]):
            text = tokenizer.decode(batch["input_ids"][row], skip_special_tokens=True).strip()
            assert text == captions[key][int(batch["caption_index"][row])]
        assert loader.epoch_samples == (sum(map(len, captions.values())) if unit == "caption" else len(captions))


def test_a_state_from_a_per_image_stream_does_not_resume_a_per_caption_one(shapes_world):
    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    kwargs = dict(image_size=16, max_text_len=16, batch_size=2, num_workers=0, seed=0, rank=0, world_size=1)
    loader = build_train_loader(shard_spec(shapes_world, "train"), tokenizer, sample_unit="image", **kwargs)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="sample_unit"):
        build_train_loader(shard_spec(shapes_world, "train"), tokenizer, state=state, **kwargs)
    resumed = build_train_loader(shard_spec(shapes_world, "train"), tokenizer, sample_unit="image", state=state, **kwargs)
    assert resumed.batches_consumed == 1
    older = {**state, "version": 1}  # written before the per-stream layout (and before sample_unit was saved)
    with pytest.raises(ValueError, match="version 1"):
        build_train_loader(shard_spec(shapes_world, "train"), tokenizer, sample_unit="image", state=older, **kwargs)
