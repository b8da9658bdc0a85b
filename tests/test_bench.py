import json

import pytest

from conftest import REPO


@pytest.mark.slow
def test_throughput_bench_smoke_runs_and_reports_ratios(tmp_path, monkeypatch):
    """`python bench/throughput.py --tiny` on CPU: every variant runs and gets a ratio to the seed."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import throughput

    out = tmp_path / "throughput.json"
    throughput.main(["--tiny", "--samples", "128", "--warmup", "32", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert [r["variant"].split(":")[0] for r in summary["results"]] == throughput.DEFAULT_VARIANTS
    for result in summary["results"]:
        assert "error" not in result, result.get("error")
        assert result["real_tokens_per_s"] > 0 and 0 <= result["pad_share"] < 0.5 and result["ratio_vs_seed"] > 0
