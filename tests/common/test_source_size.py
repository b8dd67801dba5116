"""The house rules on size: no file over 400 lines (a file holds one idea), no function
over 80, Triton kernels aside (a kernel is one launch's whole program: splitting it costs
registers or a second launch)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED_FOLDERS = ("services", "gpu_worker", "benchmarks", "devtools", "deploy", "protos", "tests")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 400


def _is_triton_kernel(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for decorator in function.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target) == "triton.jit":
            return True
    return False


def long_functions(path: Path, root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line name (N lines)` for each function in `path` longer than `limit` lines,
    its decorators left out and its docstring counted."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or _is_triton_kernel(node):
            continue
        assert node.end_lineno is not None
        num_lines = node.end_lineno - node.lineno + 1
        if num_lines > limit:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({num_lines} lines)")
    return found


def checked_files(root: Path = ROOT) -> list[Path]:
    """The project's Python sources, generated protobuf modules left out."""
    return sorted(
        path
        for folder in CHECKED_FOLDERS
        for path in (root / folder).rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    )


def test_no_function_is_longer_than_the_limit() -> None:
    paths = checked_files()
    assert ROOT / "services" / "scheduler" / "scheduler.py" in paths
    too_long = [entry for path in paths for entry in long_functions(path)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def test_no_file_is_longer_than_the_limit() -> None:
    too_long = [
        f"{path.relative_to(ROOT)} ({num_lines} lines)"
        for path in checked_files()
        if (num_lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    ]
    assert not too_long, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(too_long)


def test_the_check_finds_a_long_function_and_spares_a_kernel(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "sample.py"
    source.write_text(
        f"import triton\n\n\ndef long():\n{body}\n\n@triton.jit(do_not_specialize=['n'])\ndef kernel():\n{body}"
    )
    assert long_functions(source, tmp_path) == [f"sample.py:4 long ({MAX_FUNCTION_LINES + 1} lines)"]
