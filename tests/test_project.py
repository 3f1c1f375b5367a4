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
    assert result.returncode != 0 and "unknown command 'launch'" in result.stderr
