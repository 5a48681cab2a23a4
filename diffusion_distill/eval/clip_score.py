"""CLIP score: torchmetrics' ``CLIPScore`` (100 x cosine, mean over samples) on a local
Hugging Face CLIP folder; nothing is downloaded."""
from __future__ import annotations

import torch
from torch import nn

ENV_CLIP = "DDISTILL_CLIP"


class _ProjectedCLIP(nn.Module):
    """A CLIPModel whose ``get_text/image_features`` return the projected embeddings as tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (the projection in its
    ``pooler_output``), which torchmetrics 1.9's CLIPScore cannot use (it calls ``.norm`` on
    the result); transformers 4 returned the tensor, which passes through unchanged.
    """

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config  # torchmetrics reads config.text_config

    def get_text_features(self, *args, **kwargs):
        return _embedding(self.model.get_text_features(*args, **kwargs))

    def get_image_features(self, *args, **kwargs):
        return _embedding(self.model.get_image_features(*args, **kwargs))


def _embedding(out):
    return out if torch.is_tensor(out) else out.pooler_output


def clip_score_metric(folder: str):
    """torchmetrics' ``CLIPScore`` on a local CLIP folder (no hub access).

    torchmetrics 1.9 accepts a name or path only if it contains "openai", "jinaai" or
    "zer0int" and rejects other local folders; a callable returning (model, processor) is its
    supported way to give any model. The score's math stays torchmetrics'.
    """
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        return _ProjectedCLIP(model), CLIPProcessor.from_pretrained(folder, local_files_only=True)

    return CLIPScore(model_name_or_path=load)
