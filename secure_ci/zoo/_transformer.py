"""A small ViT-like transformer encoder, written so that torch.fx traces it cleanly.

Attention is spelled out with matmul and softmax, and every reshape uses sizes fixed at
construction (``-1`` for the batch), so no Python ints derived from the input cross a cut.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TRANSFORMER_INPUT_SHAPE", "transformer_encoder"]

TRANSFORMER_INPUT_SHAPE = (1, 3, 32, 32)


class Attention(nn.Module):
    """Multi-head self-attention over ``tokens`` tokens of width ``dim``."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.tokens, self.head_dim = heads, tokens, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).reshape(-1, self.tokens, 3, self.heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (
            torch.matmul(attn, v)
            .transpose(1, 2)
            .reshape(-1, self.tokens, self.heads * self.head_dim)
        )
        result: torch.Tensor = self.proj(out)
        return result


class EncoderBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, tokens: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        result: torch.Tensor = x + self.mlp(self.norm2(x))
        return result


class TransformerEncoder(nn.Module):
    """Patch embedding, learned positions, ``depth`` encoder blocks, mean-pooled classifier."""

    def __init__(
        self, num_classes: int, dim: int, depth: int, heads: int, patch: int, image: int
    ) -> None:
        super().__init__()
        if dim % heads or image % patch:
            raise ValueError("dim must divide by heads and image by patch")
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, tokens, 2) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.blocks(x))
        logits: torch.Tensor = self.head(x.mean(dim=1))
        return logits


def transformer_encoder(
    num_classes: int = 10, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 8
) -> nn.Module:
    """Small ViT-like encoder on 32x32 RGB images (16 tokens of width ``dim`` by default)."""
    return TransformerEncoder(num_classes, dim, depth, heads, patch, TRANSFORMER_INPUT_SHAPE[-1])
