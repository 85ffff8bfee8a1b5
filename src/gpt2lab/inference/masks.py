"""The attention masks of gpt2lab, in one place: boolean, True where a query may attend a key,
shaped to broadcast against (B, n_head, queries, keys) scores as F.scaled_dot_product_attention
takes them."""

from __future__ import annotations

import torch


def causal(queries: int, keys: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(queries, keys): the queries are the last `queries` of the keys, each seeing itself and
    what came before."""
    keys = queries if keys is None else keys
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def packed(document: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) for rows that pack several documents ((B, T) document numbers): causal within
    each document, nothing across."""
    same_document = document[:, :, None] == document[:, None, :]  # (B, T, T)
    return (same_document & causal(document.size(1), device=document.device)).unsqueeze(1)


def left_padded(first_real: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, T) for rows whose first `first_real[b]` tokens are padding: causal over the real
    keys; a padding query sees itself, so that no softmax row is empty."""
    columns = torch.arange(T, device=first_real.device)
    key_is_real = columns[None, :] >= first_real[:, None]  # (B, T)
    mask = causal(T, device=first_real.device)[None] & key_is_real[:, None, :]  # (B, T, T)
    return (mask | torch.eye(T, dtype=torch.bool, device=first_real.device)).unsqueeze(1)


def real_keys(pads: torch.Tensor, keys: int) -> torch.Tensor:
    """(B, 1, 1, keys) for one query per row seeing every key but the row's `pads[b]` padding."""
    key_is_real = torch.arange(keys, device=pads.device)[None, :] >= pads[:, None]  # (B, keys)
    return key_is_real[:, None, None, :]


def up_to(positions: torch.Tensor, keys: int) -> torch.Tensor:
    """(B, 1, T, keys) for queries at `positions` (B, T) of a cache: each sees the keys up to its own."""
    return (torch.arange(keys, device=positions.device) <= positions[:, :, None]).unsqueeze(1)


def within_window(position: torch.Tensor, pads: torch.Tensor, keys: int) -> torch.Tensor:
    """(B, 1, 1, keys) for one query per row at cache `position` (a 1-element tensor) whose row
    starts at `pads[b]`: the keys from there up to the position."""
    columns = torch.arange(keys, device=pads.device)
    visible = (columns[None, :] <= position) & (columns[None, :] >= pads[:, None])  # (B, keys)
    return visible[:, None, None, :]


def context_or_own_group(groups: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) for rows of a shared context (group 0) followed by several continuations
    (groups 1, 2, ...), each seeing the context and its own earlier tokens; padding (group -1)
    sees the context and earlier padding, so its rows stay finite, and no real query sees it."""
    same = groups[:, :, None] == groups[:, None, :]  # (B, T, T)
    context = groups[:, None, :] == 0
    return (causal(groups.size(1), device=groups.device) & (same | context)).unsqueeze(1)


def grouped_batch(rows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, positions, mask) for rows that each hold a shared context (group 0) and its
    continuations (groups 1, 2, ...): `row.tokens`, `row.positions` and `row.groups` padded on the
    right to the longest row (group -1), with `context_or_own_group`'s mask. HellaSwag and CORE
    score their choices this way, a context computed once for all of them."""
    length = max(len(row.tokens) for row in rows)
    tokens = torch.zeros((len(rows), length), dtype=torch.int64)
    positions = torch.zeros((len(rows), length), dtype=torch.int64)
    groups = torch.full((len(rows), length), -1, dtype=torch.int64)
    for r, row in enumerate(rows):
        n = len(row.tokens)
        tokens[r, :n] = torch.as_tensor(row.tokens)
        positions[r, :n] = torch.as_tensor(row.positions)
        groups[r, :n] = torch.as_tensor(row.groups)
    return tokens.to(device), positions.to(device), context_or_own_group(groups.to(device))
