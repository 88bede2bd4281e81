"""The layout's promises, checked: no import cycle inside treepo, no oversized module, and every
document a comment or docstring cites exists in the repository."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("treepo", "treepo_kernels")


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules of ours imported at module level (imports inside functions are lazy: no cycle)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.parse(path.read_text()).body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycle():
    mods = dict(_modules())
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # a package imports its parent's __init__ implicitly; that edge is not a cycle of ours
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_in_treepo_is_oversized():
    big = {str(p.relative_to(ROOT)): n for _, p in _modules()
           if (n := len(p.read_text().splitlines())) > 420}
    assert not big, f"modules over ~400 lines: {big}"


GENERATED_MD = {"learning.md", "test_time.md"}  # tables the benchmarks write into their output folder


def test_cited_documents_exist():
    """Every Markdown file a source file names (a docs/ page, the README, ...) is a file of the repository."""
    cite = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
    missing = []
    for folder in ("treepo", "treepo_kernels", "csrc", "tests", "bench", "scripts"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".cpp", ".h", ".sh") or "__pycache__" in path.parts:
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                for ref in cite.findall(line):
                    if ref.rsplit("/", 1)[-1] in GENERATED_MD:
                        continue
                    if not (ROOT / ref).exists() and not (path.parent / ref).exists():
                        missing.append(f"{path.relative_to(ROOT)}:{lineno}: {ref}")
    assert not missing, "citations of files the repository does not have:\n" + "\n".join(missing)
