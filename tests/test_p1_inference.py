"""P1 inference (grader's folder layout, figures, bad input) and the evaluator (scores); the course's own
classifier is tested in test_p1_course_classifier.py."""

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

import p1_data
import p1_eval
import p1_inference
import p1_train
from benchmarks import p1_bench
from p1_model import Diffusion, guided_output, preset
from utils import Hw2Error, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_checkpoint(toy_world, tmp_path_factory):
    """A toy-preset checkpoint after two optimizer steps (untrained, but written by the real training script)."""
    out = tmp_path_factory.mktemp("p1_ckpt")
    p1_train.main(["--data", str(toy_world / "digits"), "--out", str(out), "--limit", "8", "--batch-size", "8",
                   "--epochs", "1", "--grid-every", "0", "--device", "cpu"])
    return out / p1_train.CHECKPOINT_NAME


def random_diffusion(std):
    """A tiny toy-preset model with every parameter drawn from N(0, std^2): the zero-initialised output conv of a
    fresh model would make every output 0 and hide what a sampler does with it."""
    torch.manual_seed(0)
    diffusion = Diffusion(preset("toy", widths=(8, 16), embed_dim=16, attention_heads=2)).eval()
    with torch.no_grad():
        for parameter in diffusion.parameters():
            parameter.normal_(0, std)
    return diffusion


@pytest.mark.slow  # 36 s; the default suite covers the grader layout (test_entry_scripts' hw2_1 test) and the
# figures (test_make_report's quick report)
def test_inference_writes_the_grader_layout_and_figures(tiny_checkpoint, tmp_path):
    out, figures = tmp_path / "out", tmp_path / "figures"
    result = run("p1_inference.py", str(out), "--ckpt", str(tiny_checkpoint), "--sampler", "ddim", "--steps", "2",
                 "--guidance", "0", "--eta", "1", "--batch-size", "125", "--figures", str(figures))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = sorted(f"{digit}_{i:03d}.png" for digit in range(10) for i in range(1, 51))
    for name in ("mnistm", "svhn"):
        files = sorted(os.listdir(out / name))  # hidden temp files would show here too
        assert files == expected
        with Image.open(out / name / "7_050.png") as image:
            assert image.size == (28, 28) and image.mode == "RGB"
    assert sorted(os.listdir(figures)) == ["p1_grid_mnistm.png", "p1_grid_svhn.png", "p1_reverse_mnistm.png",
                                           "p1_reverse_svhn.png"]
    with Image.open(figures / "p1_grid_svhn.png") as grid:
        assert grid.size == (10 * 30 + 2, 10 * 30 + 2)  # 10x10 tiles of 28 px, 2 px padding
    # one noise stream per image: another batch size gives the same files, byte for byte, even with eta = 1
    again = run("p1_inference.py", str(tmp_path / "again"), "--ckpt", str(tiny_checkpoint), "--sampler", "ddim",
                "--steps", "2", "--guidance", "0", "--eta", "1", "--batch-size", "50")
    assert again.returncode == 0, again.stderr[-2000:]
    differing = [f"{name}/{file_name}" for name in ("mnistm", "svhn") for file_name in expected
                 if (out / name / file_name).read_bytes() != (tmp_path / "again" / name / file_name).read_bytes()]
    assert not differing, f"{len(differing)} files differ between batch 125 and batch 50, e.g. {differing[:3]}"


def test_default_guidance_is_the_checkpoints(tiny_checkpoint, tmp_path, monkeypatch):
    """Without --guidance, inference uses the w saved with the checkpoint's training settings (and --guidance wins)."""
    state = p1_train.load_checkpoint(tiny_checkpoint)
    state["train"]["guidance"] = 3.25
    ckpt = tmp_path / "ddpm.safetensors"
    save_checkpoint(ckpt, state)
    used = []

    def fake_generate(diffusion, args, device, per_digit=p1_inference.PER_DIGIT, keep_rows=()):
        used.append(args.guidance)
        return torch.zeros(len(p1_inference.sample_plan(per_digit)), 3, 28, 28), {}

    monkeypatch.setattr(p1_inference, "generate", fake_generate)
    p1_inference.main([str(tmp_path / "out"), "--ckpt", str(ckpt), "--device", "cpu"])
    p1_inference.main([str(tmp_path / "out2"), "--ckpt", str(ckpt), "--device", "cpu", "--guidance", "0.5"])
    assert used == [3.25, 0.5]


