"""What the fidelity scripts share: their common arguments, and one JSON line per result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parser(doc: str | None, shares: str | None = None) -> argparse.ArgumentParser:
    """--model, --task (repeatable), --shots, --seeds, --limit, --out (and --shares when given a default)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", action="append")
    ap.add_argument("--shots", type=int, default=128)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--limit", type=int, default=300)
    if shares is not None:
        ap.add_argument("--shares", default=shares)
    ap.add_argument("--out", type=Path)
    return ap


def emit(path: Path, row: dict) -> None:
    """Print ``row`` and append it to ``path`` as one JSON line."""
    print(json.dumps(row), flush=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
