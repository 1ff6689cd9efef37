"""VQA as answer generation (ALBEF's and X-VLM's ``model_vqa.py``, the same loss in both): the answer decoder's
sequence loss of every (question, answer) pair the question has, weighted by the answer's share of the question's
soft scores, summed and divided by the batch size:

    L_vqa = (1 / B) sum_(q, a) w_qa * NLL(a | question states of q)        (both codes' VQA.py)

(ALBEF and X-VLM weight an answer by its share of the annotators; our batches carry VQA soft scores, so the weight
is the answer's share of the question's soft-score total.) The model is reached through ``question_states``,
``text_decoder`` and the answer list buffers of epic.models.split_bert_tasks.AnswerRanking; no family is named.
"""
from __future__ import annotations

from typing import Dict

import torch

from epic.models.split_bert_tasks import answer_sequence_nll  # the decoder's sequence NLL (ranking uses it too)

VQA_BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "target_scores")


def answer_weights(target_scores: torch.Tensor):
    """(question index [P], answer index [P], weight [P]) of every answer with a positive soft score, each weight
    its share of the question's total (ALBEF / X-VLM: count / number of annotators)."""
    scores = target_scores.float()
    question, answer = (scores > 0).nonzero(as_tuple=True)
    shares = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return question, answer, shares[question, answer]


def vqa_losses(model, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """L_vqa: sum over (question, answer) pairs of weight x answer NLL, / batch size."""
    missing = [key for key in VQA_BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"{type(model).__name__} VQA fine-tuning needs batches with {missing} (epic.data.tasks' VQA "
                       "loader)")
    model._check_answers()
    states = model.question_states(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    question, answer, weights = answer_weights(batch["target_scores"])
    if question.numel() == 0:  # no question of this micro-batch has an answer in the list: a zero with a graph
        return {"loss": states.sum() * 0.0, "num_answers": torch.tensor(0.0)}
    ids, mask = model.answer_input_ids[answer], model.answer_attention_mask[answer]
    logits = model.text_decoder(ids, mask, states[question], batch["attention_mask"][question])
    loss = (weights * answer_sequence_nll(logits, ids, mask)).sum() / states.shape[0]
    return {"loss": loss, "loss_vqa": loss.detach(), "num_answers": torch.tensor(float(question.numel()))}
