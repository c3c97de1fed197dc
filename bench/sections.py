"""The one writer of docs/benchmarks.md: each bench owns the block between its
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers and replaces only that block. Also the check the
benches that measure the demo's outputs share."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(section: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) bench `section`'s block atomically; `text` may already carry the markers."""
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    body = text.strip()
    if body.startswith(start):
        body = body[len(start) :]
    if body.endswith(end):
        body = body[: -len(end)]
    block = f"{start}\n{body.strip()}\n{end}"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".benchmarks.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(doc)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def require_demo_outputs(bench: str, demo: Path, names: tuple[str, ...]) -> None:
    """Exit with one line naming the first of the demo folder's `names` that is missing."""
    for name in names:
        if not (demo / name).exists():
            raise SystemExit(f"{bench}: {demo / name} is missing; run `make demo` first")
