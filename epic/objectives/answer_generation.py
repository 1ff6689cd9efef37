"""VQA as answer generation (ALBEF's and X-VLM's ``model_vqa.py``, the same loss in both): the answer decoder's
sequence loss of every (question, answer) pair the question has, weighted by the answer's share of the question's
soft scores, summed and divided by the batch size:

    L_vqa = (1 / B) sum_(q, a) w_qa * NLL(a | question states of q)        (both codes' VQA.py)

(ALBEF and X-VLM weight an answer by its share of the annotators; our batches carry VQA soft scores, so the weight
is the answer's share of the question's soft-score total.) With ALBEF's momentum distillation (``distill_alpha``,
the model's ``momentum_answer_logits``) each answer's NLL becomes (1 - alpha) NLL + alpha sum_t CE(logits_t,
softmax(momentum logits_t)) over its tokens (xbert's BertLMHeadModel with soft_labels). The model is reached
through ``question_states``, ``text_decoder`` and the answer list buffers of
epic.models.split_bert_tasks.AnswerRanking; no family is named.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from epic.models.split_bert_tasks import answer_sequence_nll  # the decoder's sequence NLL (ranking uses it too)

VQA_BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "target_scores")


def answer_weights(target_scores: torch.Tensor):
    """(question index [P], answer index [P], weight [P]) of every answer with a positive soft score, each weight
    its share of the question's total (ALBEF / X-VLM: count / number of annotators)."""
    scores = target_scores.float()
    question, answer = (scores > 0).nonzero(as_tuple=True)
    shares = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return question, answer, shares[question, answer]


def distilled_answer_nll(logits: torch.Tensor, logits_m: torch.Tensor, answer_ids: torch.Tensor,
                         answer_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per answer [N]: (1 - alpha) x its sequence NLL + alpha x the soft cross-entropy against the momentum
    decoder's next-token softmax, summed over the answer's tokens after <s> (xbert's loss_distill), fp32."""
    nll = answer_sequence_nll(logits, answer_ids, answer_mask)
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    soft = -(log_probs * F.softmax(logits_m[:, :-1].detach().float(), dim=-1)).sum(dim=-1)  # [N, La - 1]
    return (1.0 - alpha) * nll + alpha * (soft * (answer_mask[:, 1:] > 0)).sum(dim=1)


def vqa_losses(model, batch: Dict[str, torch.Tensor], distill_alpha: Optional[float] = None
               ) -> Dict[str, torch.Tensor]:
    """L_vqa: sum over (question, answer) pairs of weight x answer NLL, / batch size; ``distill_alpha``: the answer
    NLL distilled from the model's momentum decoder (``momentum_answer_logits``) at that weight."""
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
    out = {"num_answers": torch.tensor(float(question.numel()))}
    if distill_alpha is None:
        per_answer = answer_sequence_nll(logits, ids, mask)
    else:
        logits_m = model.momentum_answer_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                                question, ids, mask)
        per_answer = distilled_answer_nll(logits, logits_m, ids, mask, distill_alpha)
        out["alpha"] = torch.tensor(distill_alpha)
    loss = (weights * per_answer).sum() / states.shape[0]
    return {"loss": loss, "loss_vqa": loss.detach(), **out}
