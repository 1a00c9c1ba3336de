"""Small transformers used through an import path (the recipe's folder is on the import
path): ``transformers:make_vit`` by vit-fashion.yaml on Fashion-MNIST's flat 784 pixels,
``transformers:make_token_classifier`` by tokens-1000.yaml on the generated ``tokens`` data.

They are here to put attention under low precision: the softmax of ``q k^T`` and the
matmuls around it. ``make_vit``'s :class:`Attention` calls
``F.scaled_dot_product_attention`` through the module attribute at call time (never an
imported name), so the simulator's interception of that function reaches it.
``make_token_classifier`` uses torch's own ``nn.TransformerEncoderLayer`` instead, the
layer a user is most likely to bring.

Layer names in stats and plans are the qualified names below: for the ViT
``patches.proj``, ``patches`` (its position embedding and CLS token), ``blocks.0.norm1``,
``blocks.0.attn.qkv``, ``blocks.0.attn.proj``, ``blocks.0.norm2``, ``blocks.0.mlp.fc1``,
``blocks.0.mlp.fc2``, ``norm``, ``head``; for the token classifier ``embed`` (its position
embedding), ``embed.tokens``, ``encoder.layers.0.self_attn`` (and its ``.out_proj``),
``encoder.layers.0.linear1``, ``encoder.layers.0.linear2``, ``encoder.layers.0.norm1``,
``encoder.layers.0.norm2``, ``norm``, ``head``. An attention's softmax is named after the
module that calls it: ``blocks.0.attn``, ``encoder.layers.0.self_attn``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Patches(nn.Module):
    """Flat ``size*size`` pixels to a sequence of patch embeddings, plus a CLS token in front
    (``cls``) and a learned position embedding. A linear map over each flattened
    non-overlapping ``patch x patch`` square is the same as a convolution with stride
    ``patch``; as an ``nn.Linear`` (``proj``) it is one plain matmul layer. The CLS token and
    the positions are parameters of this module itself, so they get a layer name of their
    own (``patches``)."""

    def __init__(self, dim: int, size: int = 28, patch: int = 7, cls: bool = True) -> None:
        super().__init__()
        if size % patch:
            raise ValueError(f"patch {patch} does not divide the image size {size}")
        self.size, self.patch, self.grid = size, patch, size // patch
        self.proj = nn.Linear(patch * patch, dim)
        tokens = self.grid * self.grid + (1 if cls else 0)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p = x.shape[0], self.grid, self.patch
        # (b, g*p, g*p) -> (b, g, p, g, p) -> (b, g, g, p, p) -> (b, g*g, p*p): one row per patch
        patches = x.reshape(b, g, p, g, p).transpose(2, 3).reshape(b, g * g, p * p)
        tokens = self.proj(patches)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1)
        return tokens + self.pos


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection, the heads split apart,
    ``F.scaled_dot_product_attention`` (its softmax scale is ``1/sqrt(head dim)``), the heads
    joined and projected by ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (b, heads, n, head dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1``, GELU, ``fc2``: the position-wise feed-forward part of a block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, ``depth`` pre-norm blocks, a final LayerNorm, then the CLS token's
    features (``cls``) or the mean over the patches into a linear ``head``."""

    def __init__(self, dim: int = 48, depth: int = 2, heads: int = 4, mlp_ratio: int = 2, classes: int = 10,
                 size: int = 28, patch: int = 7, cls: bool = True) -> None:
        super().__init__()
        self.patches = Patches(dim, size, patch, cls)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.patches(x)))
        return self.head(x[:, 0] if self.patches.cls is not None else x.mean(dim=1))


def make_vit(dim: int = 48, depth: int = 2, heads: int = 4, mlp_ratio: int = 2, classes: int = 10, size: int = 28,
             patch: int = 7, cls: bool = True) -> nn.Module:
    """A small ViT for one-channel ``size x size`` images given as flat ``size*size`` features."""
    return ViT(dim, depth, heads, mlp_ratio, classes, size, patch, cls)


class TokenEmbedding(nn.Module):
    """Token ids to vectors (``tokens``, an ``nn.Embedding``) plus a learned position embedding
    (``pos``, a parameter of this module)."""

    def __init__(self, vocab: int, dim: int, length: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, length, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x) + self.pos[:, :x.shape[1]]


class TokenClassifier(nn.Module):
    """Embedding, torch's ``nn.TransformerEncoder`` (pre-norm layers, no dropout, so runs are
    deterministic), the mean over the positions, a final LayerNorm and a linear ``head``."""

    def __init__(self, vocab: int = 1000, classes: int = 1000, length: int = 32, dim: int = 32, depth: int = 1,
                 heads: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab, dim, length)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=hidden, dropout=0.0, batch_first=True,
                                           norm_first=True)
        # enable_nested_tensor only matters with a padding mask, which this model never has;
        # off, torch does not warn that norm_first layers cannot use it.
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(x)).mean(dim=1)))


def make_token_classifier(vocab: int = 1000, classes: int = 1000, length: int = 32, dim: int = 32, depth: int = 1,
                          heads: int = 2, hidden: int = 64) -> nn.Module:
    """A transformer encoder over int64 token ids of shape (batch, ``length``) or shorter."""
    return TokenClassifier(vocab, classes, length, dim, depth, heads, hidden)
