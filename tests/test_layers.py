"""Packages import in one direction (docs/interfaces.md, "Layers"): no cycles, no import against the layer order.

Every import statement counts, those inside functions too: a lazy import hides a cycle from Python, not from here.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("micro_diffusion", "data_prep", "benchmarks")
# Lowest first. A module may import from its own layer and the layers before it, never from a later one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("utils", ("micro_diffusion.utils", "micro_diffusion.version", "micro_diffusion.errors")),
    ("models", ("micro_diffusion.models",)),
    # the FLOP walks are pure functions of a built network and a sampler's evaluation count
    ("diffusion", ("micro_diffusion.diffusion", "micro_diffusion.cost.flops", "micro_diffusion.cost.fluid_flops")),
    ("data, encoders", ("micro_diffusion.data", "micro_diffusion.encoders", "micro_diffusion.recipe",
                        "micro_diffusion.families",
                        "micro_diffusion.recipe_checks", "micro_diffusion.exported", "micro_diffusion.reference",
                        "data_prep")),
    # eval.pipeline (the Python Pipeline), eval.card (model cards) and eval.hub (hf:// and push) are eval modules
    ("training, eval, cost", ("micro_diffusion.training", "micro_diffusion.eval", "micro_diffusion.cost")),
    ("experiments", ("micro_diffusion.experiments",)),
    ("demo", ("micro_diffusion.demo",)),
    ("cli", ("micro_diffusion.cli", "micro_diffusion")),  # the console script and the package's front door
    ("benchmarks", ("benchmarks",)),  # may import anything but cli (checked below)
]


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in a module (relative imports resolved, `from pkg import mod` as mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            while parts and ".".join(parts) not in mods:
                parts.pop()
            if parts and ".".join(parts) != name:
                found.add(".".join(parts))
    return found


def layer_of(name: str) -> int:
    """Index of the layer whose longest prefix matches the module."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"module {name} belongs to no layer: add it to LAYERS"
    return best[1]


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_imports_follow_the_layer_order():
    bad = [f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
           for src, targets in graph().items() for dst in sorted(targets)
           if layer_of(dst) > layer_of(src) or (src.startswith("benchmarks") and dst == "micro_diffusion.cli")]
    assert bad == []


def test_the_checker_sees_cycles_and_late_imports():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert layer_of("micro_diffusion.models.dit") < layer_of("micro_diffusion.diffusion.edm") \
        < layer_of("micro_diffusion.training.model") < layer_of("micro_diffusion.demo.pipeline")
    mods = project_modules()
    assert "micro_diffusion.utils.seeds" in imports_of("micro_diffusion.training.model",
                                                       mods["micro_diffusion.training.model"], mods)
    assert "micro_diffusion.training.export" in imports_of("micro_diffusion.eval.cli",
                                                           mods["micro_diffusion.eval.cli"], mods)  # in a function


def test_the_pipeline_sits_in_eval_and_loads_on_first_use():
    assert LAYERS[layer_of("micro_diffusion.eval.pipeline")][0] == "training, eval, cost"
    code = ("import sys, micro_diffusion; heavy = 'torch' in sys.modules; from micro_diffusion import Pipeline; "
            "print(heavy, Pipeline.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False micro_diffusion.eval.pipeline"


def test_load_exported_imports_nothing_heavy_until_called():
    code = ("import sys, micro_diffusion; from micro_diffusion import load_exported; "
            "heavy = [m for m in ('torch', 'numpy', 'safetensors', 'micro_diffusion.exported') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
