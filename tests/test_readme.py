"""README.md as a tested document: every ```python block runs, top to bottom, in one namespace.

The README builds its own tiny random model and tokenizer in its first usage block, so nothing is
downloaded. A block is skipped only when the line right before it is
`<!-- readme-test: skip (reason) -->` (GPU or server examples). Each block is compiled with the
README's own line numbers, so a failure points at the README line.
"""
import pathlib
import re
import time

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(first code line number, code, skip reason or None) of each ```python block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            match = SKIP.fullmatch(lines[j].strip()) if j >= 0 else None
            end = i + 1
            while lines[end].strip() != "```":
                end += 1
            blocks.append((i + 2, "\n".join(lines[i + 1:end]), match.group(1) if match else None))
            i = end
        i += 1
    return blocks


def test_skip_markers_only_mark_python_blocks_and_give_a_reason():
    text = README.read_text()
    marked = [n for n, line in enumerate(text.splitlines(), 1) if "readme-test" in line]
    skipped = [b for b in python_blocks(text) if b[2] is not None]
    assert len(marked) == len(skipped), "a readme-test marker is malformed or not right before a ```python block"
    assert all(reason.strip() for _, _, reason in skipped)


def test_readme_examples_run_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write steering files and thresholds
    blocks = python_blocks(README.read_text())
    runnable = [b for b in blocks if b[2] is None]
    assert len(runnable) >= 12, f"found only {len(runnable)} runnable python blocks"
    namespace = {"__name__": "readme"}
    start = time.perf_counter()
    for line, code, _ in runnable:
        # Pad so the compiled code carries the README's line numbers in tracebacks.
        compiled = compile("\n" * (line - 1) + code, str(README), "exec")
        try:
            exec(compiled, namespace)
        except Exception as e:  # noqa: BLE001 - re-raised with the block's location
            raise AssertionError(f"README.md block at line {line} failed: {type(e).__name__}: {e}") from e
    elapsed = time.perf_counter() - start
    # The examples must leave no patch behind (each demonstrates its own cleanup).
    from actshift.integrations.transformers import get_handle

    assert get_handle(namespace["model"]) is None
    assert elapsed < 120, f"README examples took {elapsed:.0f} s"


if __name__ == "__main__":  # python tests/test_readme.py: run the README directly
    pytest.main([__file__, "-q"])
