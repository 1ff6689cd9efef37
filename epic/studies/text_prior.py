"""What a task's text alone predicts: the floor an image-text model has to beat. A logistic regression on a
statement's words and word pairs, trained on the training statements, scored on the held-out ones (no image).
The shapes world's NLVR2 is built to leave it at chance (epic.data.tasks._truth_statement, version 2)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch


def word_features(sentence: str) -> list[str]:
    words = sentence.split()
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:])]


def text_only_accuracy(train: Sequence[tuple[str, bool]], held_out: Sequence[tuple[str, bool]],
                       steps: int = 300) -> float:
    """Held-out accuracy of the bag-of-words-and-pairs logistic regression fitted (full batch, Adam) on `train`."""
    index = {f: i for i, f in enumerate(sorted({f for s, _ in train for f in word_features(s)}))}

    def design(rows):
        x = torch.zeros(len(rows), len(index))
        for r, (sentence, _) in enumerate(rows):
            for f in word_features(sentence):
                if f in index:
                    x[r, index[f]] += 1
        return x, torch.tensor([float(label) for _, label in rows])

    (x, y), (xv, yv) = design(train), design(held_out)
    w, b = torch.zeros(len(index), requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y).backward()
        optimizer.step()
    with torch.no_grad():
        return ((xv @ w + b > 0).float() == yv).float().mean().item()


def nlvr2_text_prior(tasks: Path) -> float:
    """Dev accuracy (%) of the text-only classifier on the shapes world's NLVR2 (tasks/nlvr2/{train,val}.json)."""
    def rows(split):
        records = json.loads((Path(tasks) / "nlvr2" / f"{split}.json").read_text())
        return [(r["sentence"], str(r["label"]) == "True") for r in records]

    return 100.0 * text_only_accuracy(rows("train"), rows("val"))
