"""Huge pages (`gpt2lab.kernels.memory`): importing gpt2lab changes nothing in the process; the CLI,
or a program through `gpt2lab.kernels.tune_cpu_memory()`, puts PyTorch's large CPU tensors in
transparent huge pages, unless THP_MEM_ALLOC_ENABLE says otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2lab.kernels import memory, tune_cpu_memory

ROOT = Path(__file__).resolve().parent.parent

# Imports gpt2lab first, as the CLI does, says whether that changed the environment, calls
# tune_cpu_memory() where asked (before the first tensor, as the CLI does), then holds a 192 MiB
# tensor: its huge pages, in MiB.
CHILD = """
import os, sys
before = dict(os.environ)
import gpt2lab, gpt2lab.cli, gpt2lab.kernels, torch
print(dict(os.environ) == before)
if sys.argv[1] == "tune":
    gpt2lab.kernels.tune_cpu_memory()
block = torch.ones(2**24 * 3)
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        print(int(line.split()[1]) / 1024)
"""

# The CLI's `main`, given a verb (one that stops at once: a report on no run), before the verb runs.
CLI_CHILD = """
import os
from gpt2lab.cli import main
assert main(["report", "no-such-run-folder"]) == 2
print(os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch's switch is Linux's")


def child_environment(switch: str | None) -> dict[str, str]:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    if os.environ.get("GPT2LAB_CACHE"):
        env["GPT2LAB_CACHE"] = os.environ["GPT2LAB_CACHE"]
    if switch is not None:
        env[memory.THP_SWITCH] = switch
    return env


@pytest.mark.parametrize(
    "mode, offered",
    [("always [madvise] never\n", True), ("[always] madvise never\n", True), ("always madvise [never]\n", False)],
)
def test_the_kernel_mode_is_read_from_its_brackets(tmp_path, monkeypatch, mode, offered):
    (tmp_path / "enabled").write_text(mode)
    monkeypatch.setattr(memory, "THP_MODE_FILE", tmp_path / "enabled")
    assert memory.kernel_offers_huge_pages() is offered


def test_no_mode_file_means_no_huge_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "THP_MODE_FILE", tmp_path / "missing")
    assert not memory.kernel_offers_huge_pages()
    monkeypatch.delenv(memory.THP_SWITCH, raising=False)
    assert not memory.prefer_huge_pages()
    assert tune_cpu_memory(reuse_freed=False) == {"huge_pages": False, "reuse_freed": False}
    assert memory.THP_SWITCH not in os.environ  # PyTorch would warn that madvise failed


def test_a_switch_already_set_is_kept(monkeypatch):
    monkeypatch.setenv(memory.THP_SWITCH, "0")
    assert not memory.prefer_huge_pages()
    assert not tune_cpu_memory(reuse_freed=False)["huge_pages"]
    assert os.environ[memory.THP_SWITCH] == "0"


@linux_only
def test_switched_on_where_the_kernel_offers_them(tmp_path, monkeypatch):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    monkeypatch.setattr(memory, "THP_MODE_FILE", tmp_path / "enabled")
    monkeypatch.delenv(memory.THP_SWITCH, raising=False)
    assert memory.prefer_huge_pages()
    assert os.environ[memory.THP_SWITCH] == "1"
    monkeypatch.delenv(memory.THP_SWITCH)
    assert tune_cpu_memory(reuse_freed=False) == {"huge_pages": True, "reuse_freed": False}
    assert os.environ[memory.THP_SWITCH] == "1"


def run_child(switch: str | None, tune: bool) -> tuple[bool, float]:
    """(whether importing gpt2lab left the environment as it was, the tensor's huge pages in MiB)."""
    out = subprocess.run([sys.executable, "-c", CHILD, "tune" if tune else "import-only"], capture_output=True,
                         text=True, check=True, env=child_environment(switch)).stdout.split()
    return out[0] == "True", float(out[-1])


def test_importing_gpt2lab_leaves_the_environment_as_it_is():
    code = (
        "import os\n"
        "before = dict(os.environ)\n"
        "import gpt2lab, gpt2lab.cli, gpt2lab.kernels, gpt2lab.kernels.memory\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_environment(None))
    assert result.returncode == 0, result.stderr


@linux_only
def test_the_cli_switches_them_on_before_its_verb_runs_unless_set():
    def cli_switch(switch: str | None) -> str:
        result = subprocess.run([sys.executable, "-c", CLI_CHILD], capture_output=True, text=True,
                                env=child_environment(switch))
        assert result.returncode == 0, result.stderr
        return result.stdout.split()[-1]

    assert cli_switch(None) == ("1" if memory.kernel_offers_huge_pages() else "None")
    assert cli_switch("0") == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not memory.kernel_offers_huge_pages(),
                    reason="needs a Linux kernel with transparent huge pages")
def test_a_large_tensor_lies_in_huge_pages_once_tuned_unless_switched_off():
    unchanged, huge = run_child(None, tune=True)
    assert unchanged
    assert huge >= 96  # at least half of the 192 MiB (the kernel may lack free huge pages)
    if "[always]" not in memory.THP_MODE_FILE.read_text():  # there every large mapping may get them
        assert run_child("0", tune=True)[1] < 8
        unchanged, huge = run_child(None, tune=False)
        assert unchanged and huge < 8  # importing gpt2lab alone leaves PyTorch's 4 KiB pages
