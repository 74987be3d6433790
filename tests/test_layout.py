"""The package's layers (README, Project layout): each module imports only its own layer and the
layers below it, the import graph has no cycle, and llm_jax imports inside functions only in the
command line, where they keep JAX out of commands that do not need it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "llm_jax"
# Bottom to top; a module belongs to the first entry whose name is it or a package above it.
LAYERS = (
    "llm_jax.errors",
    "llm_jax.config",
    "llm_jax.data",
    "llm_jax.model",
    "llm_jax.parallel",
    "llm_jax.run",
    "llm_jax.inference",
    "llm_jax.train",
    "llm_jax.evals",
    "llm_jax.tools",
    "llm_jax.cli",
)
TOP = {"llm_jax.cli", "llm_jax.cli_args", "llm_jax.__main__"}  # the command line: arguments and dispatch
EXTRAS = ("llm_jax.data.beam",)  # need an optional extra of pyproject.toml (llm_jax[beam])


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported llm_jax module, imported inside a function?) for every import in the file."""
    tree = ast.parse(path.read_text())
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm_jax"):
            for alias in node.names:  # `from llm_jax import run` imports the module llm_jax.run
                sub = f"{node.module}.{alias.name}"
                out.append((sub if sub in MODULES else node.module, id(node) in local))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in local) for a in node.names if a.name.startswith("llm_jax")]
    return out


def _layer(module: str) -> int:
    if module in TOP:
        return len(LAYERS) - 1
    if module == "llm_jax":
        return 0
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and the README's layout section")


GRAPH = {m: sorted({dep for dep, _ in _imports(p) if dep != m}) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports_only_its_layer_and_below(module):
    upward = [dep for dep in GRAPH[module] if _layer(dep) > _layer(module)]
    assert not upward, f"{module} ({LAYERS[_layer(module)]}) imports a layer above its own: {upward}"


def test_the_import_graph_has_no_cycle():
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for dep in GRAPH.get(module, []):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _extra(module: str) -> bool:
    return any(module == e or module.startswith(e + ".") for e in EXTRAS)


def test_only_the_command_line_imports_llm_jax_inside_functions():
    """... and the modules of an optional extra, imported where they are used (by nothing at the top)."""
    local = {
        m: sorted({dep for dep, inside in _imports(p) if inside and not _extra(dep)})
        for m, p in MODULES.items()
        if m not in TOP
    }
    assert not {m: deps for m, deps in local.items() if deps}
    at_top = {
        m: dep for m, p in MODULES.items() if not _extra(m) for dep, inside in _imports(p) if _extra(dep) and not inside
    }
    assert not at_top, f"a default install must import without the extras: {at_top}"


def test_the_graph_is_read_right():
    """The checks above see what they must: a known downward edge, and both kinds of import."""
    assert "llm_jax.run" in GRAPH["llm_jax.train.loop"] and "llm_jax.config.schema" in GRAPH["llm_jax.config.checks"]
    assert ("llm_jax.train.loop", True) in _imports(MODULES["llm_jax.cli"])
    assert _layer("llm_jax.data.tokenizer") < _layer("llm_jax.run") < _layer("llm_jax.train.loop")


def test_pyproject_lists_every_package():
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    data = {  # folders of data files only (llm_jax/evals/tasks): packages too, or setuptools warns at install
        ".".join(d.relative_to(ROOT.parent).parts)
        for d in ROOT.rglob("*")
        if d.is_dir() and d.name != "__pycache__" and not (d / "__init__.py").exists()
    }
    assert listed == packages | data | {"llm_jax.configs"}, "pyproject.toml's packages must list them all"


def test_the_pre_commit_hooks_pin_the_ruff_that_ci_runs():
    import re

    pins = {
        name: set(re.findall(r"ruff==([\w.]+)", (ROOT.parent / name).read_text()))
        for name in ("pyproject.toml", ".pre-commit-config.yaml")
    }
    assert len(pins["pyproject.toml"]) == 1 and pins[".pre-commit-config.yaml"] == pins["pyproject.toml"], pins
