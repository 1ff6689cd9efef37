"""data.mlm_masking=xvlm: the caption loader masks as X-VLM's TextMaskingGenerator (epic/data/xvlm_masking.py):
min(mlm_max_masks, max(1, round(p * (len + 1)))) positions per caption (whole words, skip-grams), 80% <mask> / 10%
random / 10% kept, never a special token; the loader's word starts (from the tokenizer's word_ids) equal those read
from the token strings, so its batch equals X-VLM's masking of the same ids with the same draws."""
from __future__ import annotations

import random

import pytest
import torch

from epic.data import build_train_loader
from epic.data.loader import collate_rows, xvlm_mask_rows  # noqa: F401
from epic.data.synthetic import shard_spec
from epic.data.text import load_tokenizer, replacement_token_ids
from epic.data.xvlm_masking import mask_batch, num_masks, word_starts


def loader_batches(world, n, **kwargs):
    loader = build_train_loader(shard_spec(world, "train"), world / "tokenizer", image_size=32, max_text_len=24,
                                batch_size=32, num_workers=0, seed=0, rank=0, world_size=1, randaugment=False,
                                mlm_masking="xvlm", **kwargs)
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("probability,max_masks", [(0.25, 8), (0.5, 3)])
def test_caption_loader_masks_as_x_vlm(shapes_world, probability, max_masks):
    batches = loader_batches(shapes_world, 4, mlm_probability=probability, mlm_max_masks=max_masks)
    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    counts, capped, kinds = [], 0, {"mask": 0, "kept": 0, "other": 0}
    for batch in batches:
        labels, ids, masked = batch["mlm_labels"], batch["input_ids"], batch["mlm_input_ids"]
        real = ~batch["special_tokens_mask"]
        selected = labels != -100
        assert not (selected & ~real).any()  # never a special token or padding
        assert torch.equal(labels[selected], ids[selected])  # labels: the original ids
        assert torch.equal(masked[~selected], ids[~selected])  # elsewhere untouched
        for row in range(ids.shape[0]):
            length = int(real[row].sum())
            expected = min(num_masks(length + 1, probability, max_masks), length)
            assert int(selected[row].sum()) == expected  # X-VLM's count, [CLS] counted as X-VLM does
            counts.append(expected)
            capped += expected == max_masks
        kinds["mask"] += int((masked[selected] == tokenizer.mask_token_id).sum())
        kinds["kept"] += int((masked[selected] == ids[selected]).sum())
        kinds["other"] += int(((masked[selected] != ids[selected]) & (masked[selected] != tokenizer.mask_token_id)).sum())
    total = sum(kinds.values())
    assert total > 300
    assert kinds["mask"] / total == pytest.approx(0.8, abs=0.06)
    assert kinds["kept"] / total == pytest.approx(0.1, abs=0.05)  # (plus the rare random draw of the same id)
    assert kinds["other"] / total == pytest.approx(0.1, abs=0.05)
    if max_masks == 3:
        assert capped > len(counts) / 2  # at most mlm_max_masks: the cap binds on most shapes-world captions


def test_loader_masking_equals_x_vlm_masking_of_the_same_ids(shapes_world):
    """collate_rows with mlm_masking=xvlm == mask_batch on its ids, word starts read from the token strings (an
    independent path: X-VLM's own '##' / 'Ġ' rule) and the same Python RNG seed; captions with multi-piece words."""
    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    captions = ["the zxqwv circle is left of the blorptang square", "a small red triangle",
                "three qqzzyyx shapes on a purple background", "the big green circle above the tiny square"] * 4
    pixels = [torch.zeros(3, 8, 8)] * len(captions)
    generator = torch.Generator().manual_seed(1234)
    batch = collate_rows([str(i) for i in range(len(captions))], pixels, captions, [None] * len(captions), tokenizer,
                         20, 0.4, replacement_token_ids(tokenizer), generator, [0] * len(captions),
                         mlm_masking="xvlm", mlm_max_masks=8)
    starts = torch.tensor([word_starts(tokenizer.convert_ids_to_tokens(row)) for row in batch["input_ids"].tolist()])
    assert not starts[0].all()  # 'zxqwv' is several pieces: whole-word widening has something to do
    ids, labels = mask_batch(batch["input_ids"], batch["special_tokens_mask"], random.Random(1234),
                             tokenizer.mask_token_id, len(tokenizer), 0.4, 8, word_start=starts)
    assert torch.equal(batch["mlm_input_ids"], ids) and torch.equal(batch["mlm_labels"], labels)
    with pytest.raises(ValueError, match="mlm_masking"):
        collate_rows(["0"], pixels[:1], captions[:1], [None], tokenizer, 20, 0.4, replacement_token_ids(tokenizer),
                     generator, [0], mlm_masking="saliency")


def test_config_switch(shapes_world):
    from epic.config import ConfigError, load_config

    cfg = load_config("xvlm_shapes_tiny")
    assert cfg.data.mlm_masking == "xvlm" and cfg.data.mlm_max_masks == 8
    assert load_config("xvlm_4m").data.mlm_masking == "xvlm"
    with pytest.raises(ConfigError, match="whole_word_masking"):
        load_config("xvlm_shapes_tiny", ["data.whole_word_masking=true"])
    with pytest.raises(ConfigError, match="mlm_max_masks"):
        load_config("xvlm_shapes_tiny", ["data.mlm_max_masks=0"])
    with pytest.raises(ConfigError, match="iter_perc"):
        load_config("xvlm_shapes_tiny", ["data.regions.iter_perc=1.5"])
