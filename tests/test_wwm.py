"""Whole-word masking over fast-tokenizer word ids (WordPiece and byte-level BPE), tokenizers built offline."""
from __future__ import annotations

import pytest
import torch

from epic.data.wwm import NOT_A_WORD, choose_whole_words, whole_word_mask, word_ids_matrix

CORPUS = ["a red circle is playing beside the blue squares", "two green triangles are jumping over a square",
          "the small yellow circle sits left of the big square"] * 5


def _fast(tokenizer_object, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, **special)


@pytest.fixture(scope="module")
def wordpiece():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=45, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return _fast(tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def bytelevel_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<mask>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return _fast(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>")


def _encode(tokenizer, captions, length=16):
    return tokenizer(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt")


@pytest.mark.parametrize("name", ["wordpiece", "bytelevel_bpe"])
def test_whole_words_only_and_seeded(name, request):
    tokenizer = request.getfixturevalue(name)
    enc = _encode(tokenizer, ["a red circle is playing beside the blue squares", "two triangles jumping"])
    words = word_ids_matrix(enc)
    ids = enc["input_ids"]
    assert (words == NOT_A_WORD).equal(enc["attention_mask"].eq(0) | torch.isin(ids, torch.tensor(tokenizer.all_special_ids)))
    assert any(int((words[0] == w).sum()) > 1 for w in set(words[0].tolist()) - {NOT_A_WORD}), \
        "the test needs a word split into several pieces"
    replace = torch.tensor([i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids])
    for seed in range(30):
        masked, labels = whole_word_mask(ids, words, tokenizer.mask_token_id, replace, 0.15,
                                         torch.Generator().manual_seed(seed))
        selected = labels != -100
        assert not selected[words == NOT_A_WORD].any()
        for row in range(2):
            for w in set(words[row].tolist()) - {NOT_A_WORD}:
                flags = selected[row, words[row] == w]
                assert bool(flags.all()) or not bool(flags.any())  # a word is masked whole or not at all
            real = int((words[row] != NOT_A_WORD).sum())
            assert int(selected[row].sum()) <= max(1, round(0.15 * real))
        assert torch.equal(labels[selected], ids[selected])
        assert torch.equal(masked[~selected], ids[~selected])
    again = whole_word_mask(ids, words, tokenizer.mask_token_id, replace, 0.15, torch.Generator().manual_seed(3))
    once = whole_word_mask(ids, words, tokenizer.mask_token_id, replace, 0.15, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], once[0]) and torch.equal(again[1], once[1])


def test_target_rule_and_replacement_split():
    # 20 one-piece words: exactly round(0.15 * 20) = 3 tokens each draw
    words = list(range(20))
    assert all(len(choose_whole_words(words, 0.15, torch.Generator().manual_seed(s))) == 3 for s in range(20))
    # a word of 3 pieces never fits a target of 1: HF's rule keeps nothing rather than overshooting
    assert choose_whole_words([NOT_A_WORD, 0, 0, 0, 1, 1, 1, NOT_A_WORD], 0.15, torch.Generator()) == []
    # 80 / 10 / 10 over many selected tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 20), generator=g)
    word_ids = torch.arange(20).expand(400, -1).clone()
    masked, labels = whole_word_mask(ids, word_ids, 3, torch.arange(10, 1000), 0.5, g)
    selected = labels != -100
    assert int(selected.sum()) == 400 * 10
    share_mask = (masked[selected] == 3).float().mean().item()
    share_kept = (masked[selected] == ids[selected]).float().mean().item()
    assert abs(share_mask - 0.8) < 0.02 and abs(share_kept - 0.1) < 0.02
    with pytest.raises(ValueError, match="mlm_probability"):
        whole_word_mask(ids, word_ids, 3, torch.arange(10, 1000), 1.5, g)


def test_train_loader_whole_word_masking(shapes_world):
    """The training loader's whole_word_masking switch: selections cover whole words of the caption."""
    from epic.data.loader import build_train_loader
    from epic.data.synthetic import shard_spec
    from epic.data.text import load_tokenizer
    from epic.data.wwm import word_ids_matrix

    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    loader = build_train_loader(shard_spec(shapes_world, "train"), tokenizer, image_size=64, max_text_len=32,
                                batch_size=8, num_workers=0, seed=0, rank=0, world_size=1, whole_word_masking=True,
                                mlm_probability=0.3)
    batch = next(iter(loader))
    assert "word_ids" not in batch
    selected = batch["mlm_labels"] != -100
    assert selected.any()
    ids = batch["input_ids"]
    compared = 0
    for row in range(ids.shape[0]):
        real = ids[row][batch["attention_mask"][row].bool()].tolist()
        enc = tokenizer([tokenizer.decode(real[1:-1])], padding="max_length", max_length=32, truncation=True)
        words = word_ids_matrix(enc)[0]
        if not torch.equal(torch.tensor(enc["input_ids"][0]), ids[row]):
            continue  # decode/encode round trip changed the tokens: nothing to compare
        compared += 1
        for w in set(words.tolist()) - {NOT_A_WORD}:
            flags = selected[row, words == w]
            assert bool(flags.all()) or not bool(flags.any())
    assert compared >= 4
