"""Every private PyTorch API gpt2lab uses, each behind a check that it exists, with a public
fallback that is safe where it does not (a fast path given up, never a wrong result). A newer
PyTorch that moves one of them costs speed, not correctness; tests/test_torch_compat.py runs each
fallback."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch


def forward_ad_active() -> bool:
    """Whether forward-mode AD is recording (a kernel outside autograd would drop its tangents).
    Unknown: assumed recording."""
    level = getattr(torch.autograd.forward_ad, "_current_level", None)
    return not isinstance(level, int) or level >= 0


@functools.cache
def _functorch_check() -> Callable[[torch.Tensor], bool] | None:
    return getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def is_functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether `x` is wrapped by vmap or grad (its data pointer is not its values). Unknown: assumed.
    Asked for every layer of every decoding step, so the check is looked up once."""
    check = _functorch_check()
    return True if check is None else bool(check(x))


def onednn_linear_op() -> Callable[..., torch.Tensor] | None:
    """oneDNN's fused linear operator (a @ b.T + bias), or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def onednn_has_fast_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 products quickly (AVX-512 BF16, AMX). Unknown: no."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def tensor_version(tensor: torch.Tensor) -> object:
    """A value that changes whenever `tensor` is changed in place (its version counter); where
    there is no counter, a new value every call, so that whatever depends on it is never stale."""
    version = getattr(tensor, "_version", None)
    return version if isinstance(version, int) else object()


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Let one compiled graph serve every size of `tensor`'s `dim` (without it a new size may compile
    a new graph: slower, never wrong)."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_dynamic", None)
    if mark is not None:
        mark(tensor, dim)


def forget_compiled(function: Callable[..., Any]) -> None:
    """Drop the graphs compiled for `function`; where that is not offered, every compiled graph."""
    remove = getattr(getattr(getattr(torch, "_dynamo", None), "eval_frame", None), "remove_from_cache", None)
    if remove is not None:
        remove(function)
    else:
        torch.compiler.reset()


def compiler_failure(error: BaseException) -> BaseException | None:
    """The backend's own exception where `error` is torch.compile's report that its backend (a C++
    or Triton compiler) failed, else None."""
    failed = getattr(getattr(getattr(torch, "_dynamo", None), "exc", None), "BackendCompilerFailed", None)
    if failed is not None and isinstance(error, failed):
        return getattr(error, "inner_exception", error)
    return None


@contextlib.contextmanager
def inductor_settings(**settings: Any) -> Iterator[None]:
    """Inductor's configuration patched for the block, and its autotuner's tables kept off stderr;
    nothing changed where inductor's configuration is not where it was."""
    try:
        import torch._inductor.config as inductor_config
        import torch._inductor.select_algorithm as select_algorithm
    except ImportError:
        yield
        return
    known = {key: value for key, value in settings.items() if hasattr(inductor_config, key)}
    printing = getattr(select_algorithm, "PRINT_AUTOTUNE", None)
    if printing is not None:
        select_algorithm.PRINT_AUTOTUNE = False
    try:
        with inductor_config.patch(**known):
            yield
    finally:
        if printing is not None:
            select_algorithm.PRINT_AUTOTUNE = printing
