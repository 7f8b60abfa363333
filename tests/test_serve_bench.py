"""`emloc bench --serve`: the serving benchmark end to end on a tiny random-weight model (real server,
real HTTP), its JSON and its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_agents.cli import main

pytest.importorskip("fastapi", reason="the serve extra")


def test_serving_bench_writes_json_and_table(capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(["bench", "--serve", "--model", "tiny-llama", "--shots", "4", "--skill-name", "sentiment",
                 "--clients", "1,3", "--requests", "6", "--max-batch", "1,4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "serving.json").read_text())
    assert result["settings"].items() >= {"model": "tiny-llama", "skill": "sentiment", "task": "sst2", "shots": 4}.items()
    assert [(r["max_batch"], r["clients"]) for r in result["rows"]] == [(1, 1), (1, 3), (4, 1), (4, 3)]
    for row in result["rows"]:
        assert row["requests"] == 6 and row["errors"] == 0 and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p95_ms"]
        assert row["mean_batch"] == 1 if row["max_batch"] == 1 or row["clients"] == 1 else 1 <= row["mean_batch"] <= 3
    assert result["memory"]["source"] == "compressed" and result["machine"]["cpus"]
    assert "| max_batch | clients | requests | requests/s | p50 ms | p95 ms |" in printed and "\n| 4 | 3 | 6 |" in printed


@pytest.mark.parametrize(("args", "message"), [
    (["--clients", "1,x"], "--clients takes comma-separated integers"),
    (["--clients", "0"], "clients and requests must be >= 1"),
    (["--max-batch", "0"], "max_batch must be >= 1"),
    (["--max-batch", "a"], "--max-batch takes comma-separated integers"),
    (["--task", "nope"], "nope"),
])
def test_serving_bench_mistakes_are_one_line(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    code = main(["bench", "--serve", "--model", "tiny-llama", "--cache-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
