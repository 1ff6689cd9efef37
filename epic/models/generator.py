"""EPIC's auxiliary masked language model f_L (Sec. 4.3): a Hugging Face RoBERTa/BERT MLM of the VLM's text family.

    H^L = f_L(w^mask)                                         (Eq. 3 gives w^mask)
    p_MLM(w | h_i) = softmax(e(w)^T t(h_i) + b)               (Eq. 4; t = the LM head's dense-GELU-LayerNorm)

``EpicGenerator.forward`` returns t(h_i) at the masked positions only; the vocabulary projection, sampling (Eq. 5)
and loss (Eq. 7) are done by ``epic.kernels.vocab_sample_and_loss`` with ``output_embedding()``, so the [M, V]
logits are never materialised. For the "LM (cond.)" ablation (Table 5) the first token's input embedding is
replaced by the VLM's image [CLS] feature (gradient stopped) through a trainable projection.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM
from transformers.activations import gelu

from epic.config import ConfigError, config_from_dict

from .text import prepared_attention_mask, text_hf_config

GENERATOR_FAMILIES = {"roberta": (RobertaConfig, RobertaForMaskedLM), "bert": (BertConfig, BertForMaskedLM)}
# tools/fit_generator.py writes this file beside the HF weights: it tells a generator fitted on the captions
# ("LM (trained)") from an untouched base LM ("LM (fixed)"), and records what it was fitted on.
FITTED_MARKER = "epic_generator.json"
FITTED_FORMAT = "epic-fitted-generator/1"


class EpicGenerator(nn.Module):
    """A HF masked LM (``lm``) whose forward gives the LM-head-transformed states at the masked positions."""

    def __init__(self, lm: nn.Module, image_width: Optional[int] = None):
        super().__init__()
        if lm.config.model_type not in GENERATOR_FAMILIES:
            raise ValueError(f"generator must be a RoBERTa or BERT masked LM, got model_type={lm.config.model_type!r}")
        self.lm = lm
        # "LM (cond.)": the image [CLS] feature of the VLM's vision tower, projected to the generator's width
        self.image_projection = new_image_projection(image_width, lm.config.hidden_size) if image_width else None

    @property
    def family(self) -> str:
        return self.lm.config.model_type

    @property
    def encoder(self) -> nn.Module:
        return self.lm.roberta if self.family == "roberta" else self.lm.bert

    def output_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(e, b) of Eq. 4: the decoder weight [V, d] (tied to the input embeddings in HF's MLMs) and bias [V]."""
        if self.family == "roberta":
            return self.lm.lm_head.decoder.weight, self.lm.lm_head.bias
        return self.lm.cls.predictions.decoder.weight, self.lm.cls.predictions.bias

    def param_groups_spec(self) -> dict:
        """One lr group; weight decay on matrices, none on biases and LayerNorm weights (every 1-D parameter)."""
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        return {"backbone": {"decay": [n for n, p in trainable if p.ndim >= 2],
                             "no_decay": [n for n, p in trainable if p.ndim < 2]}}

    def head_transform(self, states: torch.Tensor) -> torch.Tensor:
        """The LM head before the vocabulary projection (dense -> GELU -> LayerNorm), as HF computes it."""
        if self.family == "roberta":
            head = self.lm.lm_head
            return head.layer_norm(gelu(head.dense(states)))
        return self.lm.cls.predictions.transform(states)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                image_cls: Optional[torch.Tensor] = None) -> torch.Tensor:
        """w^mask [B, L] -> t(h_i) [M, d] at the M masked positions, in row-major order.

        ``positions``: [B, L] bool, or the [M] flat indices ``positions.flatten().nonzero()`` (no host sync here).
        ``image_cls`` [B, vit_width] (LM (cond.) only) replaces the first token's input embedding, detached.
        """
        mask = prepared_attention_mask(self.encoder, attention_mask)
        if self.image_projection is None:
            if image_cls is not None:
                raise ValueError("image_cls given, but this generator was built without an image projection "
                                 "(epic.generator_mode=conditioned builds one)")
            states = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        else:
            if image_cls is None:
                raise ValueError("the conditioned generator (LM (cond.)) needs image_cls, the VLM's image [CLS] feature")
            embeds = self.encoder.get_input_embeddings()(input_ids)
            first = self.image_projection(image_cls.detach().to(embeds.dtype))  # stop-gradient into the VLM
            embeds = torch.cat([first[:, None], embeds[:, 1:]], dim=1)
            positions_ids = _position_ids(self.lm.config, input_ids)
            states = self.encoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_ids).last_hidden_state
        return self.head_transform(select_positions(states, positions))


