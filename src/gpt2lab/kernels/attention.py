"""Attention on a CPU: what `accelerate` makes of the model's CausalSelfAttention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import plain_attention
from ..model import CausalSelfAttention
from . import cpu


def cpu_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention, except:
    - a compiled decoding step (one query) is written out in float32 for inductor to fuse into its
      own kernels: SDPA is an external kernel to it, and would need float32 copies of bfloat16 keys
      and values where the CPU has no fast bfloat16;
    - bfloat16 is computed in float32 where the CPU has no fast bfloat16 (the result in bfloat16
      again), several times faster there (docs/benchmarks.md)."""
    slow_bfloat16 = q.dtype == torch.bfloat16 and not cpu.fast_bfloat16()
    if (
        (q.dtype == torch.float32 or slow_bfloat16)
        and q.size(-2) == 1 and not dropout_p and not is_causal and torch.compiler.is_compiling()
    ):
        return plain_attention(q.float(), k.float(), v.float(), attn_mask, False, 0.0).to(q.dtype)
    if slow_bfloat16:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


class CPUSelfAttention(CausalSelfAttention):
    def attend(self, q, k, v, attn_mask, dropout_p: float, is_causal: bool) -> torch.Tensor:
        if self.attention == "sdpa" and q.device.type == "cpu":
            return cpu_attention(q, k, v, attn_mask, dropout_p, is_causal)
        return super().attend(q, k, v, attn_mask, dropout_p, is_causal)
