"""Architecture guards (Layout 2): which part may import which, no cycles, no private imports.

The data flow of lvita_data is manifest -> records -> samples -> packing -> shards -> loader,
with media, build, verify and stats beside it. Every import of one part by another (at module
level or inside a function) must be an edge of `ALLOWED`; modules form no import cycle; no module
imports another module's ``_private`` name; no lvita_data file grows past 500 lines. The first
three tests run the import machinery for what an AST cannot see (import-time side effects).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lvita_data", "lvita_model", "pipelines")

DATA_EDGES = {  # part of lvita_data: the parts it may import
    "errors": "",
    "schema": "",
    "fileio": "",
    "strict_yaml": "errors",
    "pool": "errors",
    "manifest": "errors strict_yaml schema",
    "tokenizer": "errors fileio",
    "records": "errors schema tokenizer",
    "media": "errors schema",
    "samples": "errors schema manifest tokenizer records media",
    "packing": "schema",
    "shards": "errors schema fileio strict_yaml",
    "stats": "errors schema fileio pool manifest samples shards",
    "loader": "errors schema fileio media samples tokenizer shards",
    "verify": "errors schema fileio pool manifest media samples tokenizer shards",
    "show": "errors schema fileio tokenizer shards loader",
    "build": "errors schema fileio pool manifest records tokenizer samples media packing shards "
    "stats",
    "demo": "errors schema fileio media",
    "energon": "errors loader",  # the one module that imports megatron.energon (optional)
}
MODEL_EDGES = {  # part of lvita_model (torch + safetensors only, never lvita_data): may import
    "errors": "",
    "config": "errors",
    "attention": "errors",
    "flops": "config",
    "qwen2": "config attention",
    "projector": "errors config",
    "vision": "config attention projector",
    "head": "errors attention",
    "context_parallel": "errors attention head",
    "model": "errors config attention qwen2 vision projector head",
    "weights": "errors config attention model",
    "inference": "errors config attention context_parallel model qwen2 vision head",
    "baselines": "head inference model",
}
ALLOWED: dict[str, set[str]] = {
    f"{package}.{part}": {f"{package}.{other}" for other in allowed.split()}
    for package, edges in (("lvita_data", DATA_EDGES), ("lvita_model", MODEL_EDGES))
    for part, allowed in edges.items()
}
FREE_TO_IMPORT = {"lvita_data", "lvita_model"}
"""Package roots: anything may read ``__version__`` from them (they import nothing eagerly)."""


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [alias.name for alias in node.names]
            # `from pkg import module` imports the module itself
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in submodules]
            taken = [n for n in names if f"{target}.{n}" not in MODULES]
            if taken:
                out.append((target, taken, node.lineno))
    return [(name, names, line) for name, names, line in out if name.startswith(PACKAGES)]


def _part(module: str) -> str:
    """The part of `module` that `ALLOWED` speaks of (sub-package or top-level module)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_every_part_is_in_the_table():
    parts = {_part(m) for m in MODULES if m.startswith(("lvita_data.", "lvita_model."))}
    assert parts - set(ALLOWED) == set(), "add the new part and its allowed imports to ALLOWED"
    assert len(parts) > 25  # did it run: the walk found the packages' parts


def test_imports_follow_the_allowed_edges():
    violations = []
    edges = 0
    for module in MODULES:
        if not module.startswith(("lvita_data.", "lvita_model.")):
            continue
        source = _part(module)
        for target, names, line in _imports(module):
            if target in FREE_TO_IMPORT and set(names) <= {"__version__"}:
                continue
            if target.startswith(("pipelines", "lvita_model")) and source.startswith("lvita_data"):
                violations.append(f"{module}:{line} imports {target} (lvita_data stays below)")
                continue
            destination = _part(target)
            if destination == source:
                continue
            edges += 1
            if destination not in ALLOWED.get(source, set()):
                violations.append(f"{module}:{line} imports {target} ({source} -> {destination})")
    assert violations == []
    assert edges > 60  # did it run


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        for target, _, _ in _imports(module):
            if target in MODULES and target != module and target not in FREE_TO_IMPORT:
                graph[module].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules_or_parts():
    graph = _module_graph()
    assert _cycle(graph) is None
    parts: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        parts[_part(module)] |= {_part(t) for t in targets if _part(t) != _part(module)}
    assert _cycle(parts) is None
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the detector detects


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, names, line in _imports(module)
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert offenders == []


@pytest.mark.parametrize("package", ["lvita_data"])
def test_no_file_over_500_lines(package):
    long = {
        str(path.relative_to(ROOT)): n
        for name, path in MODULES.items()
        if name.startswith(package) and (n := len(path.read_text().splitlines())) > 500
    }
    assert long == {}


def test_pure_data_modules_import_neither_torch_nor_model():
    code = (
        "import sys, lvita_data.samples.tiling, lvita_data.samples.frames, "
        "lvita_data.samples.vision_tokens, lvita_data.records.mixture, "
        "lvita_data.samples.template, lvita_data.manifest, lvita_data.packing.plan; "
        "print(sorted(sys.modules))"
    )
    modules = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'torch'" not in modules and "lvita_model" not in modules
    assert "'av'" not in modules and "'PIL'" not in modules  # no media I/O in the pure core


def test_lvita_data_never_imports_lvita_model():
    code = (
        "import sys, lvita_data.build.run, lvita_data.verify, lvita_data.stats.compute; "
        "print([m for m in sys.modules if 'lvita_model' in m or m == 'torch'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lvita_model_imports_torch_and_safetensors_only():
    """The model package runs where only torch is installed (e.g. a GPU box without lvita_data's
    media and tokenizer stack): no lvita_data module, no transformers."""
    code = (
        "import sys, lvita_model.model, lvita_model.weights, lvita_model.attention.registry, "
        "lvita_model.inference, lvita_model.context_parallel.batch; "
        "print([m for m in sys.modules if m.startswith(('lvita_data', 'transformers', 'av', "
        "'PIL', 'tokenizers'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_is_lazy_and_complete():
    code = (
        "import sys, lvita_data; light = 'PIL' not in sys.modules and 'av' not in sys.modules; "
        "names = [getattr(lvita_data, n).__name__ for n in lvita_data.__all__[1:]]; "
        "print(light, lvita_data.__version__, names)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    light, version, names = out.stdout.split(" ", 2)
    assert light == "True" and version[0].isdigit()
    assert "build_stage" in names and "ShardLoader" in names and "verify_build" in names
