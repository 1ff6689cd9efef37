"""Fig. 5: Grad-CAM of the cross-attention maps for a consistent and an inconsistent token, as pictures and as a
number: the pointing game on the shapes world, where every object's box is known.

Model: the vanilla and the EPIC run of each seed (Table 4's pretraining runs). Probe: a pair scene (two objects,
version 2 world) captioned "the <colour1> <shape1> is <relation> the <colour2> <shape2>"; the token is the colour
word of one of the objects, as it is (consistent) or replaced by a colour that is not in the image (inconsistent).
Grad-CAM (as ALBEF's visualisation): the text stream's penultimate cross-attention A [heads, text, image] and the
gradient G of the image-text matching score (the ITM head's match logit, the same head for both models) w.r.t. A;
(A: the penultimate fusion layer's; in the last one only [CLS] reaches the ITM head)
the map of token t is mean over heads of relu(G ⊙ A)[t] over the image patches (the image [CLS] dropped).
Each family names its site (`VLPModel.text_to_image_attention`): METER, ALBEF and X-VLM have that
cross-attention; ViLT is a single-stream transformer without one, so its A is the penultimate block's joint
self-attention restricted to the text-query rows and the image-patch-key columns (how much each word reads each
patch); the text-key columns are left out, and the scores are shares of the map, so they need no renormalisation.
Scores per map: the share of its mass inside the named object's box and the pointing-game hit (its maximum inside
the box). Boxes are the world's region boxes (`regions`: the smallest pixel box holding the drawn object).
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .common import (VANILLA, Unit, Variant, _stage, analysis_dir, format_cell, markdown_table, row_label, run_unit,
                     write_report)

TITLE = "Fig. 5: Grad-CAM of cross-attention, pointing game on the named object (consistent / inconsistent token)"
MODELS = (VANILLA, Variant("EPIC", "epic", ()))
PROBES = 64


# ------------------------------------------------------------------------------------------------ scores
def patch_boxes(grid: int) -> torch.Tensor:
    """[grid*grid, 4] (x0, y0, x1, y1) of each patch as fractions of the image side, row-major."""
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    y0, x0 = torch.meshgrid(edges[:-1], edges[:-1], indexing="ij")
    return torch.stack([x0.flatten(), y0.flatten(), x0.flatten() + 1 / grid, y0.flatten() + 1 / grid], dim=1)


def inside_box(grid: int, box: Sequence[float]) -> torch.Tensor:
    """[grid, grid] bool: patches whose centre lies in box (x0, y0, x1, y1), fractions of the side."""
    patches = patch_boxes(grid)
    cx, cy = (patches[:, 0] + patches[:, 2]) / 2, (patches[:, 1] + patches[:, 3]) / 2
    x0, y0, x1, y1 = box
    return ((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)).view(grid, grid)


def pointing_scores(cam: torch.Tensor, box: Sequence[float]) -> dict[str, float]:
    """cam [grid, grid] >= 0 -> share of its mass inside the box, and the pointing-game hit (argmax in the box)."""
    grid = cam.shape[0]
    inside = inside_box(grid, box)
    total = float(cam.sum())
    share = float(cam[inside].sum()) / total if total > 0 else 0.0
    hit = bool(inside.flatten()[int(cam.flatten().argmax())]) if total > 0 else False
    return {"mass_in_box": share, "pointing_hit": float(hit), "box_share": float(inside.float().mean())}


def object_box(obj: dict, image_size: int) -> tuple[float, float, float, float]:
    """The box of a shapes-world object as (x0, y0, x1, y1) fractions of the side: the region box of the world's
    `regions` (the smallest pixel box holding the drawn object, epic.data.synthetic.object_pixel_box)."""
    from epic.data.synthetic import object_pixel_box

    x, y, w, h = object_pixel_box(obj, image_size)
    return (x / image_size, y / image_size, (x + w) / image_size, (y + h) / image_size)


# ------------------------------------------------------------------------------------------------ Grad-CAM
@dataclass(frozen=True)
class AttentionSite:
    """Where a family's Grad-CAM reads attention: `module` calls F.scaled_dot_product_attention once per forward
    with the text tokens as queries; the image patches are its keys from `first_patch` on (the image [CLS] / pooled
    token before them is dropped; for ViLT's joint attention the text tokens come first, then the image [CLS])."""

    module: torch.nn.Module
    first_patch: Callable[[int], int]  # text length -> index of the first image patch among the keys


def attention_site(model) -> AttentionSite:
    """The family's own Grad-CAM site (``VLPModel.text_to_image_attention``)."""
    module, first_patch = model.text_to_image_attention()
    return AttentionSite(module, first_patch)


def explicit_sdpa(store: dict):
    """F.scaled_dot_product_attention with its softmax made explicit: the probabilities (their gradient retained)
    go to store["attn"]; same outputs as the fused kernel."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if is_causal or dropout_p or kwargs:
            raise ValueError("Grad-CAM's explicit attention supports neither causal masks, dropout nor "
                             f"{sorted(kwargs)} (call it on a model in eval mode)")
        scores = query @ key.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
        attn = scores.softmax(-1)
        if attn.requires_grad:
            attn.retain_grad()
        store["attn"] = attn
        return attn @ value

    return sdpa


@contextmanager
def explicit_attention(attention_module, store: dict):
    """While `attention_module` runs, its F.scaled_dot_product_attention call is the explicit one
    (`explicit_sdpa`), keeping the attention probabilities in store["attn"]; every other module is untouched."""
    fused = F.scaled_dot_product_attention
    explicit = explicit_sdpa(store)

    def enter(*_):
        F.scaled_dot_product_attention = explicit

    def leave(*_):
        F.scaled_dot_product_attention = fused

    hooks = [attention_module.register_forward_pre_hook(enter), attention_module.register_forward_hook(leave)]
    try:
        yield store
    finally:
        for hook in hooks:
            hook.remove()
        F.scaled_dot_product_attention = fused


def gradcam_maps(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_index: torch.Tensor) -> torch.Tensor:
    """[B, grid, grid] Grad-CAM of token_index[b] at the family's attention site (`text_to_image_attention`: the
    text stream's penultimate cross-attention; ViLT: the penultimate joint self-attention, text rows x image columns),
    target = the ITM match logit. Not the last layer: there only the [CLS] row reaches the pooled ITM features,
    so every other token's gradient is zero (ALBEF's visualisation likewise reads a middle layer)."""
    site = attention_site(model)
    store: dict = {}
    model.zero_grad(set_to_none=True)
    with explicit_attention(site.module, store):
        out = model.infer(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        score = model.itm_score(out["cls_feats"])[:, 1]
        if "attn" not in store:
            raise RuntimeError(f"the {model.family} attention site ran no F.scaled_dot_product_attention call "
                               f"(an attention implementation without it?); Grad-CAM needs its probabilities")
        score.sum().backward()
    attn, grad = store["attn"], store["attn"].grad
    cam = (grad * attn).clamp(min=0).mean(dim=1)  # [B, queries, keys]
    rows = cam[torch.arange(cam.shape[0]), token_index, site.first_patch(input_ids.shape[1]):]
    grid = int(round(math.sqrt(rows.shape[-1])))
    if grid * grid != rows.shape[-1]:
        raise ValueError(f"{rows.shape[-1]} image-patch keys do not form a square grid (ViLT samples patches in "
                         f"training mode: call it in eval mode)")
    return rows.reshape(-1, grid, grid).detach()


# ------------------------------------------------------------------------------------------------ probes
def make_probes(count: int, seed: int, image_size: int) -> list[dict]:
    """Pair scenes with their caption, the probed object and an absent colour for the inconsistent version."""
    from epic.data.synthetic import RELATIONS, render_scene, sample_scene, world_tables

    colours = sorted(world_tables(2)["colours"])
    rng, probes = random.Random(f"gradcam/{seed}"), []
    while len(probes) < count:
        scene = sample_scene(rng, 2)
        if scene["scene"] != "pair":
            continue
        first, second = scene["objects"]
        phrase = RELATIONS[scene["relation"]][0].replace("*", "")
        which = rng.randrange(2)
        absent = [c for c in colours if c not in (first["colour"], second["colour"])]
        probes.append({"scene": scene, "image": render_scene(scene, image_size), "which": which,
                       "words": ["the", first["colour"], first["shape"], *phrase.split(), "the", second["colour"],
                                 second["shape"]],
                       "colour_word": 1 if which == 0 else 4 + len(phrase.split()), "swap": rng.choice(absent)})
    return probes


def encode_probe(probe: dict, tokenizer, max_len: int, inconsistent: bool) -> tuple[list[int], int]:
    words = list(probe["words"])
    if inconsistent:
        words[probe["colour_word"]] = probe["swap"]
    text = " ".join(words)
    start = sum(len(w) + 1 for w in words[: probe["colour_word"]])
    enc = tokenizer(text, return_offsets_mapping=True, max_length=max_len, truncation=True, padding="max_length")
    index = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a <= start < b)
    return enc["input_ids"], index


def load_vlm(run_dir: Path):
    """The VLM of a pretraining run (its family's model, the ITC head included when it has one), its tokenizer
    and its config."""
    from epic.data import load_tokenizer
    from epic.models.loading import load_model, tokenizer_path

    loaded = load_model(run_dir)
    model, config = loaded.model, loaded.config
    model.eval()
    return model, load_tokenizer(tokenizer_path(loaded.source, config)), config


def probe_model(run_dir: Path, probes: list[dict]) -> dict:
    """Per token type, the mean scores over the probes, and the maps of the first few (for the pictures)."""
    from epic.data.transforms import eval_transform

    model, tokenizer, config = load_vlm(run_dir)
    size, max_len = config["model"]["image_size"], config["data"]["max_text_len"]
    transform = eval_transform(size, config["data"].get("normalization", "clip"))
    pixels = torch.stack([transform(p["image"]) for p in probes])
    out = {}
    for kind in ("consistent", "inconsistent"):
        encoded = [encode_probe(p, tokenizer, max_len, kind == "inconsistent") for p in probes]
        ids = torch.tensor([e[0] for e in encoded])
        index = torch.tensor([e[1] for e in encoded])
        cams = gradcam_maps(model, pixels, ids, (ids != tokenizer.pad_token_id).long(), index)
        scores = [pointing_scores(c, object_box(p["scene"]["objects"][p["which"]], size)) for c, p in zip(cams, probes)]
        out[kind] = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
        out[kind]["maps"] = cams[:4].tolist()
    return out


def run_seed(study, seed: int) -> dict:
    path = analysis_dir(study, "gradcam") / f"seed{seed}.json"

    def compute() -> dict:
        runs = {v.name: Path(run_unit(study, v, seed)["dir"]) for v in MODELS}
        config_size = None
        results = {}
        for name, run_dir in runs.items():
            if config_size is None:
                config_size = load_vlm(run_dir)[2]["model"]["image_size"]
            probes = make_probes(8 if study.scale.name == "smoke" else PROBES, seed, config_size)
            results[name] = probe_model(run_dir, probes)
        return {"seed": seed, "image_size": config_size, "models": results}

    # the runs it reads (their folders name their pretraining settings): other runs are scored again, never reused
    return _stage(path, compute, study.collect_only, settings=[str(study.unit_dir(v, seed)) for v in MODELS])


def units(study):
    study.downstream = False
    from .common import pretraining_units

    return pretraining_units(study, MODELS) + [Unit(f"gradcam seed {s}", 1, lambda s=s: run_seed(study, s))
                                               for s in study.seeds]


def pictures(path: Path, result: dict, seed: int, scale) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    probes = make_probes(4, seed, result["image_size"])
    names = list(result["models"])
    fig, axes = plt.subplots(len(probes), 1 + 2 * len(names), figsize=(2.0 * (1 + 2 * len(names)), 2.1 * len(probes)))
    for row, probe in enumerate(probes):
        axes[row, 0].imshow(probe["image"])
        x0, y0, x1, y1 = (v * result["image_size"] for v in object_box(probe["scene"]["objects"][probe["which"]],
                                                                        result["image_size"]))
        axes[row, 0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1.5))
        words = list(probe["words"])
        axes[row, 0].set_title(" ".join(words), fontsize=5)
        for m, name in enumerate(names):
            for k, kind in enumerate(("consistent", "inconsistent")):
                ax = axes[row, 1 + 2 * m + k]
                cam = np.array(result["models"][name][kind]["maps"][row])
                ax.imshow(probe["image"])
                ax.imshow(cam, cmap="jet", alpha=0.5, extent=(0, result["image_size"], result["image_size"], 0),
                          interpolation="bilinear")
                token = words[probe["colour_word"]] if kind == "consistent" else probe["swap"]
                ax.set_title(f"{row_label(name, scale)}: '{token}' ({kind[:5]}.)", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(study):
    study.collect_only = True
    done = []
    for s in study.seeds:
        try:
            done.append(run_seed(study, s))
        except Exception:  # noqa: BLE001
            pass
    rows = []
    for variant in MODELS:
        for kind in ("consistent", "inconsistent"):
            at = [d["models"][variant.name][kind] for d in done if variant.name in d["models"]]
            rows.append([row_label(variant.name, study.scale), kind, format_cell([100 * a["mass_in_box"] for a in at]),
                         format_cell([100 * a["pointing_hit"] for a in at]),
                         format_cell([100 * a["box_share"] for a in at]), str(len(at))])
    table = markdown_table(["Model", "token", "Grad-CAM mass in box (%)", "pointing game (%)",
                            "box area = chance mass (%)", "seeds"], rows)
    if done:
        pictures(study.out / "gradcam.png", done[0], done[0]["seed"], study.scale)
    site = ("the penultimate joint self-attention's text-query x image-patch block (ViLT is single-stream)"
            if study.scale.family == "vilt" else "the text stream's penultimate cross-attention")
    write_report(study.out, study.name, TITLE, table,
                 [f"{PROBES} pair-scene probes per seed (the token: one object's colour word); Grad-CAM of the ITM "
                  f"match score on {site}. Chance = the box's share of the patches. "
                  "Pictures: gradcam.png (first seed: image with the box, then per model the consistent and the "
                  "inconsistent token).", f"Seeds with results: {len(done)} of {len(list(study.seeds))}."],
                 study.log)
    return table
