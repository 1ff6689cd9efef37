"""Downstream pieces shared by the families whose text side is one BERT split into text layers and fusion layers
with cross-attention to the image tokens: ALBEF (salesforce/ALBEF) and X-VLM (zengyan-97/X-VLM). Both official
code bases build their NLVR2 and VQA models the same way (``models/model_nlvr.py``, ``models/model_vqa.py``):

  NLVR2  every pretrained fusion layer becomes two consecutive layers, the first reading image 0 and the second
         image 1 (xbert: encoder_hidden_states[(layer - fusion_layer) % 2]); both copies start from the same
         pretrained layer and each pair shares its cross-attention key / value projections.
  VQA    an answer decoder (``text_decoder``: BERT embeddings, layers with causal self-attention and cross-attention
         over the fused question states, the LM head tied to its word embeddings), initialised from the pretrained
         embeddings, fusion layers and MLM head; trained on answer token sequences; prediction ranks the answer list
         (the k answers whose first token is likeliest, re-scored by their whole sequence).

The family brings its own layer classes (their call is ``layer(hidden, self_mask, context, context_mask)``, the
state-dict names BERT's: ``attention``, ``crossattention.self.{query,key,value}``, ``intermediate``, ``output``) and
its additive mask value; everything here only arranges layers, masks and state-dict keys. No family is imported.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ENCODER_LAYERS = "text_encoder.bert.encoder.layer."


# ------------------------------------------------------------------------------------------------ loading
def adapt_task_state(model_name: str, own: Mapping[str, torch.Tensor], state: Dict[str, torch.Tensor],
                     pretraining_parts: Tuple[str, ...], new_parts: Tuple[str, ...] = (),
                     aliases: Optional[Mapping[str, str]] = None) -> Dict[str, torch.Tensor]:
    """Pretraining weights -> a task model's keys (``own`` = its state dict): pretraining-only parts the task model
    lacks are dropped, tied aliases filled from their sources (``aliases``: alias -> source), and the task's new parts
    (prefixes) that the source lacks keep their initialisation. Anything else is left for the strict key check."""
    state = {k: v for k, v in state.items() if k in own or not k.startswith(pretraining_parts)}
    for alias, source in (aliases or {}).items():
        if alias in own and alias not in state and source in state:
            state[alias] = state[source]
    added = sorted(k for k in own if k.startswith(new_parts) and k not in state) if new_parts else []
    for key in added:
        state[key] = own[key]
    if added:
        log.info("%s: new parts keep their initialisation: %s", model_name, sorted({k.split(".")[0] for k in added}))
    return state


def fused_infer(model, input_ids, attention_mask, pixel_values=None, image_embeds=None, text_embeds=None) -> dict:
    """One (text, whole image) pass of a task model without the contrastive parts: the family's ``encode_image``,
    ``encode_text`` and ``fuse``; the pretraining infer's keys without image_feat / text_feat."""
    if image_embeds is None:
        image_embeds = model.encode_image(pixel_values)
    if text_embeds is None:
        text_embeds = model.encode_text(input_ids, attention_mask)
    fused = model.fuse(text_embeds, attention_mask, image_embeds)
    return {"image_embeds": image_embeds, "text_embeds": text_embeds, "text_feats": fused,
            "cls_feats": fused[:, 0], "image_feats": image_embeds}


# ------------------------------------------------------------------------------------------------ NLVR2
def two_image_num_layers(fusion_layer: int, num_hidden_layers: int) -> int:
    """Depth of the two-image encoder: the text layers, then two layers per pretrained fusion layer (ALBEF and X-VLM
    set num_hidden_layers = 6 + 2 x 6 = 18 for BERT-base)."""
    return fusion_layer + 2 * (num_hidden_layers - fusion_layer)


def share_cross_attention(layers: Sequence[nn.Module], fusion_layer: int) -> None:
    """In each pair (fusion_layer + 2i, fusion_layer + 2i + 1) the first layer's cross-attention key and value
    projections become the second's (one parameter, two names), as both codes' share_cross_attention."""
    for first in range(fusion_layer, len(layers), 2):
        cross_0, cross_1 = layers[first].crossattention.self, layers[first + 1].crossattention.self
        cross_0.key, cross_0.value = cross_1.key, cross_1.value


def two_image_layer_keys(state: Dict[str, torch.Tensor], fusion_layer: int, pretrained_layers: int,
                         prefix: str = ENCODER_LAYERS) -> Dict[str, torch.Tensor]:
    """The NLVR2 weight mapping (ALBEF's NLVR.py, X-VLM's model_nlvr.load_pretrained): pretrained fusion layer j ->
    layers fusion + 2 (j - fusion) and the one after it. A state that already has the two-image layers (a fine-tuned
    NLVR2 checkpoint) is returned as is."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if not indices or max(indices) >= pretrained_layers:
        return state
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index, rest = key[len(prefix):].split(".", 1)
        j = int(index)
        if j < fusion_layer:
            out[key] = value
        else:
            first = fusion_layer + 2 * (j - fusion_layer)
            out[f"{prefix}{first}.{rest}"] = value
            out[f"{prefix}{first + 1}.{rest}"] = value
    return out


def fuse_two_images(fusion_layers: Iterable[nn.Module], text_embeds: torch.Tensor, text_mask: torch.Tensor,
                    images: Tuple[torch.Tensor, torch.Tensor],
                    image_masks: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)) -> torch.Tensor:
    """The two-image fusion layers over the text-encoder output, the cross-attention alternating image 0 / image 1
    (``text_mask`` and ``image_masks`` additive, as the family's layers take them)."""
    hidden = text_embeds
    for offset, layer in enumerate(fusion_layers):
        hidden = layer(hidden, text_mask, images[offset % 2], image_masks[offset % 2])
    return hidden


# ------------------------------------------------------------------------------------------------ VQA decoder
def padding_mask(mask: torch.Tensor, dtype: torch.dtype, mask_value: Optional[float] = None) -> torch.Tensor:
    """[N, L] 1/0 -> [N, 1, 1, L] additive (0 or ``mask_value``; None: the dtype's minimum)."""
    value = torch.finfo(dtype).min if mask_value is None else mask_value
    return (1.0 - mask[:, None, None, :].to(dtype)) * value


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype, mask_value: Optional[float] = None) -> torch.Tensor:
    """[N, L] padding mask -> [N, 1, L, L] additive mask of a left-to-right decoder (xbert's is_decoder mask:
    causal x padding)."""
    value = torch.finfo(dtype).min if mask_value is None else mask_value
    length = attention_mask.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=dtype, device=attention_mask.device))
    allowed = causal[None, None] * attention_mask[:, None, None, :].to(dtype)
    return (1.0 - allowed) * value


class AnswerDecoder(nn.Module):
    """``text_decoder`` (xbert's BertLMHeadModel): ``bert.embeddings``, ``bert.encoder.layer.N`` (every layer
    with causal self-attention and cross-attention over the question states), ``cls.predictions`` (the LM head,
    tied by the family to the decoder's own word embeddings). The family builds the three parts from its classes."""

    def __init__(self, embeddings: nn.Module, layers: Sequence[nn.Module], lm_head: nn.Module,
                 mask_value: Optional[float] = None):
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = embeddings
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(layers)
        self.cls = lm_head
        self.mask_value = mask_value

    def forward(self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, question_states: torch.Tensor,
                question_mask: torch.Tensor) -> torch.Tensor:
        """[N, La] answers (teacher forcing) over [N, Lq, H] question states -> [N, La, V] next-token logits."""
        hidden = self.bert.embeddings(answer_ids)
        self_mask = causal_mask(answer_mask, hidden.dtype, self.mask_value)
        cross_mask = padding_mask(question_mask, hidden.dtype, self.mask_value)
        for layer in self.bert.encoder.layer:
            hidden = layer(hidden, self_mask, question_states, cross_mask)
        return self.cls.predictions(hidden)


def decoder_keys_from_encoder(state: Dict[str, torch.Tensor], fusion_layer: int,
                              copy_cross_key_value: bool = True) -> Dict[str, torch.Tensor]:
    """The VQA weight mapping (ALBEF's VQA.py, X-VLM's model_vqa.load_pretrained): text_decoder.bert.embeddings <-
    text_encoder.bert.embeddings, decoder layer i <- fusion layer fusion_layer + i, text_decoder.cls <- text_encoder.cls
    (the encoder keeps its own copy). ``copy_cross_key_value`` False (X-VLM when the image width differs from the
    text width: the pretrained cross-attention reads image tokens, the decoder's reads question states) leaves the
    decoder's cross-attention key / value out (they keep their initialisation). A state that already has the
    decoder (a fine-tuned VQA checkpoint) is returned as is."""
    if any(k.startswith("text_decoder.") for k in state):
        return state
    out = dict(state)
    for key, value in state.items():
        if key.startswith(("text_encoder.bert.embeddings.", "text_encoder.cls.")):
            out["text_decoder." + key[len("text_encoder."):]] = value
        elif key.startswith(ENCODER_LAYERS):
            index, rest = key[len(ENCODER_LAYERS):].split(".", 1)
            if int(index) < fusion_layer:
                continue
            if not copy_cross_key_value and rest.startswith(("crossattention.self.key.", "crossattention.self.value.")):
                continue
            out[f"text_decoder.bert.encoder.layer.{int(index) - fusion_layer}.{rest}"] = value
    return out


