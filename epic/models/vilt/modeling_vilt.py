"""ViLT (Kim, Son & Kim, ICML 2021; official code dandelin/ViLT): one transformer over [text; image].

Text: BERT word + position embeddings (HF ``BertEmbeddings``, which also adds BERT's token-type row 0 and a
LayerNorm). Image: ViT-B/32 patch projection, [CLS] token and position embeddings (bilinearly interpolated,
``align_corners=True`` as ViLT does, when the patch grid differs from the one they were trained on). Both get a
modality-type embedding (0 text, 1 image, 2 NLVR2's second image); the joint sequence runs through timm ViT blocks
(pre-LN) and the ViT's final norm; the pooler (dense + tanh) reads the first token (the text [CLS]); ITM reads the
pooler, MLM the text states.

Submodule and parameter names are those of ViLT's state dict (``text_embeddings``, ``token_type_embeddings``,
``transformer.{patch_embed,cls_token,pos_embed,blocks,norm}``, ``pooler``, ``mlm_score``, ``itm_score``), so
``convert_vilt`` only checks and filters keys.

Patch sampling (ViLT's ``visual_embed``): in training, an image keeps at most ``max_image_len`` patches: when it
has more valid patches a uniformly random subset of them, otherwise all valid patches followed by padding
patches drawn with replacement (masked out of attention). Our images are fixed squares, so every patch is valid
and the padding branch never fires on our data (``sample_patches`` implements and the tests check both). The
draw uses the ``torch.Generator`` the caller passes (the trainer's objective generator, saved in checkpoints), so
a resumed run draws the same patches. Kept patches stay in raster order (ViLT leaves the drawn order; attention
with the position embedding attached to each patch is permutation-equivariant, so nothing but the order of
``image_feats`` changes). At evaluation every patch is used, in raster order.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from functools import partial
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import ITMHead, MLMHead, Pooler
from ..interface import CONSISTENCY_HEAD, VLPModel, penultimate, read_export, write_export
from .configuration_vilt import ViLTConfig, vilt_config_from_dict

logger = logging.getLogger(__name__)



def init_vilt_weights(module: nn.Module, std: float = 0.02) -> None:
    """ViLT's init of the modules it creates (objectives.init_weights): N(0, std), zero bias, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def sample_patches(valid: torch.Tensor, max_image_len: int, generator: Optional[torch.Generator] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """ViLT's patch selection (vision_transformer.visual_embed) over a [B, N] validity mask.

    K = min(most valid patches of any image, max_image_len) (-1: no cap). Per image: with at least K valid
    patches, K of them uniformly without replacement; with fewer, all valid patches then K - valid padding
    patches drawn uniformly with replacement. Returns (index [B, K] into the N patches, kept_valid [B, K]);
    the kept valid patches are in raster order, padding after them. Runs on the CPU with ``generator``.
    """
    valid = valid.detach().to("cpu", torch.bool)
    counts = valid.sum(dim=1)
    if int(counts.min()) == 0:
        raise ValueError("an image has no valid patch (all pixels zero?); ViLT needs at least one per image")
    keep = int(counts.max()) if max_image_len < 0 else min(int(counts.max()), max_image_len)
    rows, kept_valid = [], []
    for row_valid, count in zip(valid, counts.tolist()):
        valid_idx = row_valid.nonzero().flatten()
        if count >= keep:
            if count > keep:
                pick = torch.multinomial(torch.ones(count), keep, replacement=False, generator=generator)
                valid_idx = valid_idx[pick.sort().values]
            rows.append(valid_idx)
            kept_valid.append(torch.ones(keep, dtype=torch.bool))
        else:
            pad_idx = (~row_valid).nonzero().flatten()
            pick = torch.multinomial(torch.ones(len(pad_idx)), keep - count, replacement=True, generator=generator)
            rows.append(torch.cat([valid_idx, pad_idx[pick]]))
            kept_valid.append(torch.arange(keep) < count)
    return torch.stack(rows), torch.stack(kept_valid)


def interpolate_position_grid(pos_grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[1, C, g, g] -> [1, C, height, width], bilinear with align_corners=True (ViLT's visual_embed)."""
    if tuple(pos_grid.shape[-2:]) == (height, width):
        return pos_grid
    return F.interpolate(pos_grid, size=(height, width), mode="bilinear", align_corners=True)


