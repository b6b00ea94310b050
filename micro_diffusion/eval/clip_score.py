"""CLIP score: 100 x max(cosine(image embedding, caption embedding), 0), averaged, with an open_clip model."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

DEFAULT_CLIP = ("ViT-L-14", "openai")  # the model text-to-image papers usually report CLIP score with


@torch.no_grad()
def clip_score(images: list[str | Path], captions: list[str], model_name: str = DEFAULT_CLIP[0],
               pretrained: str | None = DEFAULT_CLIP[1], device: str = "cpu", batch_size: int = 64) -> dict:
    """Mean and std of the per-image CLIP score of images against their captions, with the settings used."""
    import open_clip

    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} images and "
                         f"{len(captions)} captions")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    scores = []
    for i in tqdm(range(0, len(images), batch_size), desc="clip score", leave=False):
        pix = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images[i:i + batch_size]]).to(device)
        img = model.encode_image(pix).float()  # (B, E)
        txt = model.encode_text(tokenizer(captions[i:i + batch_size]).to(device)).float()  # (B, E)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # (B,)
        scores.append(100 * cos.clamp(min=0))
    s = torch.cat(scores)
    return {"clip_score": float(s.mean()), "clip_score_std": float(s.std()) if len(s) > 1 else 0.0,
            "settings": {"clip_model": model_name, "clip_pretrained": pretrained, "num_images": len(images),
                         "definition": "100 * max(cos(image, caption), 0), mean over images"}}
