"""The GPT-2 model in plain PyTorch, readable in one sitting.

Design:
- pre-LayerNorm decoder blocks, tanh-GELU MLP, learned positions, tied embeddings (GPT-2);
- the options of the modern recipe, each off by default (`GPTConfig`): RoPE, RMSNorm, QK-norm,
  ReLU² / SwiGLU, logit soft-capping, zero-initialised projections, grouped-query attention;
- attention through F.scaled_dot_product_attention (or `layers.plain_attention`), with a KV cache
  (`inference.kv_cache.CacheRows`) and per-row positions and masks for padded and packed batches;
- the loss chunk by chunk from the hidden states (`loss.linear_cross_entropy`), never the full logits;
- module and parameter names of transformers' GPT2LMHeadModel (``transformer.h.0.attn.c_attn``
  and so on), so that converting weights is a matter of transposing the Conv1D matrices.

`gpt2lab.GPT` is this class with its loader, writer and generation attached (`gpt2lab.api`).
Nothing here is specific to one kind of hardware: `gpt2lab.kernels.accelerate(model)` swaps in the
CPU kernels, explicitly, where a model runs on a CPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .layers import apply_rope, plain_attention, rope_tables
from .loss import PYTORCH, HeadKernels, linear_cross_entropy

if TYPE_CHECKING:
    from .inference.kv_cache import CacheRows

Rope = tuple[torch.Tensor, torch.Tensor]


def make_dropout(p: float) -> nn.Module:
    # nn.Dropout(0) still costs a call per use; decoding makes thousands of them a second.
    return nn.Dropout(p) if p else nn.Identity()


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(dim, eps=config.layer_norm_epsilon, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.n_embd = config.n_embd
        self.layer_index = layer_index
        self.dropout = config.dropout
        self.attention = config.attention
        kv_width = self.kv_heads * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = make_dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.layer_norm_epsilon)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.layer_norm_epsilon)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: CacheRows | None = None,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape  # batch, time, n_embd
        kv_width = self.kv_heads * self.head_dim
        q, k, v = self.c_attn(x).split([self.n_embd, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, n_head, head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)  # (B, T, kv_heads, head_dim)
        if hasattr(self, "q_norm"):
            # Under autocast q and k are bf16 while the gains are float32: cast the gains, so
            # that the fused kernel runs (it computes the mean square in float32 either way).
            q = F.rms_norm(q, (self.head_dim,), self.q_norm.weight.to(q.dtype), self.q_norm.eps)
            k = F.rms_norm(k, (self.head_dim,), self.k_norm.weight.to(k.dtype), self.k_norm.eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, head_dim)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, kv_heads, keys, head_dim)
        if self.kv_heads != self.n_head:
            k = k.repeat_interleave(self.n_head // self.kv_heads, dim=1)  # (B, n_head, keys, head_dim)
            v = v.repeat_interleave(self.n_head // self.kv_heads, dim=1)
        # Without a mask, the queries are the last T of the keys: causal when T > 1, and a
        # single query may see every key.
        is_causal = attn_mask is None and T > 1
        dropout_p = self.dropout if self.training else 0.0
        y = self.attend(q, k, v, attn_mask, dropout_p, is_causal)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, attn_mask, dropout_p: float, is_causal: bool) -> torch.Tensor:
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        return plain_attention(q, k, v, attn_mask, is_causal, dropout_p)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.activation = config.activation
        branches = 2 if config.activation == "swiglu" else 1  # swiglu's gate and value, stacked
        self.c_fc = nn.Linear(config.n_embd, branches * config.hidden_size, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_size, config.n_embd, bias=config.bias)
        if config.activation == "gelu_tanh":
            self.gelu = nn.GELU(approximate="tanh")
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, rope)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """GPT-2 (and the modern recipe's options). ``logits, _ = model(idx)``: logits for every position; ``_, loss = model(idx, targets)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        layers = dict(wte=nn.Embedding(config.embedding_rows, config.n_embd))
        if config.position == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers.update(
            drop=make_dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.embedding_rows, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.head_kernels: HeadKernels = PYTORCH  # the loss's products and softmax (loss.py)
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream, so that the
        # variance of the stream does not grow with depth; the modern recipe starts them at zero,
        # so that every block begins as the identity.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)
                if config.zero_init_proj:
                    nn.init.zeros_(param)
        if config.zero_init_proj and not config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- sizes -------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (tied matrices once); by default without position embeddings,
        which cost no matmul FLOPs."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            total -= self.transformer.wpe.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12*L*H*Q*T, as in the PaLM paper."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    # ---- forward -----------------------------------------------------------------------------

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: CacheRows | None = None,
    ) -> torch.Tensor:
        """Final-norm outputs (B, T, n_embd).

        position_ids: (B, T) or (T,); by default each row's cache start + arange(T) (0.. without
            a cache).
        attn_mask: boolean, broadcastable to (B, n_head, T, keys), True where attention is allowed;
            by default causal over each row's cached keys plus these T.
        kv_cache: `KVCache.rows(slots, starts)`: where the new keys go and what each row sees.
        """
        T = idx.size(1)
        if kv_cache is not None:
            if kv_cache.end(T) > self.config.block_size:
                raise ValueError(f"sequence of {kv_cache.end(T)} tokens exceeds the block size {self.config.block_size}")
            if position_ids is None:
                position_ids = kv_cache.positions(T, idx.device)
            if attn_mask is None:
                attn_mask = kv_cache.key_mask(T, idx.device)
        elif position_ids is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the block size {self.config.block_size}")
            position_ids = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)
        rope = None
        if self.config.position == "rope":
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            rope = rope_tables(position_ids, self.config.head_dim, self.config.rope_base, dtype)
        else:
            x = x + self.transformer.wpe(position_ids)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache, rope)
        return self.transformer.ln_f(x)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the real vocabulary (padded rows cut) for hidden states (..., n_embd)."""
        return self._head(hidden)[..., : self.config.vocab_size].float()

    def untie_head(self) -> None:
        """Give the output head its own copy of the embedding matrix (quantizing replaces the head
        but not the embedding lookup)."""
        if self.lm_head.weight is self.transformer.wte.weight:
            self.lm_head.weight = nn.Parameter(self.transformer.wte.weight.detach().clone())

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the targets that are not -1, from hidden states (B, T, n_embd),
        chunk by chunk (`loss.linear_cross_entropy`): the (B, T, rows) logits are never built. The
        padded rows take part in the softmax, as they did in the loss over the full logits."""
        if hidden.device.type == "cpu" and not torch.compiler.is_compiling():
            # A chat batch ignores most targets (prompts, padding): their rows need no logits. On
            # a GPU, finding them would cost a sync and, compiled, a graph break.
            kept = targets != -1
            if not kept.all():
                hidden, targets = hidden[kept], targets[kept]
        if isinstance(self.lm_head, nn.Linear):
            return linear_cross_entropy(
                hidden, self.lm_head.weight, targets, self.config.logit_softcap, self.head_kernels
            )
        logits = self._head(hidden)  # a quantized head has no weight matrix to chunk
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Without targets: (logits (B, T, embedding rows) for every position, None). With targets:
        (None, the mean cross-entropy over the targets that are not -1), computed without the full
        logits (`loss`); `model(idx)` or `model.logits(model.hidden_states(idx))` give those.
        position_ids and attn_mask as `hidden_states` takes them (packed conversations)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of {T} tokens: the block size is {self.config.block_size}"
            )
        hidden = self.hidden_states(idx, position_ids=position_ids, attn_mask=attn_mask)
        if targets is not None:
            return None, self.loss(hidden, targets)
        return self._head(hidden), None


__all__ = ["GPTConfig", "Transformer", "plain_attention"]
