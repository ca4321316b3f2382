"""The package's import graph: every module imports, there are no import cycles among the
package's modules, and what must run on an accelerator machine without grain / datasets /
pytrec_eval / bm25s (the models, weights, sampler, benchmarks, compile) imports without them."""

import ast
import os
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "grouprank_jax"


def _module_graph() -> dict[str, set[str]]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module-level imports only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grouprank_jax"):
                deps |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names
                }
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("grouprank_jax")}
        graph[name] = {d for d in deps if d in mods}
    return graph


def test_no_import_cycles():
    graph, state, cycles = _module_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_every_module_imports_and_accelerator_modules_need_no_data_stack():
    script = """
import importlib, pkgutil, sys
blocked = sys.argv[1].split(",") if len(sys.argv) > 1 else []
for name in blocked:
    sys.modules[name] = None  # importing it now raises ImportError
import grouprank_jax
everything = [m.name for m in pkgutil.walk_packages(grouprank_jax.__path__, "grouprank_jax.")]
targets = sys.argv[2].split(",") if len(sys.argv) > 2 else everything
for name in targets:
    importlib.import_module(name)
print("imported", len(targets))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    everything = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert everything.returncode == 0, everything.stderr[-3000:]
    accelerator = ",".join(
        [
            "grouprank_jax.models.qwen2",
            "grouprank_jax.weights.loading",
            "grouprank_jax.sampling.sampler",
            "grouprank_jax.bench.sampling",
            "grouprank_jax.bench.train",
            "grouprank_jax.bench.device_suite",
            "grouprank_jax.preflight.aot",
            "grouprank_jax.sft.step",
            "grouprank_jax.rl.step",
        ]
    )
    lean = subprocess.run(
        [sys.executable, "-c", script, "grain,datasets,pytrec_eval,bm25s", accelerator],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert lean.returncode == 0, lean.stderr[-3000:]
