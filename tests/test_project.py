"""The project's contracts: the kernels package stands alone, the README example runs, the CLI reports errors."""

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_import_nothing_from_ramjax():
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "ramjax" or n.startswith("ramjax.") for n in names), f"{path} imports {names}"


def test_readme_api_example_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["o"].shape == namespace["v"].shape


def _ramjax(*args):
    return subprocess.run(
        [sys.executable, "-m", "ramjax.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_demo_runs_and_checks_every_impl():
    result = _ramjax("demo", "--config", "configs/demo.py", "--config.seq_len=24", "--config.batch=1",
                     "--config.timing_iters=1", "--config.impls=('dense', 'scan', 'auto')")
    assert result.returncode == 0, result.stderr
    assert "All implementations agree" in result.stdout
    assert "| scan |" in result.stdout and "| auto (" in result.stdout


def test_cli_names_a_misspelt_field_and_bad_values():
    result = _ramjax("demo", "--config.seqlen=64")
    assert result.returncode != 0 and 'Did you mean "seq_len"' in result.stderr
    assert "Traceback" not in result.stderr
    result = _ramjax("demo", "--config.impls=('dense', 'fast')", "--config.seq_len=8")
    assert result.returncode != 0 and "config.impls: 'fast' is not an implementation" in result.stderr
    result = _ramjax("demo", "--config", "configs/no_such_file.py")
    assert result.returncode != 0 and "no_such_file.py" in result.stderr and "Traceback" not in result.stderr
    result = _ramjax("launch")
    assert result.returncode == 2 and "unknown command 'launch'" in result.stderr


def _ramjax_imports():
    """{module: [(imported module, names imported from it, at top level?)]} for every module of ramjax/."""
    import ast

    graph = {}
    for path in sorted((ROOT / "ramjax").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ramjax"):
                edges.append((node.module, [a.name for a in node.names], id(node) in top_level))
            elif isinstance(node, ast.Import):
                edges += [(a.name, [], id(node) in top_level) for a in node.names if a.name.startswith("ramjax")]
        graph[module] = edges
    return graph


LAYERS = ("ramjax.ops", "ramjax.layers", "ramjax.models", "ramjax.train")


def test_no_private_names_cross_modules_and_dependencies_point_one_way():
    graph = _ramjax_imports()
    private = [(m, target, name) for m, edges in graph.items() for target, names, _ in edges for name in names
               if name.startswith("_")]
    assert not private, private
    upward = []
    for module, edges in graph.items():
        rank = next((i for i, layer in enumerate(LAYERS) if module.startswith(layer)), None)
        # Module-level imports only: the one import inside a function that points up, ramjax.models.decode's
        # load_model (the generation API's name for ramjax.train.setup.load_model), happens at call time.
        for target, _, top_level in edges:
            if not top_level:
                continue
            target_rank = next((i for i, layer in enumerate(LAYERS) if target.startswith(layer)), None)
            if rank is not None and target_rank is not None and target_rank > rank:
                upward.append((module, target))
    assert not upward, upward


def test_no_import_cycles_at_module_level():
    graph = _ramjax_imports()
    edges = {m: {t for t, _, top in e if top and t in graph and t != m} for m, e in graph.items()}
    state = {}

    def visit(module, stack):
        state[module] = "open"
        for target in edges[module]:
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [module])