def test_snapshot_positions_are_even_and_include_both_ends():
    assert p1_inference.snapshot_positions(26) == [0, 5, 10, 15, 20, 25]
    assert p1_inference.snapshot_positions(1001) == [0, 200, 400, 600, 800, 1000]


def test_sample_plan_covers_50_per_digit_per_dataset():
    plan = p1_inference.sample_plan()
    assert len(plan) == 1000 and len(set(plan)) == 1000
    assert plan[0] == (0, 0, 1) and plan[500] == (1, 0, 1) and plan[-1] == (1, 9, 50)


def test_latest_checkpoint(tmp_path):
    """The newest ddpm*.safetensors by modification time, whatever the names' order; other names are ignored."""
    with pytest.raises(Hw2Error, match="no checkpoint"):
        p1_inference.find_latest_checkpoint(tmp_path)
    for name, mtime in (("ddpm.safetensors", 1_000), ("ddpm_old.safetensors", 2_000), ("evaluator.safetensors", 3_000)):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    assert p1_inference.find_latest_checkpoint(tmp_path).name == "ddpm_old.safetensors"
    os.utime(tmp_path / "ddpm.safetensors", (4_000, 4_000))
    assert p1_inference.find_latest_checkpoint(tmp_path).name == "ddpm.safetensors"


def test_out_dir_with_foreign_files_is_refused_not_cleaned(tmp_path):
    (tmp_path / "mnistm").mkdir()
    (tmp_path / "mnistm" / "notes.txt").write_text("mine")
    with pytest.raises(Hw2Error, match="notes.txt"):
        p1_inference.check_out_dir(tmp_path)
    assert (tmp_path / "mnistm" / "notes.txt").read_text() == "mine"