def select_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, L, d] -> [M, d] rows at ``positions`` ([B, L] bool or [M] flat indices), row-major order."""
    if positions.dtype == torch.bool:
        return states[positions]
    return states.flatten(0, 1).index_select(0, positions)


def new_image_projection(image_width: int, hidden_size: int) -> nn.Linear:
    """Linear map from the VLM's vision width to the generator's width, BERT init (N(0, 0.02), zero bias)."""
    projection = nn.Linear(image_width, hidden_size)
    projection.weight.data.normal_(mean=0.0, std=0.02)
    projection.bias.data.zero_()
    return projection


def _position_ids(hf_config, input_ids: torch.Tensor) -> torch.Tensor:
    """The position ids HF derives from ``input_ids`` (RoBERTa: from the padding), needed with inputs_embeds."""
    if hf_config.model_type == "roberta":
        pad = hf_config.pad_token_id
        not_pad = input_ids.ne(pad).int()
        return (torch.cumsum(not_pad, dim=1) * not_pad).long() + pad
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------
def generator_hf_config(gen_cfg, model_cfg):
    """HF config of a randomly initialised generator: sizes from ``epic.generator`` (0 = the VLM's text tower)."""
    hidden = gen_cfg.hidden_size or model_cfg.text_hidden_size
    heads = gen_cfg.heads or (model_cfg.text_heads if not gen_cfg.hidden_size else max(1, hidden // 64))
    if hidden % heads:
        raise ConfigError(f"epic.generator.hidden_size={hidden} is not divisible by epic.generator.heads={heads}")
    intermediate = gen_cfg.intermediate_size or (model_cfg.text_intermediate_size if not gen_cfg.hidden_size
                                                 else 4 * hidden)
    return text_hf_config(model_cfg, hidden_size=hidden, layers=gen_cfg.layers, heads=heads,
                          intermediate_size=intermediate)


def build_generator(gen_cfg, model_cfg, conditioned: bool = False, pretrained: Optional[str] = None) -> EpicGenerator:
    """The generator of an EPIC run. ``gen_cfg``: epic.generator; ``model_cfg``: the VLM's resolved METERConfig.

    ``pretrained`` (default ``gen_cfg.pretrained``): a local HF folder (e.g. roberta-base) or an EPIC run /
    checkpoint dir whose generator engine is reused ("LM (trained)": fitted before, then fixed).
    """
    pretrained = pretrained if pretrained is not None else gen_cfg.pretrained
    image_width = model_cfg.vit_width if conditioned else None
    if pretrained:
        generator = load_pretrained_generator(pretrained, model_cfg, image_width)
    else:
        _, model_class = GENERATOR_FAMILIES[model_cfg.text_model_type]
        generator = EpicGenerator(model_class(generator_hf_config(gen_cfg, model_cfg)), image_width)
    check_generator_matches(generator, model_cfg)
    return generator


def load_pretrained_generator(path: str, model_cfg, image_width: Optional[int]) -> EpicGenerator:
    path = Path(path)
    if (path / "config.json").is_file():  # a HF folder
        _, model_class = GENERATOR_FAMILIES[model_cfg.text_model_type]
        return EpicGenerator(model_class.from_pretrained(str(path)), image_width)
    from epic.ckpt_files import find_checkpoint, read_module_state_dict, read_trainer_state

    step_dir = find_checkpoint(path) if path.is_dir() else None
    if step_dir is None or not (step_dir / "generator").is_dir():
        raise ConfigError(
            f"epic.generator.pretrained={str(path)!r} is neither a local HF folder (config.json + weights, e.g. "
            f"roberta-base saved with save_pretrained) nor an EPIC run/checkpoint dir with a 'generator' engine")
    saved = config_from_dict(read_trainer_state(step_dir)["config"])
    mode = saved.epic.generator_mode
    generator = build_generator(saved.epic.generator, saved.model, conditioned=mode == "conditioned")
    generator.load_state_dict(read_module_state_dict(step_dir, "generator"))
    if image_width is None and generator.image_projection is not None:
        generator.image_projection = None  # a conditioned generator reused unconditioned: drop the projection
    elif image_width is not None and generator.image_projection is None:
        generator.image_projection = new_image_projection(image_width, generator.lm.config.hidden_size)
    return generator


def check_fitted_generator(path: str) -> dict:
    """``epic.generator_mode=pretrained_fixed`` ("LM (trained)", Table 5) needs a generator fitted on the captions:
    an HF folder written by tools/fit_generator.py (its FITTED_MARKER is returned), or an EPIC run / checkpoint
    dir whose generator engine was trained during pretraining. An untouched base LM is a ConfigError: with it the
    run would silently be "LM (fixed)"."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        marker = folder / FITTED_MARKER
        if not marker.is_file():
            raise ConfigError(
                f"epic.generator_mode=pretrained_fixed (\"LM (trained)\") but epic.generator.pretrained={path} is an "
                f"untouched language model (no {FITTED_MARKER}): that is \"LM (fixed)\" (epic.generator_mode=fixed). "
                f"Fit it on the pretraining captions first: python tools/fit_generator.py --config <this config> "
                f"--out DIR --steps N, then epic.generator.pretrained=DIR")
        try:
            info = json.loads(marker.read_text())
        except ValueError as err:
            raise ConfigError(f"{marker} is not valid JSON ({err}); rerun tools/fit_generator.py") from err
        if info.get("format") != FITTED_FORMAT:
            raise ConfigError(f"{marker}: format {info.get('format')!r}, expected {FITTED_FORMAT!r}")
        return info
    return {"run": str(folder)}  # an EPIC run dir: load_pretrained_generator checks it has a generator engine


def check_generator_matches(generator: EpicGenerator, model_cfg) -> None:
    """The generator reads and writes the VLM's token ids: same family, vocabulary and padding id."""
    hf = generator.lm.config
    wrong = {}
    if hf.model_type != model_cfg.text_model_type:
        wrong["family"] = (hf.model_type, model_cfg.text_model_type)
    if hf.vocab_size != model_cfg.vocab_size:
        wrong["vocab_size"] = (hf.vocab_size, model_cfg.vocab_size)
    if hf.pad_token_id != model_cfg.pad_token_id:
        wrong["pad_token_id"] = (hf.pad_token_id, model_cfg.pad_token_id)
    if wrong:
        details = ", ".join(f"{k}: generator {a} vs VLM {b}" for k, (a, b) in wrong.items())
        raise ConfigError(f"the EPIC generator does not match the VLM's text side ({details}); use a generator of the "
                         f"same family trained with the same tokenizer (epic.generator.pretrained)")


def generator_param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and LayerNorm weights (every 1-D parameter)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0}]


def freeze(module: nn.Module, dtype: torch.dtype, device) -> nn.Module:
    """eval(), no gradients, cast: the fixed generators and the frozen teacher are plain inference modules."""
    module.eval().requires_grad_(False)
    return module.to(device=device, dtype=dtype)