class VisualEmbedding(NamedTuple):
    embeds: torch.Tensor       # [B, 1 + K, H]: [CLS] then the kept patches, position embeddings added
    masks: torch.Tensor        # [B, 1 + K] long: 1 for [CLS] and valid patches, 0 for padding patches
    patch_index: torch.Tensor  # [B, K] index of each kept patch in the raster-order grid


# ------------------------------------------------------------------------------------------------------ model
class ViLT(VLPModel):
    family = "vilt"

    def __init__(self, config: ViLTConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.config = config.validate()
        self._saliency_only = False
        bert = BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                          num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                          intermediate_size=config.hidden_size * config.mlp_ratio,
                          max_position_embeddings=config.max_text_len, hidden_dropout_prob=config.drop_rate,
                          attention_probs_dropout_prob=config.drop_rate, layer_norm_eps=config.layer_norm_eps,
                          pad_token_id=config.pad_token_id)
        self.text_embeddings = BertEmbeddings(bert)
        self.token_type_embeddings = nn.Embedding(config.num_token_types, config.hidden_size)
        self.transformer = VisionTransformer(
            img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.hidden_size,
            depth=config.num_layers, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=True,
            num_classes=0, global_pool="", pos_drop_rate=config.drop_rate, proj_drop_rate=config.drop_rate,
            attn_drop_rate=0.0, norm_layer=partial(nn.LayerNorm, eps=config.vit_layer_norm_eps))
        self.pooler = Pooler(config.hidden_size)
        self.mlm_score = MLMHead(config.hidden_size, config.vocab_size, config.layer_norm_eps)
        self.itm_score = ITMHead(config.hidden_size)
        for name, module in self.named_children():
            if name != "transformer":
                module.apply(partial(init_vilt_weights, std=config.initializer_range))
        if config.consistency_head:  # created last: every other weight draws the same numbers with or without it
            head = nn.Linear(config.hidden_size, 1)
            init_vilt_weights(head, std=config.initializer_range)
            self.add_module(CONSISTENCY_HEAD, head)
        if config.vit_pretrained:
            load_vit_weights(self.transformer, config.vit_pretrained)

    @classmethod
    def from_config(cls, config) -> "ViLT":
        if isinstance(config, dict):
            config = vilt_config_from_dict(config)
        return cls(config)

    def train(self, mode: bool = True) -> "ViLT":
        return super().train(mode and not self._saliency_only)  # a saliency teacher never leaves eval mode

    # ------------------------------------------------------------------------------------------------ image
    def visual_embed(self, pixel_values: torch.Tensor, patch_valid: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> VisualEmbedding:
        """Patches -> (+ interpolated position embeddings) -> sampling (training) -> [CLS] first -> dropout.

        ``patch_valid`` [B, h*w] marks real patches (default: all, our fixed squares). In training at most
        ``max_image_len`` patches are kept (``sample_patches`` with ``generator``); in eval mode all of them.
        """
        size = self.config.patch_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or any(s % size for s in pixel_values.shape[-2:]):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [B, 3, H, W] with H and W "
                             f"multiples of patch_size={size} (config.image_size={self.config.image_size})")
        vit = self.transformer
        patches = vit.patch_embed.proj(pixel_values.to(vit.patch_embed.proj.weight.dtype))  # [B, H, h, w]
        batch, channels, rows, cols = patches.shape
        grid = self.config.grid_size
        spatial = vit.pos_embed[:, 1:].transpose(1, 2).reshape(1, channels, grid, grid)
        spatial = interpolate_position_grid(spatial, rows, cols).flatten(2).transpose(1, 2)  # [1, N, H]
        tokens = patches.flatten(2).transpose(1, 2) + spatial  # [B, N, H]
        num_patches = tokens.shape[1]
        if patch_valid is not None and tuple(patch_valid.shape) != (batch, num_patches):
            raise ValueError(f"patch_valid has shape {tuple(patch_valid.shape)}; expected {(batch, num_patches)}")
        cap = self.config.max_image_len
        all_valid = patch_valid is None or bool(patch_valid.all())
        if not self.training or (all_valid and (cap < 0 or num_patches <= cap)):
            index = torch.arange(num_patches, device=tokens.device).expand(batch, -1)
            kept_valid = (torch.ones(batch, num_patches, dtype=torch.bool, device=tokens.device)
                          if patch_valid is None else patch_valid.to(tokens.device, torch.bool))
        else:
            if patch_valid is None:
                patch_valid = torch.ones(batch, num_patches, dtype=torch.bool, device="cpu")
            index, kept_valid = sample_patches(patch_valid, cap, generator)
            index, kept_valid = index.to(tokens.device), kept_valid.to(tokens.device)
            tokens = torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, channels))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(batch, -1, -1)
        embeds = vit.pos_drop(torch.cat([cls, tokens], dim=1))
        masks = torch.cat([torch.ones(batch, 1, dtype=torch.long, device=tokens.device), kept_valid.long()], dim=1)
        return VisualEmbedding(embeds, masks, index)

    def encode_image(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """ViLT has no image encoder: the unimodal image encoding is the embedded patch sequence [B, 1 + K, H]
        (every kept patch is a real one on fixed-square images)."""
        return self.visual_embed(pixel_values, generator=generator).embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ViLT has no text encoder either: BERT's embedding layer [B, L, H] (``infer(text_embeds=...)`` reuses it)."""
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions > max_text_len={self.config.max_text_len}"
                             f" (ViLT's text position embeddings); shorten data.max_text_len")
        return self.text_embeddings(input_ids=input_ids)

    def retrieval_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                             attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A first-stage shortlist score for retrieval with eval.k_test > 0: mean-pooled embeddings of each
        modality (ViLT has no unimodal encoders, so this is weak; ViLT itself scores every pair)."""
        weights = attention_mask.to(text_embeds.dtype).unsqueeze(-1)
        text = (text_embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return image_embeds.mean(dim=1), text

    # ------------------------------------------------------------------------------------------------ joint
    def _joint_inputs(self, input_ids, attention_mask, pixel_values, image_embeds, image_token_type_idx,
                      image_masks, generator, text_embeds=None):
        if not 0 <= image_token_type_idx < self.config.num_token_types:
            raise ValueError(f"image_token_type_idx={image_token_type_idx} but the model has "
                             f"{self.config.num_token_types} modality types (NLVR2's second image needs "
                             f"num_token_types=3)")
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("infer needs pixel_values or image_embeds (the output of encode_image)")
            image_embeds = self.encode_image(pixel_values, generator=generator)
        if image_masks is None:
            image_masks = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        text = self.encode_text(input_ids) if text_embeds is None else text_embeds
        text = text + self.token_type_embeddings(torch.zeros_like(input_ids))
        image = image_embeds + self.token_type_embeddings(torch.full_like(image_masks, image_token_type_idx))
        joint = torch.cat([text, image], dim=1)
        keep = torch.cat([attention_mask.to(torch.bool), image_masks.to(torch.bool)], dim=1)
        return joint, keep[:, None, None, :], image_embeds, image_masks  # bool mask: True = attend

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_embeds: Optional[torch.Tensor] = None, image_token_type_idx: int = 1,
              image_masks: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              text_embeds: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """ViLT's infer: text_feats [B, L, H], image_feats [B, 1 + K, H] (image [CLS] first), cls_feats [B, H]
        (pooler on the text [CLS]), raw_cls_feats (that token before the pooler), image_embeds, image_masks.
        ``image_embeds`` / ``text_embeds`` (``encode_image`` / ``encode_text``) skip the embedding layers."""
        if self._saliency_only:
            raise RuntimeError("this ViLT is a pruned saliency teacher (saliency_teacher()); it only runs saliency_qk")
        x, keep, image_embeds, image_masks = self._joint_inputs(input_ids, attention_mask, pixel_values,
                                                                image_embeds, image_token_type_idx, image_masks,
                                                                generator, text_embeds)
        for block in self.transformer.blocks:
            x = block(x, attn_mask=keep)
        x = self.transformer.norm(x)
        length = input_ids.shape[1]
        return {"text_feats": x[:, :length], "image_feats": x[:, length:], "cls_feats": self.pooler(x),
                "raw_cls_feats": x[:, 0], "image_embeds": image_embeds, "image_masks": image_masks}

    # ------------------------------------------------------------------------------------------------ heads
    def itm_score(self, cls_feats: torch.Tensor) -> torch.Tensor:
        return self._modules["itm_score"](cls_feats)

    def mlm_score(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self._modules["mlm_score"](text_feats)

    def mlm_transform(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self._modules["mlm_score"].transform(text_feats)

    def mlm_output_embedding(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        head = self._modules["mlm_score"]
        return head.decoder.weight, head.bias

    def text_to_image_attention(self):
        """Grad-CAM's site: ViLT is single-stream and has no cross-attention, so the penultimate block's joint
        self-attention, read at the text rows; its keys are the text tokens, the image [CLS], then the patches."""
        return penultimate(self.transformer.blocks).attn, lambda text_len: text_len + 1

    # ---------------------------------------------------------------------------------------- EPIC saliency
    def saliency_qk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """EPIC Eq. 8 for ViLT, which has no cross-attention: the *joint self-attention of the penultimate
        layer*, query = the image [CLS] token (joint position L, the first image token), keys = the L text
        tokens. Returns (q [B, heads, dh], K [B, heads, L, dh]), raw qkv projections of that layer's pre-LN input,
        without the 1/sqrt(dh) scale; EPIC averages q K^T over heads and takes the softmax over real text tokens
        (padding masked with ``attention_mask``). Layers after the penultimate one are never run."""
        x, keep, _, _ = self._joint_inputs(input_ids, attention_mask, pixel_values, image_embeds, 1, None, None)
        blocks = self.transformer.blocks
        penultimate = self.config.num_layers - 2
        for block in blocks[:penultimate]:
            x = block(x, attn_mask=keep)
        block = blocks[penultimate]
        heads = self.config.num_heads
        batch, tokens, width = x.shape
        qkv = block.attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        length = input_ids.shape[1]
        return qkv[0][:, :, length], qkv[1][:, :, :length]

    def saliency_teacher(self) -> "ViLT":
        """A frozen eval-mode copy keeping only what ``saliency_qk`` runs: embeddings, the layers before the
        penultimate one and the penultimate layer's norm1 + qkv (its other parts and the later layers, the final
        norm, pooler and heads are dropped)."""
        teacher = copy.deepcopy(self)
        penultimate = teacher.config.num_layers - 2
        kept = list(teacher.transformer.blocks[:penultimate + 1])
        last = kept[-1]
        for name in ("attn.proj", "norm2", "mlp", "ls1", "ls2"):
            parent, _, child = name.rpartition(".")
            owner = last.get_submodule(parent) if parent else last
            setattr(owner, child, nn.Identity())
        teacher.transformer.blocks = nn.Sequential(*kept)
        teacher.transformer.norm = nn.Identity()
        for name in ("pooler", "mlm_score", "itm_score", CONSISTENCY_HEAD):
            if name in teacher._modules:
                del teacher._modules[name]
        teacher._saliency_only = True
        teacher.requires_grad_(False)
        return teacher.eval()

    # ------------------------------------------------------------------------------------------- optimizer
    def param_groups_spec(self) -> Dict[str, Dict[str, List[str]]]:
        """{'backbone'|'fusion'|'head': {'decay'|'no_decay': names}} over trainable parameters (``param_groups_spec``)."""
        return param_groups_spec(name for name, p in self.named_parameters() if p.requires_grad)

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Weights of another image size (pretrained at 384, fine-tuned at 480, ...): the position grid is
        resampled with ViLT's interpolation (bilinear, align_corners=True). Used by the task-weight loader."""
        pos = state.get("transformer.pos_embed")
        own = self.transformer.pos_embed
        if pos is None or pos.shape == own.shape:
            return state
        grid, target = round((pos.shape[1] - 1) ** 0.5), self.config.grid_size
        spatial = pos[:, 1:].transpose(1, 2).reshape(1, pos.shape[2], grid, grid)
        spatial = interpolate_position_grid(spatial.float(), target, target).to(pos.dtype)
        logger.info("position grid %dx%d resampled to %dx%d", grid, grid, target, target)
        return {**state, "transformer.pos_embed": torch.cat([pos[:, :1], spatial.flatten(2).transpose(1, 2)], dim=1)}

    # ------------------------------------------------------------------------------------------------ files
    def save_pretrained(self, directory: str) -> None:
        """``model.safetensors`` (ViLT key names) + ``config.json`` (ViLTConfig) in ``directory``."""
        if self._saliency_only:
            raise RuntimeError("a pruned saliency teacher cannot be saved as a model; save the full ViLT")
        config = dataclasses.replace(self.config, vit_pretrained=None)  # the weights are in the file
        write_export(directory, self.state_dict(), dataclasses.asdict(config))

    @classmethod
    def from_pretrained(cls, directory: str) -> "ViLT":
        values, state, source = read_export(directory, "ViLT.save_pretrained or tools/convert_official.py --family vilt")
        model = cls(dataclasses.replace(vilt_config_from_dict(values, source=source), vit_pretrained=None))
        model.load_state_dict(state)
        return model


