"""benchmarks/gpu_check.py: the skip line without CUDA, and (slow) every section's tiny CPU version (--smoke)."""

import json

import pytest
import torch

from benchmarks import gpu_check


def test_without_cuda_it_skips_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "gpu_check: skipped, no CUDA device here (pass --smoke for a tiny CPU run of every section)."]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smoke_runs_every_section(tmp_path, one_torch_thread):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and list(report["sections"]) == list(gpu_check.SECTIONS)
    failed = [(name, r) for name, rows in report["sections"].items() for r in rows if r["ok"] is False]
    assert not failed, failed
    checks = {r["measurement"]: r for rows in report["sections"].values() for r in rows}
    assert checks["identical weights on both ranks"]["ok"] is True
    assert checks["resumed == uninterrupted (model and EMA weights)"]["ok"] is True
    assert checks["fp16 + GradScaler: last loss"]["ok"] is True and checks["bf16: last loss"]["ok"] is True
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| p1_train |") == 10 and "| p2_precision | fp32: 2 x 32 px, 2 steps |" in table
    # the former data path and EMA beside p1_train.py's, and sampling in fp32 beside --autocast
    assert checks["data path and EMA after: 2 steps"]["ok"] is True and checks["autocast dtype"]["value"] == "None"
    # p1_inference.py's default sampler in fp32 and under --autocast, DDIM in fp32 beside it
    assert [m for m in checks if m.endswith("20 images, w = 5.0")] == [
        "fp32 (default): DPM-Solver++-2, 20 images, w = 5.0", "--autocast: DPM-Solver++-2, 20 images, w = 5.0",
        "fp32: DDIM-2, 20 images, w = 5.0"]
    # P3: peak memory and finite loss of every training configuration, images produced, images classified
    p3_checks = {(name, r["measurement"]): r["ok"] for name in ("p3_ti_step", "p3_generate", "p3_zeroshot")
                 for r in report["sections"][name] if r["ok"] is not None}
    configurations = gpu_check.p3_training_configurations(gpu_check.SMOKE)
    assert len(p3_checks) == len(configurations) * 2 + 1 + 1 and all(p3_checks.values()), p3_checks
    # textual inversion's default on CUDA (batch 1 x 4 accumulation) is measured beside its former default
    steps = [r["measurement"] for r in report["sections"]["p3_ti_step"] if r["measurement"].endswith("step time")]
    assert any("batch 1 x 2 accumulation (the default on CUDA)" in m for m in steps), steps
    assert any("fp32, batch 2 (the former default)" in m for m in steps), steps
