"""The precomputed empty-prompt text embedding (the official model only ever uses the prompt "")."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PromptEmbedding(ModelMixin, ConfigMixin):
    """CLIP ViT-L/14 last hidden state of "" ([1, 77, D]), stored with the model so no text encoder is needed."""

    @register_to_config
    def __init__(self, sequence_length: int = 77, embedding_dim: int = 768) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(1, sequence_length, embedding_dim), requires_grad=False)

    def forward(self, batch_size: int = 1) -> torch.Tensor:
        return self.embedding.expand(batch_size, -1, -1)

    @classmethod
    def from_tensor(cls, embedding: torch.Tensor) -> "PromptEmbedding":
        if embedding.ndim == 2:
            embedding = embedding[None]
        if embedding.ndim != 3 or embedding.shape[0] != 1:
            raise ValueError(f"a prompt embedding must be [1, L, D], got {tuple(embedding.shape)}")
        module = cls(sequence_length=embedding.shape[1], embedding_dim=embedding.shape[2])
        with torch.no_grad():
            module.embedding.copy_(embedding.float())
        return module
