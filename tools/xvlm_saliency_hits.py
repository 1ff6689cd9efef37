#!/usr/bin/env python
"""How often X-VLM's EPIC saliency (Eq. 8) lands on content words of the shapes world, for each saliency query
choice of the family (``saliency_query``: fused_cls | image_cls_cross), against uniform masking.

    python tools/xvlm_saliency_hits.py --model MODEL_DIR --data SHAPES_DIR

MODEL_DIR is an X-VLM written by save_pretrained (e.g. tools/xvlm_shapes_box.py --save). For every validation
caption, alpha = softmax over its real tokens of mean_k q_k K_k^T / sqrt(dh); the hit rate is the alpha mass on
content-word tokens (the chance that one saliency draw picks a content word); uniform masking's rate is the
content tokens' share. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from epic.data.text import load_tokenizer, tokenize_captions  # noqa: E402
from epic.data.transforms import eval_transform  # noqa: E402
from epic.models.xvlm import XVLM  # noqa: E402


def val_pairs(root: Path):
    import io

    pairs = []
    for shard in sorted((root / "val").glob("*.tar")):
        raw: dict = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                raw.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in raw.values():
            meta = json.loads(sample["json"])
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            pairs += [(image, c, f) for c, f in zip(meta["caption"], meta["content_words"])]
    return pairs


@torch.no_grad()
def hit_rates(model: XVLM, pairs, tokenizer, max_text_len: int = 32) -> dict:
    to_tensor = eval_transform(model.config.image_size)
    out = {"captions": len(pairs)}
    for choice in ("fused_cls", "image_cls_cross"):
        model.config.saliency_query = choice
        mass, share = [], []
        for start in range(0, len(pairs), 64):
            chunk = pairs[start:start + 64]
            text = tokenize_captions(tokenizer, [c for _, c, _ in chunk], [f for _, _, f in chunk], max_text_len)
            pixels = torch.stack([to_tensor(image) for image, _, _ in chunk])
            q, k = model.saliency_qk(text["input_ids"], text["attention_mask"], pixel_values=pixels)
            scores = torch.einsum("bhd,bhld->bhl", q, k).mean(1) / q.shape[-1] ** 0.5
            real = text["attention_mask"].bool() & ~text["special_tokens_mask"]
            alpha = scores.masked_fill(~real, float("-inf")).softmax(-1)
            content = text["content_mask"] & real
            mass.append((alpha * content).sum(-1))
            share.append(content.sum(-1) / real.sum(-1))
        out[choice] = round(float(torch.cat(mass).mean()), 4)
        out["uniform"] = round(float(torch.cat(share).mean()), 4)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    args = parser.parse_args(argv)
    model = XVLM.from_pretrained(str(args.model)).eval()
    print(json.dumps(hit_rates(model, val_pairs(args.data), load_tokenizer(args.data / "tokenizer"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
