"""The README's Python snippets run as written, each on its own (no name borrowed from another
snippet), on the bundled model with fewer tokens (slow: real SmolLM2 weights)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_the_engine_and_tree_snippets():
    code = snippets()
    assert any("engine.generate" in c for c in code) and any("TreeSampler(" in c for c in code)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(snippets())))
def test_snippet_runs_on_its_own(i, capsys):
    code = snippets()[i]
    code = re.sub(r"max_tokens=\d+", "max_tokens=8", code)  # the same calls, shorter
    code = code.replace("segment_len=64, max_depth=4, max_width=16", "segment_len=4, max_depth=2, max_width=4")
    exec(compile(code, f"README.md snippet {i}", "exec"), {})
    assert capsys.readouterr().out.strip(), "a README snippet should print what it shows"