def test_unwritable_out_dir_is_one_line(tiny_checkpoint, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"  # a folder below a file cannot be created, even by root
    result = run("p1_inference.py", str(out), "--ckpt", str(tiny_checkpoint))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert str(out) in lines[0]


@pytest.mark.parametrize("case", ["foreign_checkpoint", "evaluator_checkpoint", "missing_checkpoint", "bad_steps",
                                  "eta_above_1", "negative_eta", "eta_for_a_solver"])
def test_bad_input_is_refused_before_writing(tiny_checkpoint, tmp_path, case):
    ckpt, extra = str(tiny_checkpoint), []
    if case == "foreign_checkpoint":
        state = p1_train.load_checkpoint(tiny_checkpoint)
        state["config"]["widths"] = [16, 32]  # another config: the weights do not fit it
        ckpt = str(tmp_path / "other.safetensors")
        save_checkpoint(ckpt, state)
    elif case == "evaluator_checkpoint":
        ckpt = str(tmp_path / "evaluator.safetensors")
        save_checkpoint(ckpt, {"config": {"widths": [16, 32], "hidden": 128}, "model": {}})
    elif case == "missing_checkpoint":
        ckpt = str(tmp_path / "nope.safetensors")
    else:
        extra = {"bad_steps": ["--steps", "0"], "eta_above_1": ["--eta", "1.5"], "negative_eta": ["--eta", "-0.1"],
                 "eta_for_a_solver": ["--sampler", "unipc", "--eta", "0.5"]}[case]
    expected = {"foreign_checkpoint": "other.safetensors", "evaluator_checkpoint": "evaluator.safetensors",
                "missing_checkpoint": "nope.safetensors", "bad_steps": "--steps",
                "eta_above_1": "--eta must be between 0 and 1", "negative_eta": "--eta must be between 0 and 1",
                "eta_for_a_solver": "--sampler unipc does not use it"}[case]
    with pytest.raises(Hw2Error, match=expected):
        p1_inference.main([str(tmp_path / "out"), "--ckpt", ckpt, *extra])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ evaluator


def write_fake_outputs(toy_world, out, per_digit=3):
    """Real toy val digits under the grader's names: a stand-in for generated images with known labels."""
    for name in ("mnistm", "svhn"):
        (out / name).mkdir(parents=True)
        counts = {}
        for file_name, digit in p1_data.read_labels(toy_world / "digits" / name / "val.csv"):
            if counts.get(digit, 0) < per_digit:
                counts[digit] = counts.get(digit, 0) + 1
                with Image.open(toy_world / "digits" / name / "data" / file_name) as image:
                    image.save(out / name / p1_inference.image_name(digit, counts[digit]))


def parse_accuracies(text, marker):
    """{name: accuracy} from lines like 'MNIST-M acc = 0.9000 (correct/total = 45/50)' that contain `marker`."""
    return {line.split(marker)[0].strip(" :"): float(line.split("= ")[1].split()[0])
            for line in text.splitlines() if marker in line}


@pytest.mark.slow
def test_eval_train_and_score_smoke(toy_world, tmp_path):
    """One epoch of `p1_eval.py train` on the toy train sets, MNIST-M without its val.csv (validated on the held-out
    tenth of train.csv instead), then `score` on real toy val digits saved under the grader's names.

    The bounds (0.4, chance 0.1) depend on the toy digits: one epoch scored about 0.7-0.8 on them."""
    data = tmp_path / "digits"
    for name in ("mnistm", "svhn"):
        src = toy_world / "digits" / name
        (data / name).mkdir(parents=True)
        (data / name / "data").symlink_to(src / "data")
        shutil.copy(src / "train.csv", data / name / "train.csv")
    shutil.copy(toy_world / "digits" / "svhn" / "val.csv", data / "svhn" / "val.csv")
    result = run("p1_eval.py", "--device", "cpu", "train", "--data", str(data), "--out", str(tmp_path), "--epochs",
                 "1")
    assert result.returncode == 0, result.stderr[-2000:]
    announced = [line for line in result.stdout.splitlines() if "no val.csv" in line]
    assert len(announced) == 1 and announced[0].startswith("mnistm:"), result.stdout
    trained = parse_accuracies(result.stdout, "held-out val acc")
    assert sorted(trained) == ["MNIST-M", "SVHN"] and min(trained.values()) >= 0.4, result.stdout
    out = tmp_path / "generated"
    write_fake_outputs(toy_world, out, per_digit=5)
    result = run("p1_eval.py", "--device", "cpu", "score", str(out), "--evaluator",
                 str(tmp_path / p1_eval.EVALUATOR_NAME), "--data", str(data))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("MNIST-M acc = 0.") and "(correct/total = " in lines[0] and lines[0].endswith("/50)")
    assert lines[1].startswith("SVHN acc = ") and lines[2].startswith("acc = ")
    scored = parse_accuracies(result.stdout, " acc = ")
    assert min(scored.values()) >= 0.4, result.stdout
    assert float(lines[2].split("=")[1]) == pytest.approx(sum(scored.values()) / 2, abs=1e-4)
    # FD_eval's real images: SVHN's val.csv, and for MNIST-M (no val.csv here) the same held-out tenth, said once
    notes = [line for line in lines[3:] if "no val.csv" in line]
    fd_lines = [line for line in lines[3:] if "FD_eval" in line]
    assert len(notes) == 1 and notes[0].startswith("mnistm:") and len(lines) == 6, result.stdout
    assert fd_lines[0].startswith("MNIST-M FD_eval = ") and fd_lines[1].startswith("SVHN FD_eval = ")
    assert "50 generated vs " in fd_lines[0] and "two real halves with as many images: " in fd_lines[0], fd_lines[0]


def test_evaluator_limit_trains_on_the_first_n_rows_of_each_train_csv(small_digits, tmp_path, monkeypatch):
    """`train --limit 7` hands the classifier the digits of the first 7 rows of each set's train.csv, in order."""
    digits, handed = small_digits(rows=20), {}
    for name in p1_eval.DATASETS:  # a small val.csv, so that no train row is held out for validation
        rows = (digits / name / "train.csv").read_text().splitlines()
        (digits / name / "val.csv").write_text("\n".join(rows[:3]) + "\n")

    def record(images, labels, *args, **kwargs):
        handed["labels"] = labels.tolist()
        return p1_eval.DigitClassifier(p1_eval.ClassifierConfig())

    monkeypatch.setattr(p1_eval, "fit_classifier", record)
    p1_eval.main(["--device", "cpu", "train", "--data", str(digits), "--out", str(tmp_path / "out"), "--limit", "7"])
    expected = []
    for name in p1_eval.DATASETS:
        with open(digits / name / "train.csv", newline="") as f:
            expected += [int(row["label"]) for row in list(csv.DictReader(f))[:7]]
    assert handed["labels"] == expected
    assert (tmp_path / "out" / p1_eval.EVALUATOR_NAME).is_file()


def test_predict_takes_one_plain_argmax_per_image_unless_tta_is_asked_for():
    """The grader takes one argmax per image, so our evaluator does too by default; `tta` averages the softmax over
    the image and its four one-pixel shifts (edge pixels repeated into the gap), built here by index arithmetic."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 28 * 28, 10))  # every pixel counts
    x = torch.rand(64, 3, 28, 28) * 2 - 1
    rows = torch.arange(28)
    with torch.no_grad():
        plain = model(x).argmax(1)
        probs = sum(torch.softmax(model(x[:, :, (rows - dy).clamp(0, 27)][:, :, :, (rows - dx).clamp(0, 27)]), 1)
                    for dy, dx in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)])
    assert (plain != probs.argmax(1)).sum() >= 10, "the two predictors agree: this test could not tell them apart"
    assert torch.equal(p1_eval.predict(model, x, batch_size=5), plain)
    assert torch.equal(p1_eval.predict(model, x, batch_size=5, tta=True), probs.argmax(1))


@pytest.mark.slow
def test_evaluator_scores_at_least_096_on_toy_val(toy_world, tmp_path):
    result = run("p1_eval.py", "--device", "cpu", "train", "--data", str(toy_world / "digits"), "--out",
                 str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    accs = [float(line.split("= ")[1].split()[0]) for line in result.stdout.splitlines() if "held-out" in line]
    assert len(accs) == 2 and min(accs) >= 0.96, result.stdout


# ------------------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_benchmark_runs_end_to_end(toy_world, tiny_checkpoint, tmp_path, one_torch_thread):
    """benchmarks/p1_bench.py on the tiny checkpoint: every section runs and the report lists what was asked."""
    torch.manual_seed(0)
    evaluator = tmp_path / "evaluator.safetensors"
    save_checkpoint(evaluator, {"config": asdict(p1_eval.ClassifierConfig()),
                                "model": p1_eval.DigitClassifier(p1_eval.ClassifierConfig()).state_dict()})
    report = tmp_path / "bench.md"
    text = p1_bench.main(["--ckpt", str(tiny_checkpoint), "--data", str(toy_world / "digits"), "--evaluator",
                          str(evaluator), "--train-images", "8", "--batch-size", "4", "--train-steps", "1",
                          "--repeats", "1", "--speed-images", "1", "--report", str(report), "--device", "cpu",
                          "--runs", "ddim:2:0:1,ddim:2:5:1,dpmpp:2:5:1,unipc:3:5:1"])
    assert report.read_text() == text
    assert "fp32" in text and "images/s" in text
    assert "Sampling 1 images per call (guided, w = 5.0), median of 1:" in text
    for row in ("| DDPM-1000 |", "| DDIM-25 |", "| DPM-Solver++-10 |", "| UniPC-10 |", "| DDIM-2 | 0 | 10 |",
                "| DDIM-2 | 5 | 10 |", "| DPM-Solver++-2 | 5 | 10 |", "| UniPC-3 | 5 | 10 |"):
        assert row in text
    assert "| FD_eval MNIST-M | FD_eval SVHN | images/s |" in text


def test_sampling_is_full_fp32_unless_autocast_is_asked_for(monkeypatch):
    """Where autocast runs in reduced precision (bf16 on a GPU; faked on this CPU through utils.amp_dtype, which
    utils.autocast asks), the default samples equal sampling with no autocast at all, bit for bit; --autocast
    gives other samples."""
    import types

    import utils
    diffusion = random_diffusion(0.1)
    args = types.SimpleNamespace(sampler="ddim", steps=2, eta=0.0, guidance=5.0, seed=0, batch_size=20)
    reference, _ = p1_inference.generate(diffusion, args, torch.device("cpu"), per_digit=1)  # no autocast here
    monkeypatch.setattr(utils, "amp_dtype", lambda device, cpu_bf16=False: torch.bfloat16)
    args.autocast = p1_inference.build_parser().parse_args(["out"]).autocast  # the default
    default, _ = p1_inference.generate(diffusion, args, torch.device("cpu"), per_digit=1)
    assert args.autocast is False and torch.equal(default, reference)
    args.autocast = p1_inference.build_parser().parse_args(["out", "--autocast"]).autocast
    reduced, _ = p1_inference.generate(diffusion, args, torch.device("cpu"), per_digit=1)
    assert not torch.equal(reduced, reference)


def test_sampling_levers_give_the_guided_output_in_the_batches_they_name(monkeypatch):
    """benchmarks/p1_sampling_bench.py: each lever computes p1_model.guided_output of all the images at once (to
    float rounding), in the batch size and memory format its name says."""
    from benchmarks import p1_sampling_bench

    net = random_diffusion(0.3).net
    inputs = p1_sampling_bench.sampling_inputs(8, torch.device("cpu"))
    with torch.no_grad():
        expected = guided_output(net, *inputs, p1_sampling_bench.GUIDANCE)
    seen, real = [], p1_sampling_bench.guided_output

    def recording(model, x_t, *args):
        seen.append((x_t.shape[0], x_t.is_contiguous(memory_format=torch.channels_last) and not x_t.is_contiguous()))
        return real(model, x_t, *args)

    monkeypatch.setattr(p1_sampling_bench, "guided_output", recording)
    batches = {"default": [(4, False)] * 2, "channels_last": [(4, True)] * 2, "jit.freeze": [(4, False)] * 2,
               "half batch": [(2, False)] * 4, "double batch": [(8, False)], "2 workers": [(4, False)] * 2}
    for name, expected_batches in batches.items():
        seen.clear()
        output = p1_sampling_bench.lever_forward(net, inputs, 4, **p1_sampling_bench.LEVERS[name])()
        assert seen == expected_batches, f"{name}: forwards of {seen}, expected {expected_batches}"
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_cpu_sampling_gives_the_plain_models_images_at_any_batch_size():
    """generate (channels_last weights on a CPU) gives what p1_model's sampler gives on an untouched copy of the
    model, and the same images whatever the batch size, both to float rounding (oneDNN picks its kernels by shape)."""
    import copy
    import types

    from p1_model import final
    from utils import image_generators, standard_normal
    diffusion = random_diffusion(0.1)
    plain = copy.deepcopy(diffusion)
    args = types.SimpleNamespace(sampler="dpmpp", steps=3, eta=0.0, guidance=5.0, seed=0, batch_size=20)
    images, _ = p1_inference.generate(diffusion, args, torch.device("cpu"), per_digit=1)
    plan = p1_inference.sample_plan(per_digit=1)
    x_T = standard_normal((len(plan), 3, 28, 28), image_generators(0, len(plan), "cpu"), "cpu")
    with torch.no_grad():
        expected = final(plain.sample(x_T, torch.tensor([p[1] for p in plan]), torch.tensor([p[0] for p in plan]),
                                      w=5.0, sampler="dpmpp", steps=3))
    assert plain.net.conv_in.weight.is_contiguous()  # the reference ran in the default layout
    assert diffusion.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    args.batch_size = 7
    torch.testing.assert_close(p1_inference.generate(diffusion, args, torch.device("cpu"), per_digit=1)[0], images,
                               rtol=0, atol=1e-5)
