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
    ("base", ["errors", "files", "config", "cache", "runtime", "hugepages", "version", "tokenizer", "native", "fused_kernels", "matvec_kernels", "ops", "quantized_kernels", "kv_cache", "prompts", "chat_template"]),
    ("data", ["data", "data.dataset", "data.loader", "data.prepare", "data.shards", "data.sources", "data.chat_records",
               "data.chat_prepare", "data.chat_loader"]),
    ("model", ["model", "formats", "formats.hub_files", "formats.native", "formats.transformers_gpt2", "formats.transformers_llama", "quantize",
               "lora", "pretrained"]),
    ("model libraries", ["generate", "chat", "eval", "eval.loss", "eval.hellaswag", "eval.chat"]),
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
    assert {"config", "ops"} <= imports_of("model")
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
    return len(STAGES)  # the verbs: cli, cli_options, */cli.py, serve, report, bench, __main__


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
    assert imports_of("model") <= {"config", "ops", "kv_cache"}


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
