"""The layout rules a newcomer relies on, checked on the source itself: short functions, no import
circle inside the package, no pointer to notes outside the project, and light imports."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "svd_scale"
MAX_FUNCTION_LINES = 60


def _modules() -> dict:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set) -> set:
    """Package-internal modules that ``name`` imports anywhere in its body (function-level too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_no_import_circle_inside_the_package():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    assert graph["svd_scale.inject"] and "svd_scale.access" in graph["svd_scale.inject"]  # the parser sees imports
    state: dict = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import circle: " + " -> ".join(stack + [m, n])
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_nothing_in_the_project_points_to_notes_outside_it():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    bad = []
    for f in files:
        if not f.endswith((".py", ".md", ".yaml", ".json", ".cfg", ".sh", ".toml")):
            continue
        text = (ROOT / f).read_text(errors="ignore")
        # spelled in pieces so that this file does not match a search for them itself
        for needle in (".." + "/shared", "shared" + "/", "METHODS" + ".md", "DATA" + ".md", "STYLE" + ".md", "ZERO3" + ".md"):
            if needle in text:
                bad.append(f"{f}: {needle}")
    assert not bad, bad


def test_import_loads_neither_deepspeed_nor_bitsandbytes_nor_the_trainer():
    code = ("import sys, svd_scale; import svd_scale.engines.zero3, svd_scale.engines.fsdp2, svd_scale.quant.nf4; "
            "print([m for m in ('deepspeed', 'bitsandbytes', 'transformers.trainer') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
