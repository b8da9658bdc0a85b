import json

import pytest
from conftest import REPO


@pytest.mark.slow
def test_throughput_bench_smoke_runs_and_reports_ratios(tmp_path, monkeypatch, capsys):
    """`python bench/throughput.py --tiny` on CPU: the seed, the peer and the project run and get a ratio to the
    seed (the default's fourth variant, the 40 GB config, adds only gradient checkpointing to the third, which
    test_model runs)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import throughput

    out = tmp_path / "throughput.json"
    variants = throughput.DEFAULT_VARIANTS[:3]
    throughput.main(["--tiny", "--samples", "128", "--passes", "1", "--out", str(out), "--variants", *variants])
    summary = json.loads(out.read_text())
    names = [r["variant"].split(":")[0] for r in summary["results"]]
    assert names == [v.replace("peer ", f"{throughput.PEER} as ") for v in variants]
    for result in summary["results"]:
        assert "error" not in result, result.get("error")
        assert result["real_tokens_per_s"] > 0 and 0 <= result["pad_share"] < 0.5 and result["ratio_vs_seed"] > 0
    assert len({result["timed_real_tokens"] for result in summary["results"]}) == 1  # the same rows, every variant
    assert "same-settings ratio: " in capsys.readouterr().out


def test_training_and_validation_read_values_back_from_the_device_only_where_needed(monkeypatch):
    """Each read makes the CPU wait for the GPU. Per training batch, only the finite-loss check (loss.py) and
    transformers' mask check read a value (the collator's token count is a CPU tensor); the loss and
    the throughput are read at logging steps (one in ten here). Per validation batch, only
    transformers' check does."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import host_reads

    reads = host_reads.main(["--model.skip_padding_mask", "true"])

    def every_batch(phase: str) -> set[str]:
        return {where.split(":")[0] for where, per_batch in reads[phase].items() if per_batch > 0.2}

    mask_check = "__bool__ in transformers/masking_utils.py"
    assert every_batch("training") == {
        mask_check,
        f"__bool__ in {REPO}/mbti_lightning/loss.py",  # the finite-loss check
        f"__int__ in {REPO}/mbti_lightning/data/loaders.py",
    }
    # torchmetrics' calibration error checks whether its inputs are probabilities with a read on CPU
    # tensors only; on a GPU it uses torch.where instead (torchmetrics.utilities.compute.normalize_logits_if_needed).
    cpu_only = "__bool__ in torchmetrics/utilities/compute.py"
    assert every_batch("validation") - {cpu_only} == {mask_check}


def test_optimizer_step_bench_times_each_variant(monkeypatch):
    """`python bench/optimizer_step.py --tiny` on CPU: the bitsandbytes floor and the plain compensated
    step are timed (the fused kernel needs CUDA, or Triton's interpreter)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import optimizer_step

    results = optimizer_step.main(["--tiny", "--steps", "1"])
    assert set(results) == {"(a) bitsandbytes AdamW8bit, bf16 weights", "(b) compensated, plain path"}
    assert all(ms > 0 for ms in results.values())
