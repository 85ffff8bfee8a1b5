"""hugepages: importing gpt2lab puts PyTorch's large CPU tensors in transparent huge pages, unless
THP_MEM_ALLOC_ENABLE says otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2lab import hugepages

ROOT = Path(__file__).resolve().parent.parent

# Imports gpt2lab first, as the CLI does, then holds a 192 MiB tensor: its huge pages, in MiB.
CHILD = """
import gpt2lab, torch
block = torch.ones(2**24 * 3)
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        print(int(line.split()[1]) / 1024)
"""


@pytest.mark.parametrize(
    "mode, offered",
    [("always [madvise] never\n", True), ("[always] madvise never\n", True), ("always madvise [never]\n", False)],
)
def test_the_kernel_mode_is_read_from_its_brackets(tmp_path, monkeypatch, mode, offered):
    (tmp_path / "enabled").write_text(mode)
    monkeypatch.setattr(hugepages, "THP_MODE_FILE", tmp_path / "enabled")
    assert hugepages.kernel_offers_huge_pages() is offered


def test_no_mode_file_means_no_huge_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(hugepages, "THP_MODE_FILE", tmp_path / "missing")
    assert not hugepages.kernel_offers_huge_pages()
    monkeypatch.delenv(hugepages.THP_SWITCH, raising=False)
    assert not hugepages.prefer_huge_pages()
    assert hugepages.THP_SWITCH not in os.environ  # PyTorch would warn that madvise failed


def test_a_switch_already_set_is_kept(monkeypatch):
    monkeypatch.setenv(hugepages.THP_SWITCH, "0")
    assert not hugepages.prefer_huge_pages()
    assert os.environ[hugepages.THP_SWITCH] == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch's switch is Linux's")
def test_switched_on_where_the_kernel_offers_them(tmp_path, monkeypatch):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    monkeypatch.setattr(hugepages, "THP_MODE_FILE", tmp_path / "enabled")
    monkeypatch.delenv(hugepages.THP_SWITCH, raising=False)
    assert hugepages.prefer_huge_pages()
    assert os.environ[hugepages.THP_SWITCH] == "1"


def huge_mib(switch: str | None) -> float:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    if switch is not None:
        env[hugepages.THP_SWITCH] = switch
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hugepages.kernel_offers_huge_pages(),
                    reason="needs a Linux kernel with transparent huge pages")
def test_a_large_tensor_lies_in_huge_pages_unless_switched_off():
    assert huge_mib(None) >= 96  # at least half of the 192 MiB (the kernel may lack free huge pages)
    assert huge_mib("0") < 8
