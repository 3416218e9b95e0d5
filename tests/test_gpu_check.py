"""benchmarks/gpu_check.py: the skip line without CUDA, and every section's tiny CPU version (--smoke)."""

import json

import torch

from benchmarks import gpu_check


def test_without_cuda_it_skips_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "gpu_check: skipped, no CUDA device here (pass --smoke for a tiny CPU run of every section)."]
    assert not (tmp_path / "out").exists()


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
    assert table.count("\n| p1_train |") == 7 and "| p2_precision | fp32: 2 x 32 px, 2 steps |" in table
    # P3: peak memory and finite loss of TI and CD with and without checkpointing, images produced, images classified
    p3_checks = {(name, r["measurement"]): r["ok"] for name in ("p3_ti_step", "p3_generate", "p3_zeroshot")
                 for r in report["sections"][name] if r["ok"] is not None}
    assert len(p3_checks) == 4 * 2 + 1 + 1 and all(p3_checks.values()), p3_checks
