"""The layout of the package, read from its source with `ast`: imports flow one way (config ->
data -> model -> train -> eval/generate -> serve), no cycle, model.py is the transformer alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2lab"

# Each module's stage; a module may import only from its own stage or earlier ones. generate and
# the eval scorers are libraries over a model (the trainer samples and scores with them); the
# verbs that drive them come last.
STAGES = [
    ("base", ["errors", "files", "config", "cache", "runtime", "version", "tokenizer", "console", "jsontext",
              "inference", "inference.masks", "inference.sampling", "inference.stopping", "inference.kv_cache",
              "inference.prompts",
              "chat", "chat.template", "sandbox", "sandbox_child"]),
    ("data", ["data", "data.dataset", "data.loader", "data.prepare", "data.shards", "data.sources", "chat.records",
               "data.chat_prepare", "data.chat_loader", "data.tokenizer_train", "chat.tasks",
               "data.chat_mixture"]),
    ("model", ["model", "layers", "loss", "formats", "formats.hub_files", "formats.native", "formats.transformers_gpt2",
               "formats.transformers_llama", "formats.gguf", "quantize", "lora", "kernels", "kernels.build", "kernels.cpu", "kernels.torch_compat",
               "kernels.fused", "kernels.matvec", "kernels.quantized", "kernels.linear", "kernels.attention", "kernels.loss",
               "kernels.memory", "kernels.compile", "kernels.overrides", "pretrained"]),
    ("model libraries", ["inference.generate", "chat.session", "eval", "eval.loss", "eval.hellaswag", "eval.chat", "eval.report",
                         "eval.core_bundle", "eval.ranks", "eval.core", "eval.chatcore"]),
    ("train", ["train", "train.config", "train.muon", "train.optim", "train.distributed", "train.metrics", "train.checkpoint",
               "train.profiling", "train.trainer"]),
    ("api", ["api", ""]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every gpt2lab module `name` imports, at the top or inside a function (both are edges: a
    lazy import is a cycle that merely waits for its first call)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "gpt2lab":
                target = node.module.removeprefix("gpt2lab").removeprefix(".")
            else:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}".strip(".")
                found.add(submodule if submodule in MODULES else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gpt2lab":
                    found.add(alias.name.removeprefix("gpt2lab").removeprefix("."))
    found.discard(name)
    return found


def test_the_import_reader_sees_relative_absolute_and_lazy_imports():
    assert {"config", "layers"} <= imports_of("model")
    assert "kernels" in imports_of("pretrained")  # lazy, inside a function
    assert "model" in imports_of("quantize")
    assert "api" in imports_of("")  # the package's own __init__


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(f"gpt2lab.{m}".rstrip(".") for m in cycle)


def stage_of(name: str) -> int:
    for index, (_, members) in enumerate(STAGES):
        if name in members:
            return index
    return len(STAGES)  # the verbs: cli.*, serve.*, __main__


def test_no_module_imports_a_later_stage():
    backward = [
        f"gpt2lab.{name} ({STAGES[stage_of(name)][0] if stage_of(name) < len(STAGES) else 'verbs'}) imports "
        f"gpt2lab.{target}"
        for name in MODULES
        for target in imports_of(name)
        if stage_of(target) > stage_of(name)
    ]
    assert not backward, "\n".join(sorted(backward))


def test_model_is_the_transformer_alone():
    source = MODULES["model"].read_text()
    assert len(source.splitlines()) <= 300
    assert imports_of("model") <= {"config", "layers", "loss", "inference.kv_cache"}


def test_the_kernels_are_entered_by_their_door_alone():
    through_a_side_door = [
        f"gpt2lab.{name} imports gpt2lab.{target}"
        for name in MODULES
        if name != "kernels" and not name.startswith("kernels.")
        for target in imports_of(name)
        if target.startswith("kernels.")
    ]
    assert not through_a_side_door, "import gpt2lab.kernels instead:\n" + "\n".join(sorted(through_a_side_door))


def test_private_torch_apis_live_in_the_kernels_alone():
    private = [
        f"gpt2lab.{name}:{node.lineno} {ast.unparse(node)}"
        for name, path in MODULES.items()
        if name != "kernels" and not name.startswith("kernels.")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and ast.unparse(node.value).split(".")[0] == "torch"
    ]
    assert not private, "move these behind gpt2lab.kernels.torch_compat:\n" + "\n".join(private)


# Imports every module of gpt2lab in a fresh interpreter, recording what the imports did.
IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, sys
before = dict(os.environ)
touched = []
stdlib = os.path.dirname(os.__file__)
def caller():
    # The nearest frame outside the standard library: gpt2lab's own code, or a library it
    # imports, whose doings are that library's. Passing through the import machinery first means
    # the event belongs to loading a module (an extension's shared library, say), not to the
    # code that asked for the import.
    frame, importing = sys._getframe(2), False
    while frame is not None and frame.f_code.co_filename.startswith((stdlib, "<")):
        importing |= "importlib" in frame.f_code.co_filename
        frame = frame.f_back
    return "an import" if importing or frame is None else frame.f_code.co_filename
def watch(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(("/proc/", "/sys/")):
        touched.append(f"{args[0]} from {caller()}")
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "ctypes.dlopen"):
        touched.append(f"{event} {args[0]} from {caller()}")
sys.addaudithook(watch)
import gpt2lab
names = [m.name for m in pkgutil.walk_packages(gpt2lab.__path__, "gpt2lab.") if m.name != "gpt2lab.__main__"]
for name in names:
    importlib.import_module(name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"modules": len(names), "changed": changed, "touched": sorted(set(touched)),
                  "cache": sorted(os.listdir(os.environ["GPT2LAB_CACHE"]))}))
"""


def test_importing_gpt2lab_does_nothing_to_the_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "GPT2LAB_CACHE": str(cache), "PYTHONPATH": str(PACKAGE.parent)}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, env=env, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["modules"] > 50
    assert report["changed"] == []
    # What PyTorch and the other libraries do when imported (a CUDA build of PyTorch runs
    # ldconfig, say) is theirs; nothing may come from gpt2lab's own code.
    ours = str(PACKAGE)
    assert not [t for t in report["touched"] if t.endswith(".py") and t.rpartition(" from ")[2].startswith(ours)]
    assert report["cache"] == []  # no C build ran


def test_only_the_model_touches_its_head():
    reaching = [
        f"gpt2lab.{name}:{node.lineno}"
        for name, path in MODULES.items()
        if name != "model"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "lm_head"
    ]
    assert not reaching, f"use GPT.logits instead of lm_head in {reaching}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_longer_than_80_lines(name):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(MODULES[name].read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"gpt2lab.{name}: split " + ", ".join(long)
