"""benchmarks/RESULTS.md is shared: each benchmark script owns one `## <name>` section and replaces only that one.

`write_section` swaps the section (from its heading to the next `## ` heading, or the end) for new text, or appends it
when the file has none yet, and writes the whole file atomically: the other scripts' sections stay as they were.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, lines: list[str], path: Path = RESULTS):
    """Replace the section that starts with the line `heading` (e.g. "## evaluate.py") by `lines` (heading first)."""
    if not lines or lines[0] != heading:
        raise ValueError(f"a section must start with its heading {heading!r}")
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    body = "\n".join(lines).rstrip("\n") + "\n"
    rows = text.split("\n")
    if heading in rows:
        start = rows.index(heading)
        end = next((i for i in range(start + 1, len(rows)) if rows[i].startswith("## ")), len(rows))
        after = "\n".join(rows[end:])
        text = "\n".join(rows[:start]) + "\n" + body + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    checkpoint.atomic_write_text(path, text)
