"""How a compiled decoding step is built on a CPU. A one-token step reads every weight once, so its
speed is the speed of the matrix-vector products: with the weights frozen into the graph,
inductor's C++ GEMM template (chosen by max-autotune) streams them near memory bandwidth, where
MKL's products stay well below it (docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

from . import torch_compat

CPU_DECODING = dict(
    freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN", max_autotune_report_choices_stats=False
)


@contextlib.contextmanager
def cpu_decoding_settings() -> Iterator[None]:
    # The autotuner prints a table per matrix shape to stderr, and warns of its own use of a
    # deprecated storage API: neither should land among the user's text.
    with torch_compat.inductor_settings(**CPU_DECODING), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield
