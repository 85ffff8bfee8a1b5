"""The model's building blocks beyond torch.nn: rotary position tables and attention written out
step by step (the reference that `attention="plain"` selects and tests compare against)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .inference import masks


def plain_attention(q, k, v, attn_mask, is_causal, dropout_p):
    """softmax(q k^T / sqrt(d)) v for q (B, H, Tq, D), k and v (B, H, Tk, D); attn_mask boolean,
    True where attention is allowed; causal aligns the queries with the last Tq keys."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, Tq, Tk)
    if is_causal:
        attn_mask = masks.causal(q.size(-2), k.size(-2), device=q.device)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return weights @ v  # (B, H, Tq, D)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (*positions.shape, head_dim), in transformers' Llama
    layout (the two halves of a head rotate together), computed in float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (*positions.shape, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (*positions.shape, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its positions; cos/sin are (T, D) or (B, T, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): one table for every head
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
