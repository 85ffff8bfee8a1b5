"""`system.profile_steps`: a torch.profiler trace of a few training steps, written into the run
folder as Chrome/Perfetto JSON (`profile/trace.json`, open it in ui.perfetto.dev or
chrome://tracing), with the operators that took the most time (`profile/top_ops.txt`, also printed)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from ..files import write_atomic

TOP_OPS = 15


def top_ops_table(prof: profile, device: torch.device) -> str:
    """The operators by their own time on the device that ran the step (the GPU's, else the CPU's)."""
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=TOP_OPS)


@contextmanager
def step_profiler(
    run_dir: Path, steps: int, steps_left: int, device: torch.device, echo: Callable[[str], None]
) -> Iterator[Callable[[], None]]:
    """A function to call after each training step. With steps > 0 it records `steps` steps after
    the first one (which carries compilation and warm-up) when the run has that many left (else
    from the first), then writes the trace and the table; steps = 0 records nothing."""
    if steps <= 0 or steps_left <= 0:
        yield lambda: None
        return
    skip = 1 if steps_left > steps else 0
    folder = run_dir / "profile"

    def write(prof: profile) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "trace.json", lambda path: prof.export_chrome_trace(str(path)))
        table = top_ops_table(prof, device)
        write_atomic(folder / "top_ops.txt", lambda path: path.write_text(table + "\n"))
        echo(f"profile of {min(steps, steps_left)} steps: {folder / 'trace.json'} (open in ui.perfetto.dev)\n{table}")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warnings.catch_warnings():
        # Its advice to warm up first: the skipped first step is the warm-up, without the
        # profiler's overhead on a step that may spend minutes compiling.
        warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
        steps_schedule = schedule(wait=skip, warmup=0, active=min(steps, steps_left), repeat=1)
    with profile(
        activities=activities,
        schedule=steps_schedule,
        on_trace_ready=write,
        record_shapes=True,
    ) as prof:
        yield prof.step