def answer_sequence_nll(logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """[N] -log p(answer) summed over its tokens after <s> (xbert BertLMHeadModel, reduction='none': the logits
    shifted by one, padding ignored, no label smoothing), in fp32."""
    targets = answer_ids.masked_fill(answer_mask == 0, -100)[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return nll.sum(dim=1)


class AnswerRanking:
    """Mixin of a VQA task model with a ``text_decoder`` (AnswerDecoder) and ``question_states(pixel_values,
    input_ids, attention_mask)``: the answer list's token ids (non-persistent buffers, set by ``set_answer_list``;
    the checkpoint does not depend on the tokenizer's padding) and the ranking of rank_answer. Call
    ``init_answer_list(num_answers)`` in ``__init__``."""

    def init_answer_list(self, num_answers: int) -> None:
        if num_answers < 1:
            raise ValueError(f"num_answers must be >= 1, got {num_answers}: give the VQA answer list")
        self.num_answers = num_answers
        self.answer_candidates = 0  # k of rank_answers (0: all)
        self.register_buffer("answer_input_ids", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("answer_attention_mask", torch.zeros(0, 0, dtype=torch.long), persistent=False)

    def set_answer_list(self, tokenizer, answers, k: int = 0) -> None:
        """Tokenise the answer list (``<s> answer </s>``, padded to the longest) for training and ranking; ``k``
        candidates per question at prediction (0: all)."""
        if len(answers) != self.num_answers:
            raise ValueError(f"the answer list has {len(answers)} answers but the model was built for "
                             f"{self.num_answers} (finetune.num_answers)")
        encoded = tokenizer(list(answers), padding="longest", return_tensors="pt")
        device = next(self.text_decoder.parameters()).device
        self.answer_input_ids = encoded["input_ids"].to(device)
        self.answer_attention_mask = encoded["attention_mask"].to(device)
        self.answer_candidates = int(k)

    def _check_answers(self) -> None:
        if self.answer_input_ids.numel() == 0:
            raise RuntimeError(f"{type(self).__name__} has no answer list: call set_answer_list(tokenizer, answers) "
                               "first (epic/finetune.py does it from finetune.answer_list)")

    @torch.no_grad()
    def rank_answers(self, question_states: torch.Tensor, question_mask: torch.Tensor, k: int = 0) -> torch.Tensor:
        """[B, num_answers] scores: for the k answers whose first token the decoder finds likeliest after <s>,
        log p(first token) + log p(whole answer sequence) (rank_answer of both codes sums both, so the first token
        counts twice; kept for faithfulness); -inf for the others."""
        self._check_answers()
        answer_ids, answer_mask = self.answer_input_ids, self.answer_attention_mask
        batch, count = question_states.shape[0], answer_ids.shape[0]
        k = count if k <= 0 else min(k, count)
        start = answer_ids[:1, :1].expand(batch, 1)
        first = self.text_decoder(start, torch.ones_like(start), question_states, question_mask)[:, 0].float()
        first_probs = first.softmax(dim=-1).index_select(1, answer_ids[:, 1])  # [B, A]
        top_probs, top_ids = first_probs.topk(k, dim=1)
        ids, mask = answer_ids[top_ids.flatten()], answer_mask[top_ids.flatten()]  # [B k, La]
        logits = self.text_decoder(ids, mask, question_states.repeat_interleave(k, 0),
                                   question_mask.repeat_interleave(k, 0))
        sequence_log_prob = -answer_sequence_nll(logits, ids, mask).view(batch, k)
        scores = torch.full((batch, count), float("-inf"), device=question_states.device)
        scores.scatter_(1, top_ids, top_probs.log() + sequence_log_prob)
        return scores

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """[B, num_answers] answer scores (argmax = the prediction; epic.eval.vqa reads them as logits)."""
        states = self.question_states(pixel_values, input_ids, attention_mask)
        return self.rank_answers(states, attention_mask, self.answer_candidates)