# ------------------------------------------------------------------------------------------- parameter groups
HEAD_MODULES = ("mlm_score", "itm_score", CONSISTENCY_HEAD, "rank_output", "vqa_classifier", "nlvr2_classifier",
                "snli_classifier")
BACKBONE_PREFIXES = ("text_embeddings.", "transformer.patch_embed.", "transformer.cls_token",
                     "transformer.pos_embed")
NO_DECAY_PARTS = ("LayerNorm", "norm", "norm1", "norm2")


def lr_group_of(name: str) -> str:
    """'backbone' (text and patch embeddings), 'fusion' (modality types, the joint blocks, final norm, pooler) or
    'head' (pretraining and downstream heads). ViLT trains all of them at one lr in pretraining (lr_mult 1) and
    multiplies only its downstream classifiers (VQA: x10), so the ViLT configs keep both multipliers at 1."""
    if name.split(".")[0] in HEAD_MODULES:
        return "head"
    if name.startswith(BACKBONE_PREFIXES):
        return "backbone"
    return "fusion"


def uses_weight_decay(name: str) -> bool:
    """ViLT's rule (vilt_utils.set_schedule): no decay on biases and LayerNorm / norm / norm1 / norm2 parameters;
    position embeddings and the [CLS] token are decayed."""
    if "bias" in name:
        return False
    return not any(part in NO_DECAY_PARTS for part in name.split(".")[:-1])


