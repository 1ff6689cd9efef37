"""What every model family (METER, ViLT, ALBEF, X-VLM) offers; objectives, EPIC, evaluation and the trainer use
nothing else of a model.

A family lives in its own folder (``epic/models/<family>/``: configuration, modeling, converter beside the model,
as timm and HF transformers keep them) and joins by subclassing :class:`VLPModel` and registering itself in
``epic.models.registry``. Shapes below: B batch, L text length, N image tokens, H fused width, V vocabulary.

``infer`` returns a dict with at least:

* ``text_feats``  [B, L, H]   fused text states (what MLM and EPIC's ITC read, one per caption token);
* ``image_feats`` [B, N, H']  fused (or, for single-stream models, joint) image states;
* ``cls_feats``   [B, C]      what the ITM head reads;
* ``image_embeds``            the unimodal image encoding (``encode_image``'s output), reusable by later passes.

Families add their own keys (ALBEF / X-VLM: ``text_embeds``, ``image_feat``, ``text_feat``).

What the rest of the system reads of ``model.config`` (the family's config dataclass, the ``model:`` section of a
run config): ``family``, ``hidden_size`` (width of ``text_feats``), ``vocab_size``, ``pad_token_id``,
``image_size``, ``max_text_len``, ``initializer_range`` and ``consistency_head`` (bool); fields named
``*_pretrained`` are local tower-weight paths, cleared when weights come from a checkpoint. The EPIC generator
(``epic.models.generator``) also reads the text tower's ``text_model_type`` / ``text_hidden_size`` /
``text_layers`` / ``text_heads`` / ``text_intermediate_size`` (its default sizes) and ``vit_width``
(``generator_mode=conditioned``).

``itm_score`` and ``mlm_score`` may be submodules (METER keeps its official state-dict names ``itm_score.fc``,
``mlm_score.decoder``): a read-only property returning the head module satisfies the interface.
"""
from __future__ import annotations

import abc
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

#: name of the optional consistency head beta (EPIC Eq. 1); created by the model when its config asks for it
CONSISTENCY_HEAD = "itc_score"
#: keys every ``infer`` output has
INFER_KEYS = ("text_feats", "image_feats", "cls_feats", "image_embeds")


