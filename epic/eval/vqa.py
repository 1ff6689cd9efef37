"""VQA v2 accuracy with soft scores (Antol et al. 2015; the scores METER/ViLT train on).

An answer given by c of the n annotators scores the official leave-one-annotator-out average of min(1, matches/3):

    score(c, n) = (c * min(1, (c - 1) / 3) + (n - c) * min(1, c / 3)) / n          (n = 10: 0, .3, .6, .9, 1)

A prediction earns the score of the predicted answer; accuracy is the mean over questions, in percent. Answers
are normalised lightly (lower case, trimmed, final period dropped); the official evaluation's full normalisation
(number words, articles, punctuation) is not replicated: test-dev numbers come from the evaluation server.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import torch

from .common import score_over_loader, single_image_forward


def normalize_answer(answer: str) -> str:
    answer = answer.strip().lower()
    return answer[:-1].strip() if answer.endswith(".") else answer


def soft_score(count: int, num_annotators: int) -> float:
    """Official VQA accuracy of an answer that `count` of `num_annotators` annotators gave."""
    if not 0 <= count <= num_annotators or num_annotators < 1:
        raise ValueError(f"need 0 <= count <= num_annotators and num_annotators >= 1, got {count}, {num_annotators}")
    return (count * min(1.0, (count - 1) / 3) + (num_annotators - count) * min(1.0, count / 3)) / num_annotators


def answer_scores(answers) -> dict[str, float]:
    """Soft score per distinct answer, from the annotators' answers (list) or given scores ({answer: score})."""
    if isinstance(answers, dict):
        return {normalize_answer(a): float(s) for a, s in answers.items()}
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return {}
    counts = Counter(normalize_answer(a) for a in answers)
    if len(answers) < 3:  # too few annotators for the 3-match rule: a listed answer is simply right
        return {a: 1.0 for a in counts}
    return {a: soft_score(c, len(answers)) for a, c in counts.items()}


def build_answer_list(all_answers: Iterable, min_count: int = 1, max_answers: int = 0) -> list[str]:
    """The classifier's answers: those given (with any score) at least `min_count` times, most frequent first."""
    counts: Counter = Counter()
    for answers in all_answers:
        counts.update(answer_scores(answers).keys())
    ranked = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    return ranked[:max_answers] if max_answers > 0 else ranked


def target_vector(scores: dict[str, float], answer_to_index: dict[str, int]) -> torch.Tensor:
    """[num_answers] soft-score target; answers outside the list are unreachable (score lost, as in METER)."""
    target = torch.zeros(len(answer_to_index))
    for answer, score in scores.items():
        if answer in answer_to_index:
            target[answer_to_index[answer]] = score
    return target


def vqa_score_sum(logits: torch.Tensor, target_scores: torch.Tensor) -> float:
    """Sum over the batch of the soft score of each predicted answer."""
    predicted = logits.argmax(dim=-1)
    return target_scores.float().gather(1, predicted.view(-1, 1)).sum().item()


def vqa_accuracy(logits: torch.Tensor, target_scores: torch.Tensor) -> float:
    return 100.0 * vqa_score_sum(logits, target_scores) / max(1, logits.shape[0])


def evaluate_vqa(model, loader, answers: Sequence[str] = ()) -> dict:
    """`vqa_score` (percent) over the loader (all ranks); batches carry `target_scores` [B, num_answers]."""
    total, count = score_over_loader(model, loader, single_image_forward,
                                     lambda logits, batch: vqa_score_sum(logits, batch["target_scores"]))
    return {"vqa_score": 100.0 * total / max(count, 1), "num_questions": count}
