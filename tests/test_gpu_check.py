"""The GPU check script (``python -m emloc_agents.bench.gpu``) on the CPU, with a tiny shape: it must
write a results file whose numbers come from the runs (the delta bracket holds: delta=1 keeps the
smallest share, delta=0 keeps everything) and reject malformed cases."""

from __future__ import annotations

import argparse
import json

import pytest

from emloc_agents.bench import gpu
from emloc_agents.models.tiny import tiny_tokenizer


def test_gpu_check_writes_its_results_on_the_cpu(tmp_path) -> None:
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    out = tmp_path / "out"
    code = gpu.main(["--out", str(out), "--device", "cpu", "--tokenizer", str(tok_dir), "--repeats", "1",
                     "--case", "qwen2-tiny:400:1,0:2", "--context"])
    assert code == 0
    result = json.loads((out / "gpu.json").read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    (row,) = result["rows"]
    assert 300 <= row["tokens"] <= 500 and row["lookahead"] == 2
    cheapest, dearest = row["delta=1"], row["delta=0"]
    assert cheapest["kept_ratio"] < 0.2 and dearest["kept_ratio"] == 1.0  # accept all vs reject all
    assert dearest["js_checks"] > cheapest["js_checks"] and dearest["check_forwards"] > cheapest["check_forwards"]
    assert row["prefill_s"] > 0 and row["chunkwise_over_prefill"] == pytest.approx(row["chunkwise_s"] / row["prefill_s"])
    decode = row["decode_ms_per_token"]
    assert all(decode[k] > 0 for k in ("memory", "full_memory", "hf_full_prefix", "hf_prefix_as_long_as_memory"))
    assert decode["memory_tokens_per_layer"] < row["tokens"] / 2
    context = row["context"]  # the context mode, bracketed the same way, with its stages
    assert context["delta=1"]["kept_ratio"] < 0.2 and context["delta=0"]["kept_ratio"] == 1.0
    assert context["delta=0"]["check_s"] > context["delta=1"]["check_s"] > 0
    for stage in ("prefill", "reconstruct", "held_out", "check"):
        assert context["delta=1"][f"{stage}_over_prefill"] == pytest.approx(context["delta=1"][f"{stage}_s"] / row["prefill_s"])


def test_gpu_check_cases_are_parsed_or_refused() -> None:
    assert gpu.parse_case("qwen2-7b:3500") == ("qwen2-7b", 3500, [1.0, 0.005, 0.0], None)
    assert gpu.parse_case("qwen2-1.5b:14000:1,0.005:8") == ("qwen2-1.5b", 14000, [1.0, 0.005], 8)
    assert gpu.parse_case("qwen2-1.5b:14000:-") == ("qwen2-1.5b", 14000, [], None)
    for bad in ("llama-70b:1000", "qwen2-7b", "qwen2-7b:1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError):
            gpu.parse_case(bad)