def param_groups_spec(names) -> Dict[str, Dict[str, List[str]]]:
    spec = {group: {"decay": [], "no_decay": []} for group in ("backbone", "fusion", "head")}
    for name in names:
        spec[lr_group_of(name)]["decay" if uses_weight_decay(name) else "no_decay"].append(name)
    return spec


# ------------------------------------------------------------------------------------------ pretrained ViT
VIT_IGNORED_PREFIXES = ("head.", "head_drop.", "fc_norm.", "pre_logits.", "norm_pre.")


def load_vit_weights(transformer: nn.Module, path: str) -> None:
    """timm ViT weights (e.g. vit_base_patch32_384, ImageNet-21k + 1k at 384) from a local file into ViLT's
    transformer: .npz (Google's release, timm's own loader) or a state dict (.pth / .bin / .safetensors). The
    position embedding is resampled to the model's grid; extra blocks are dropped; classifier heads ignored."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.vit_pretrained={path!r} does not exist; download timm's "
                                f"vit_base_patch32_384 weights to a local file (.pth, .safetensors or .npz)")
    if path.endswith(".npz"):
        transformer.load_pretrained(path)
        return
    state = load_state_dict(path)
    state = {k: v for k, v in checkpoint_filter_fn(state, transformer, interpolation="bilinear").items()
             if not k.startswith(VIT_IGNORED_PREFIXES)}
    depth = len(transformer.blocks)
    state = {k: v for k, v in state.items()
             if not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth)}
    own = transformer.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        raise ValueError(f"{path} does not fit ViLT's transformer (hidden_size / num_layers / patch_size): "
                         f"shape mismatches {wrong}, missing {missing}, unexpected {unexpected}")
    transformer.load_state_dict(state)
    logger.info("ViT weights from %s", path)
