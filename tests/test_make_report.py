"""make_report.py on the toy world: every figure and table, skips instead of tracebacks, byte-identical reruns."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

import make_report
import p1_inference
import p1_train
import p3_clip_zeroshot
import report_p1
from benchmarks import p1_bench
from toy_data import TINY_SD_RESOLUTION
from utils import Hw2Error

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
P2_SIZE = 64  # toy face images
P1_GRID = 10 * (28 + 2) + 2  # torchvision make_grid: 10 tiles of 28 px, padding 2 around each
TI_GRID_WIDTH = 4 * (TINY_SD_RESOLUTION + 2) + 2  # 4 images per prompt, make_grid padding 2
LABEL_MARGIN = 150  # room a labelled figure may take beyond its tiles (label column, title row, gaps)


def run_report(data, out, cwd, *extra):
    """make_report.py in a subprocess; `cwd` is an empty folder, so outputs/p1_bench.md is absent there."""
    return subprocess.run([sys.executable, str(REPO / "make_report.py"), "--data", str(data), "--out", str(out),
                           *map(str, extra)], cwd=cwd, env=ENV, capture_output=True, text=True)


def reverse_figure_size(tmp_path):
    """The size p1_inference draws a reverse-process figure of SNAPSHOTS snapshots at."""
    snapshots = [(t, torch.zeros(3, 28, 28)) for t in range(p1_inference.SNAPSHOTS)]
    p1_inference.reverse_process_figure(snapshots, tmp_path / "probe.png")
    return Image.open(tmp_path / "probe.png").size


def expected_figures(tmp_path):
    """Figure path under OUT -> (min width, max width, min height, max height)."""
    reverse = reverse_figure_size(tmp_path)
    cases_width = p3_clip_zeroshot.CELL * 5
    cases_height = p3_clip_zeroshot.CELL * 2
    return {
        "p1/p1_grid_mnistm.png": (P1_GRID, P1_GRID, P1_GRID, P1_GRID),
        "p1/p1_grid_svhn.png": (P1_GRID, P1_GRID, P1_GRID, P1_GRID),
        "p1/p1_reverse_mnistm.png": (reverse[0], reverse[0], reverse[1], reverse[1]),
        "p1/p1_reverse_svhn.png": (reverse[0], reverse[0], reverse[1], reverse[1]),
        # 5 eta rows x 4 noise columns of 64 px, with labels
        "p2/eta_grid.png": (4 * P2_SIZE, 4 * P2_SIZE + LABEL_MARGIN, 5 * P2_SIZE, 5 * P2_SIZE + LABEL_MARGIN),
        # 11 alphas in one labelled row
        "p2/interpolation/slerp.png": (11 * P2_SIZE, 11 * P2_SIZE + LABEL_MARGIN, P2_SIZE, P2_SIZE + LABEL_MARGIN),
        "p2/interpolation/linear.png": (11 * P2_SIZE, 11 * P2_SIZE + LABEL_MARGIN, P2_SIZE, P2_SIZE + LABEL_MARGIN),
        # 5 successes over 5 failures, each enlarged to CELL px, with captions
        "p3_zeroshot/single/cases.png": (cases_width, cases_width + LABEL_MARGIN, cases_height,
                                         cases_height + 2 * LABEL_MARGIN),
        # toy input.json: 4 prompts (rows) x 4 images
        "p3_ti/p3_ti_grid.png": (TI_GRID_WIDTH, TI_GRID_WIDTH, TI_GRID_WIDTH, TI_GRID_WIDTH),
        # 3 prompts x 2 methods (rows) x 4 images, with labels
        "p3_multi/p3_multi_grid.png": (4 * TINY_SD_RESOLUTION, 4 * TINY_SD_RESOLUTION + LABEL_MARGIN,
                                       6 * TINY_SD_RESOLUTION, 6 * TINY_SD_RESOLUTION + LABEL_MARGIN),
    }


@pytest.fixture(scope="module")
def quick_report(toy_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("make_report")
    result = run_report(toy_world, work / "report", work, "--quick")
    return work / "report", result


def test_quick_report_writes_every_figure_and_references_it(quick_report, tmp_path):
    out, result = quick_report
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{len(make_report.PARTS)} part(s) done, 0 skipped, 0 failed" in result.stdout, result.stdout
    markdown = (out / "report.md").read_text()
    for name, (min_w, max_w, min_h, max_h) in expected_figures(tmp_path).items():
        path = out / name
        assert path.is_file(), f"{name} was not written"
        with Image.open(path) as image:
            assert image.format == "PNG", f"{name} is {image.format}"
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
        assert min_w <= width <= max_w and min_h <= height <= max_h, \
            f"{name} is {width}x{height}, expected {min_w}..{max_w} x {min_h}..{max_h}"
        assert f"]({name})" in markdown, f"report.md does not reference {name}"


def test_header_names_the_toy_world_and_hashes_the_models(quick_report, toy_world):
    out, _ = quick_report
    markdown = (out / "report.md").read_text()
    assert "toy world" in markdown and "| seed | 0 |" in markdown
    for path in (toy_world / "face" / "UNet.pt", out / "p1" / "quick_checkpoint" / "ddpm.safetensors"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:make_report.HASH_LENGTH]
        assert f"`{path}` | `{digest}`" in markdown, f"no hash line for {path}"
    for title, _ in make_report.PARTS.values():
        assert re.search(rf"^\| {re.escape(title)} \| done \| [\d.]+ s \|$", markdown, re.M), title


def test_p2_mse_table_matches_the_images_it_wrote(quick_report, toy_world):
    out, _ = quick_report
    markdown = (out / "report.md").read_text()
    for name in ("00", "09"):
        ours = np.asarray(Image.open(out / "p2" / "faces" / f"{name}.png").convert("RGB"), dtype=np.float64)
        truth = np.asarray(Image.open(toy_world / "face" / "GT" / f"{name}.png").convert("RGB"), dtype=np.float64)
        expected = ((ours - truth) ** 2).mean()
        shown = float(re.search(rf"^\| {name}\.png \| ([\d.]+) \|$", markdown, re.M)[1])
        assert shown == pytest.approx(expected, abs=1e-4), f"{name}.png: table {shown}, recomputed {expected}"


def test_zero_shot_accuracy_matches_its_predictions(quick_report):
    out, _ = quick_report
    markdown = (out / "report.md").read_text()
    for prompts in ("single", "ensemble"):
        lines = (out / "p3_zeroshot" / prompts / "predictions.csv").read_text().splitlines()[1:]
        correct = sum(line.split(",")[1] == line.split(",")[2] for line in lines)
        assert re.search(rf"^\| {prompts} \| \d+ \| [\d.]+% \({correct}/{len(lines)}\) \|", markdown, re.M), prompts


def test_multi_concept_clip_t_matches_clip_on_the_images_it_wrote(quick_report, toy_world):
    """CLIP-T recomputed with transformers' CLIPModel forward (its logits_per_image, the grader's CLIP-T) from the
    generated files and the prompt with each token written as its concept's word."""
    out, _ = quick_report
    markdown = (out / "report.md").read_text()
    scorer = toy_world / "toy_models" / "tiny-clip-scorer"
    model, processor = CLIPModel.from_pretrained(scorer).eval(), CLIPProcessor.from_pretrained(scorer)
    for method, folder in (("TI", "ti"), ("CD", "cd")):
        row = re.search(rf"^\| 3 \| {method} \| `A <cat1> sitting on the <new1>\.` \| `(.+?)` \| ([\d.-]+) \|",
                        markdown, re.M)
        assert row is not None, f"no row for prompt 3, {method}"
        assert row[1] == "A cat sitting on the rocket."
        images = [Image.open(path).convert("RGB")
                  for path in sorted((out / "p3_multi" / folder / "free" / "2").glob("*.png"))]
        inputs = processor(text=[row[1]], images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            outputs = model(**inputs)
        expected = outputs.logits_per_image[:, 0].mean().item()
        assert float(row[2]) == pytest.approx(expected, abs=0.01), f"{method}: table {row[2]}, recomputed {expected}"


def test_missing_prerequisites_skip_with_one_line_each(tmp_path, monkeypatch, capsys):
    """In-process, with the repository's checkpoints/p1 pointed at an empty folder: a developer's trained model
    must not turn the skip into a run."""
    (tmp_path / "hw2_data").mkdir()
    monkeypatch.setattr(p1_train, "DEFAULT_OUT", tmp_path / "checkpoints" / "p1")
    monkeypatch.chdir(tmp_path)  # outputs/p1_bench.md is looked up in the working folder
    make_report.main(["--data", str(tmp_path / "hw2_data"), "--out", str(tmp_path / "report")])
    skip_lines = [line for line in capsys.readouterr().out.splitlines() if ": skipped: " in line]
    assert len(skip_lines) == len(make_report.PARTS), skip_lines
    assert any("p1_train.py" in line for line in skip_lines), "the P1 skip must say how to train a checkpoint"
    assert (tmp_path / "report" / "report.md").read_text().count("**Skipped:**") == len(make_report.PARTS)


def test_a_failing_part_is_recorded_and_exits_1(toy_world, tmp_path, monkeypatch, capsys):
    def broken(context):
        raise RuntimeError("boom")

    monkeypatch.setitem(make_report.PARTS, "p2", ("P2 (broken for the test)", broken))
    with pytest.raises(Hw2Error, match="p2 failed"):
        make_report.main(["--data", str(toy_world), "--out", str(tmp_path), "--parts", "p2"])
    assert "FAILED (RuntimeError: boom)" in capsys.readouterr().out
    assert "**Failed:** RuntimeError: boom" in (tmp_path / "report.md").read_text()
    assert "Traceback" in (tmp_path / "logs" / "p2.log").read_text()


def test_the_accuracy_fd_figure_reads_p1_benchs_rows_back(tmp_path):
    """Rows written by p1_bench.accuracy_row are read back by report_p1.guidance_sweep, value for value; the sweep
    is the sampler run at the most guidance weights; its figure is the same bytes twice."""
    fds = [(30.5, 2.5), (12.25, 1.75)]
    rows = [p1_bench.accuracy_row("dpmpp", 10, w, 200, [0.5 + w / 20, 0.6 + w / 40],
                                  [(fd + w, floor) for fd, floor in fds], 3.5) for w in (0, 2, 5, 7)]
    rows.append(p1_bench.accuracy_row("ddim", 25, 5, 500, [0.9, 0.95], fds, 2.0))
    sampler, sweep = report_p1.guidance_sweep("\n".join(["| sampler | guidance w | ... |", *rows]))
    assert sampler == "DPM-Solver++-10" and [w for w, _ in sweep] == [0, 2, 5, 7]
    assert [float(row["mnistm"]) for _, row in sweep] == [0.5, 0.6, 0.75, 0.85]
    assert [float(row["fd_svhn"]) for _, row in sweep] == [12.2, 14.2, 17.2, 19.2]  # 12.25 printed as 12.2
    assert {row["floor_mnistm"] for _, row in sweep} == {"2.5"} and sweep[0][1]["images"] == "200"
    assert report_p1.guidance_sweep("\n".join(rows[:2])) == (None, [])  # fewer than three weights: no figure
    for name in ("a.png", "b.png"):
        report_p1.accuracy_fd_figure(sampler, sweep, "svhn", tmp_path / name)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert Image.open(tmp_path / "a.png").size == (500, 360)


def test_bad_parts_flag_is_one_clear_error():
    with pytest.raises(Hw2Error, match="--parts"):
        make_report.parse_parts("p1,p4")


def test_file_digest_of_a_file_is_its_sha256(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"hw2" * 1000)
    assert make_report.file_digest(path) == hashlib.sha256(b"hw2" * 1000).hexdigest()[:make_report.HASH_LENGTH]
    assert make_report.file_digest(tmp_path / "absent") is None


def compare_figures(first, second, names):
    different = [name for name in names if (first / name).read_bytes() != (second / name).read_bytes()]
    assert not different, f"figures differ between two runs with the same seed: {different}"


@pytest.mark.slow
def test_same_seed_gives_byte_identical_figures(quick_report, toy_world, tmp_path):
    """P2 (eta noise), zero-shot, textual inversion and Custom Diffusion (training and sampling) again, from
    scratch."""
    out, _ = quick_report
    result = run_report(toy_world, tmp_path / "again", tmp_path, "--quick", "--parts",
                        "p2,p3_zeroshot,p3_ti,p3_multi")
    assert result.returncode == 0, result.stderr[-3000:]
    names = [name for name in expected_figures(tmp_path) if not name.startswith("p1/")]
    compare_figures(out, tmp_path / "again", names)


@pytest.mark.slow
def test_same_seed_gives_byte_identical_p1_figures(quick_report, toy_world, tmp_path):
    out, _ = quick_report
    result = run_report(toy_world, tmp_path / "again", tmp_path, "--quick", "--parts", "p1")
    assert result.returncode == 0, result.stderr[-3000:]
    compare_figures(out, tmp_path / "again", [name for name in expected_figures(tmp_path) if name.startswith("p1/")])