# An export directory (save_pretrained / from_pretrained): every tensor in one safetensors file, the model config as
# JSON beside it.
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def write_export(directory: str, state: Dict[str, torch.Tensor], config: dict) -> None:
    """Write ``state`` (contiguous copies) and ``config`` to an export directory."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def read_export(directory: str, how_to_write: str) -> tuple[dict, Dict[str, torch.Tensor], str]:
    """(config dict, weights, config path) of an export directory; a missing file names ``how_to_write`` one."""
    from safetensors.torch import load_file

    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"{directory!r} has no {name}; write it with {how_to_write}")
    config_path = os.path.join(directory, CONFIG_NAME)
    with open(config_path) as f:
        config = json.load(f)
    return config, load_file(os.path.join(directory, WEIGHTS_NAME)), config_path


def penultimate(layers: Sequence[nn.Module]) -> nn.Module:
    """The last layer but one (the only one when there is one)."""
    layers = list(layers)
    return layers[len(layers) - 2 if len(layers) > 1 else 0]


class VLPModel(nn.Module, abc.ABC):
    """The family interface (see the module docstring)."""

    #: registry name of the family ("meter", "vilt", "albef", "xvlm")
    family: str = ""

    # -- construction and files ----------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_config(cls, config) -> "VLPModel":
        """A randomly initialised (or tower-pretrained, where the config names local weights) model."""

    @abc.abstractmethod
    def save_pretrained(self, directory: str) -> None:
        """Write the weights (safetensors) and the config (JSON) so that ``from_pretrained`` rebuilds the model."""

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, directory: str) -> "VLPModel":
        """Inverse of ``save_pretrained``."""

    # -- forward -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_image(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The unimodal image encoding; run once per micro-batch and passed to ``infer(image_embeds=...)``.

        ``generator``: the objective's random stream, for families whose training-time encoding is random (ViLT
        samples at most ``max_image_len`` patches); it must not be drawn from in eval mode or by deterministic
        families (METER ignores it), so resuming stays exact."""

    @abc.abstractmethod
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The unimodal text encoding [B, L, W] (a text tower's output; a single-stream family's embedding layer);
        passed to ``infer(text_embeds=...)`` so that retrieval encodes every caption once."""

    @abc.abstractmethod
    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_embeds: Optional[torch.Tensor] = None, text_embeds: Optional[torch.Tensor] = None
              ) -> Dict[str, torch.Tensor]:
        """The fused forward; ``image_embeds`` (from ``encode_image``) skips the vision encoder, ``text_embeds``
        (from ``encode_text``) the text encoder."""

    def retrieval_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                             attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first (shortlist) stage of retrieval with ``eval.k_test > 0``: (image vectors [I, D], text vectors
        [T, D]) from ``encode_image`` / ``encode_text`` outputs, compared by cosine (the caller normalises); the
        fused ITM head then scores only the shortlisted pairs. Families with contrastive heads return their
        trained embeddings; others say what heuristic they use. The default: no first stage."""
        raise NotImplementedError(f"{type(self).__name__} defines no retrieval first stage (retrieval_embeddings): "
                                  f"use eval.k_test=0 (every pair scored by ITM)")

    # -- heads ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def itm_score(self, cls_feats: torch.Tensor) -> torch.Tensor:
        """[B, C] -> matched / not matched logits [B, 2] (class 1 = matched)."""

    @abc.abstractmethod
    def mlm_score(self, text_feats: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> vocabulary logits [B, L, V]."""

    @abc.abstractmethod
    def mlm_transform(self, text_feats: torch.Tensor) -> torch.Tensor:
        """The MLM head up to the vocabulary projection (dense -> GELU -> LayerNorm): [B, L, H] -> [B, L, H]."""

    @abc.abstractmethod
    def mlm_output_embedding(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight [V, H], bias [V] or None) of the vocabulary projection, so that
        ``mlm_score(x) == mlm_transform(x) @ weight.T + bias`` (the streaming vocabulary kernel reads them)."""

    def consistency_head(self) -> Optional[nn.Linear]:
        """EPIC's beta (Eq. 1), Linear(H, 1) as submodule ``itc_score``, when the model config has
        ``consistency_head: true``; else None. Created last in ``__init__`` (``epic.models.heads.
        new_consistency_head``), so that every other weight draws the same random numbers with or without it."""
        return self._modules.get(CONSISTENCY_HEAD)

    # -- EPIC saliency (Eq. 8) -----------------------------------------------------------------------------
    @abc.abstractmethod
    def saliency_qk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query [B, heads, dh], keys [B, heads, L, dh]) of the family's saliency layer, raw projections without
        the 1/sqrt(dh) scale; keys cover every text position (mask padding with ``attention_mask``). Each family
        documents which layer and which query it uses."""

    @abc.abstractmethod
    def saliency_teacher(self) -> "VLPModel":
        """A frozen copy (``requires_grad`` False, eval mode; the model itself is untouched) pruned to what
        ``saliency_qk`` runs (no heads, no layers after the saliency layer), whose ``saliency_qk`` gives the same
        query and keys. EPIC's teacher (``epic.models.teacher.SaliencyTeacher``) wraps it."""

    # -- analysis (Grad-CAM, Fig. 5) -------------------------------------------------------------------------
    def text_to_image_attention(self) -> tuple[nn.Module, Callable[[int], int]]:
        """(module, first_patch): the attention whose text-query x image-key probabilities Grad-CAM reads. The
        module calls ``F.scaled_dot_product_attention`` once per forward with the text tokens as queries; among its
        keys the image patches start at ``first_patch(text_len)`` (an image [CLS] or, for a single-stream model,
        the text tokens come before them). The two-stream families give their penultimate text-to-image
        cross-attention (in the last layer only [CLS] reaches the ITM head, so other tokens get no gradient)."""
        raise NotImplementedError(f"{type(self).__name__} names no text-to-image attention for Grad-CAM: define "
                                  "text_to_image_attention() (see epic.models.interface.VLPModel)")

    # -- optimizer -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def param_groups_spec(self) -> Dict[str, Dict[str, List[str]]]:
        """{'backbone'|'fusion'|'head': {'decay': [names], 'no_decay': [names]}} over the trainable parameters
        (the family's lr-multiplier and weight-decay rules)."""
