"""P3 zero-shot: the classifier and predictions against open_clip's own zero-shot helper, hand-made cases with
known answers, every bad input, and one run of the real script on the toy world."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import p3_clip_models as models
import p3_clip_zeroshot as p3
import toy_data
import utils
from utils import Hw2Error, run_cli

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(toy_world):
    """The toy world's tiny CLIP, loaded the way the script loads it, and the toy data."""
    data = toy_world / "clip_zeroshot"
    name, pretrained, quick_gelu = models.resolve_model(None, None, data)
    model, preprocess, tokenizer = models.load_clip(name, pretrained, torch.device("cpu"), quick_gelu)
    id2label = p3.read_id2label(data)
    paths, class_ids = p3.list_images(data, id2label)
    return model, preprocess, tokenizer, list(id2label.values()), paths, class_ids


def toy_model_flags(toy_world):
    config = toy_world / models.TINY_CLIP_DIR / f"{models.TINY_CLIP_NAME}.json"
    return ["--model", str(config), "--pretrained", str(config.with_suffix(".safetensors"))]


def copy_data(toy_world, tmp_path):
    """A writable copy of the toy clip_zeroshot folder (outside the toy world, so the model must be named)."""
    return Path(shutil.copytree(toy_world / "clip_zeroshot", tmp_path / "clip_zeroshot"))


# -------------------------------------------------------------------------------------- toy model


def test_tiny_clip_is_seeded_and_loads_offline(toy_world, tmp_path):
    weights = Path(models.TINY_CLIP_DIR) / f"{models.TINY_CLIP_NAME}.safetensors"
    toy_data.build_tiny_clip(tmp_path / "same", 0)
    toy_data.build_tiny_clip(tmp_path / "other", 1)
    assert (tmp_path / "same" / weights).read_bytes() == (toy_world / weights).read_bytes()
    assert (tmp_path / "other" / weights).read_bytes() != (toy_world / weights).read_bytes()
    name, pretrained, quick_gelu = models.resolve_model(None, None, toy_world / "clip_zeroshot")  # the default
    assert (name, Path(pretrained), quick_gelu) == (models.TINY_CLIP_NAME, toy_world / weights, False)
    assert name in open_clip.list_models()


# --------------------------------------------------------------------------- against open_clip's helper


def test_classifier_is_open_clips_and_confidences_use_the_models_logit_scale(tiny, monkeypatch):
    model, preprocess, tokenizer, names, paths, class_ids = tiny
    classnames = [p3.clean_class_name(name) for name in names]
    templates = list(p3.CIFAR100_TEMPLATES)
    calls = []
    helper = open_clip.build_zero_shot_classifier
    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", lambda *a, **k: calls.append(k) or helper(*a, **k))
    ours = p3.build_classifier(model, tokenizer, classnames, templates, "cpu", batch_size=64)  # 180 prompts
    assert len(calls) == 1, "the classifier is not built by open_clip's build_zero_shot_classifier"
    reference = helper(model, tokenizer, classnames, templates, num_classes_per_batch=3, device="cpu")
    assert ours.shape == reference.shape == (model.text_projection.shape[1], len(names))
    assert ours.dtype == torch.float32 and torch.equal(ours, reference), (ours - reference).abs().max()

    # the toy CLIP's scale is open_clip's initial exp(log(1 / 0.07)) = 14.3: a fixed 100 would give other confidences
    scale = model.logit_scale.exp().item()
    assert p3.logit_scale(model) == pytest.approx(scale) and abs(scale - 100) > 50, scale
    loader = p3.make_loader(paths, preprocess, batch_size=32, workers=0, device="cpu")  # 100 images: last batch 4
    top_probs, top_classes = p3.classify(model, loader, ours, "cpu", 5, p3.logit_scale(model))
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in paths])
        image_features, _, model_scale = model(pixels, None)  # open_clip's forward: normalised features, exp(t)
        reference_probs = (model_scale * image_features @ reference).softmax(dim=-1)
    assert torch.equal(top_classes[:, 0], reference_probs.argmax(dim=-1))
    gathered = reference_probs.gather(1, top_classes)  # robust to near-ties among the lower top-5 entries
    assert torch.allclose(top_probs, gathered, atol=1e-5), (top_probs - gathered).abs().max()
    assert torch.allclose(top_probs[:, -1], reference_probs.topk(5).values[:, -1], atol=1e-5)


def test_fp32_by_default_and_autocast_only_on_request(toy_world, tmp_path, monkeypatch):
    """Pretend this CPU autocasts to bf16, as a GPU does: the encoders must still run in fp32 unless --autocast."""
    for module in (utils, p3):  # what utils.autocast and the script's precision label ask
        monkeypatch.setattr(module, "amp_dtype", lambda *args, **kwargs: torch.bfloat16, raising=False)
    seen = []
    load = p3.load_clip

    def recording_load(*args, **kwargs):
        model, preprocess, tokenizer = load(*args, **kwargs)
        for name in ("encode_image", "encode_text"):
            encode = getattr(model, name)
            setattr(model, name, lambda *a, encode=encode, name=name, **k: seen.append(
                (name, torch.is_autocast_enabled("cpu"))) or encode(*a, **k))
        return model, preprocess, tokenizer

    monkeypatch.setattr(p3, "load_clip", recording_load)
    flags = ["--data", str(toy_world / "clip_zeroshot"), "--device", "cpu", "--workers", "0"]
    p3.main([*flags, "--out", str(tmp_path / "default")])
    assert {name for name, _ in seen} == {"encode_image", "encode_text"} and not any(on for _, on in seen), seen
    assert json.loads((tmp_path / "default" / "metrics.json").read_text())["precision"] == "float32"
    seen.clear()
    p3.main([*flags, "--out", str(tmp_path / "autocast"), "--autocast"])
    assert seen and all(on for _, on in seen), seen
    assert json.loads((tmp_path / "autocast" / "metrics.json").read_text())["precision"] == "bfloat16"


# ------------------------------------------------------------------------------ hand-made known answers


class FixedTextFeatures(torch.nn.Module):
    """A stand-in CLIP whose text feature of prompt k is row k of `features` (its tokenizer gives prompt indices)."""

    def __init__(self, prompts, features):
        super().__init__()
        self.index = {prompt: k for k, prompt in enumerate(prompts)}
        self.features = features

    def tokenize(self, texts):
        return torch.tensor([self.index[text] for text in texts])

    def encode_text(self, tokens, normalize=False):
        features = self.features[tokens]
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def test_classifier_by_hand():
    # class "a": templates along x (length 2) and y (length 3): unit vectors averaged -> (1, 1)/sqrt(2)
    # class "b": both templates along -x -> (-1, 0)
    templates = ["{} one", "{} two"]
    prompts = ["a one", "a two", "b one", "b two"]
    model = FixedTextFeatures(prompts, torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [-5.0, 0.0]]))
    expected = torch.tensor([[1 / math.sqrt(2), -1.0], [1 / math.sqrt(2), 0.0]])  # [D, C]
    for batch_size in (1, 2, 4):  # one class per pass, or both: the same classifier
        classifier = p3.build_classifier(model, model.tokenize, ["a", "b"], templates, "cpu", batch_size)
        assert torch.allclose(classifier, expected, atol=1e-6), (batch_size, classifier)


class FeaturesAreImages(torch.nn.Module):
    """A stand-in CLIP whose image features are the input vectors themselves."""

    def encode_image(self, pixels):
        return pixels


def test_accuracy_on_a_constructed_case():
    classifier = torch.eye(3)  # class c is the unit vector e_c
    theta = 0.3  # image (cos, sin, 0): logits 100 * (cos, sin, 0), class 0 wins
    images = torch.tensor([[math.cos(theta), math.sin(theta), 0.0],  # -> 0
                           [0.0, 5.0, 1.0],  # -> 1
                           [0.0, 0.0, 2.0],  # -> 2
                           [3.0, 0.0, 0.5],  # -> 0
                           [0.2, 0.0, 0.1]])  # -> 0 (scale does not matter: features are normalised)
    labels = torch.tensor([0, 1, 1, 2, 0])  # right, right, wrong (2 for 1), wrong (0 for 2), right
    batches = [images[:2], images[2:3], images[3:]]  # uneven batches, one of size 1
    top_probs, top_classes = p3.classify(FeaturesAreImages(), batches, classifier, "cpu", 2, 100.0)
    assert top_classes[:, 0].tolist() == [0, 1, 2, 0, 0]
    correct = top_classes[:, 0] == labels
    assert correct.tolist() == [True, True, False, False, True]  # 3/5 = 60%
    assert (top_classes == labels[:, None]).any(dim=1).sum().item() == 4  # top-2: image 3's runner-up is class 2
    logits = [100 * math.cos(theta), 100 * math.sin(theta), 0.0]
    expected = math.exp(logits[0]) / sum(math.exp(v) for v in logits)
    assert top_probs[0, 0].item() == pytest.approx(expected, rel=1e-5)

    names = ["a", "b", "c"]
    rows = p3.per_class_rows(top_classes[:, 0], labels, names)
    assert rows == [("c", 0, 1, ("a", 1)), ("b", 1, 2, ("c", 1)), ("a", 2, 2, None)]


def test_choose_cases_is_seeded_and_in_file_order():
    correct = torch.tensor([True, False, True, True, False, True, True, False])
    torch.manual_seed(0)
    successes, failures = p3.choose_cases(correct, 3, seed=1)
    torch.manual_seed(1)  # fails if the draw follows the global RNG instead of `seed`
    assert (successes, failures) == p3.choose_cases(correct, 3, seed=1)
    drawn = {tuple(p3.choose_cases(correct, 3, seed)[0]) for seed in range(20)}
    assert len(drawn) > 1, "the successes do not depend on the seed (e.g. always the first three in file order)"
    assert len(successes) == 3 and successes == sorted(successes) and all(correct[successes])
    assert failures == [1, 4, 7]  # only three failures exist: all of them
    assert p3.choose_cases(correct, 10, seed=0)[0] == [0, 2, 3, 5, 6]


def test_class_names_and_templates(tmp_path):
    assert p3.clean_class_name("willow_tree") == "willow tree"
    assert p3.clean_class_name("aquarium__fish ") == "aquarium fish"
    assert p3.load_templates("single") == ["a photo of a {}."]
    assert len(p3.load_templates("ensemble")) == 18
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {}.\n\n  a drawing of a {}.  \n")
    assert p3.load_templates(str(good)) == ["a photo of a {}.", "a drawing of a {}."]
    bad = tmp_path / "bad.txt"
    for line in ["a photo of {name}.", "a {} and a {}.", "a photo.", "a {} of {"]:
        bad.write_text(f"a photo of a {{}}.\n{line}\n")
        with pytest.raises(Hw2Error, match="line 2 .*must contain one"):
            p3.load_templates(str(bad))
    with pytest.raises(Hw2Error, match="not 'single', 'ensemble'"):
        p3.load_templates(str(tmp_path / "missing.txt"))


def test_images_sorted_by_class_then_index(tmp_path):
    (tmp_path / "val").mkdir()
    for name in ["10_2.png", "2_10.png", "2_9.png", "0_100.png"]:
        (tmp_path / "val" / name).touch()
    (tmp_path / "id2label.json").write_text(json.dumps({"10": "ten", "2": "two", "0": "zero"}))
    id2label = p3.read_id2label(tmp_path)
    assert list(id2label) == [0, 2, 10]
    paths, class_ids = p3.list_images(tmp_path, id2label)
    assert [path.name for path in paths] == ["0_100.png", "2_9.png", "2_10.png", "10_2.png"]
    assert class_ids == [0, 2, 2, 10]


# ------------------------------------------------------------------------------------------- bad input


def test_missing_id2label_or_val(toy_world, tmp_path):
    data = copy_data(toy_world, tmp_path)
    (data / "id2label.json").unlink()
    with pytest.raises(Hw2Error, match="id2label.json not found"):
        p3.main(["--data", str(data)])
    data.joinpath("id2label.json").write_text(json.dumps({"0": "cat"}))
    shutil.rmtree(data / "val")
    with pytest.raises(Hw2Error, match="val not found"):
        p3.main(["--data", str(data)])


def test_class_id_not_in_id2label(toy_world, tmp_path):
    data = copy_data(toy_world, tmp_path)
    shutil.copy(data / "val" / "0_0.png", data / "val" / "42_0.png")
    with pytest.raises(Hw2Error, match=r"42_0.png has class id 42"):
        p3.main(["--data", str(data)])


def test_unreadable_image_is_named(toy_world, tmp_path):
    data = copy_data(toy_world, tmp_path)
    (data / "val" / "3_7777.png").write_bytes(b"not a png")
    args = ["--data", str(data), "--out", str(tmp_path / "out"), "--device", "cpu", "--workers", "1",
            *toy_model_flags(toy_world)]
    with pytest.raises(Hw2Error, match=r"cannot read image .*3_7777\.png"):  # raised in a worker process
        p3.main(args)
    assert not (tmp_path / "out").exists()  # nothing written before the failure


def test_unknown_model_lists_close_names(toy_world):
    with pytest.raises(Hw2Error, match=r"unknown --model 'ViT-B-33' \(close names: .*ViT-B-32"):
        p3.main(["--data", str(toy_world / "clip_zeroshot"), "--model", "ViT-B-33"])


def test_missing_pretrained_file(toy_world, tmp_path):
    config = toy_world / models.TINY_CLIP_DIR / f"{models.TINY_CLIP_NAME}.json"
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(Hw2Error, match="neither a weights file nor a pretrained tag"):
        p3.main(["--data", str(toy_world / "clip_zeroshot"), "--model", str(config), "--pretrained", str(missing)])
    with pytest.raises(Hw2Error, match="its tags: openai"):
        p3.main(["--data", str(toy_world / "clip_zeroshot"), "--model", "ViT-B-32", "--pretrained", str(missing)])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not weights")
    with pytest.raises(Hw2Error, match="cannot load toy-tiny-clip with weights .*broken.safetensors"):
        p3.main(["--data", str(toy_world / "clip_zeroshot"), "--model", str(config), "--pretrained", str(broken)])
    with pytest.raises(Hw2Error, match="model config .*nowhere.json not found"):
        p3.main(["--data", str(toy_world / "clip_zeroshot"), "--model", str(tmp_path / "nowhere.json")])


# --------------------------------------------------------------------------------------------- script


def run_script(*args):
    return subprocess.run([sys.executable, "p3_clip_zeroshot.py", *args], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True)


def test_script_on_toy_world(toy_world, tmp_path):
    out = tmp_path / "out"
    result = run_script("--data", str(toy_world / "clip_zeroshot"), "--out", str(out), "--prompts", "ensemble",
                        "--device", "cpu", "--workers", "2", "--batch-size", "64")
    assert result.returncode == 0, result.stderr
    assert "Toy world:" in result.stdout and "chance level" in result.stdout
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "label", "prediction", "score", "top5"]
    assert len(rows) == 100 and rows[0]["image"] == "0_0.png" and rows[-1]["image"] == "9_99.png"
    correct = sum(row["label"] == row["prediction"] for row in rows)
    assert f"Zero-shot accuracy: {100 * correct / 100:.2f}% ({correct}/100)" in result.stdout
    assert all(row["top5"].split("|")[0] == row["prediction"] and len(row["top5"].split("|")) == 5 for row in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["correct"] == correct and len(metrics["templates"]) == 18
    shown = len(metrics["cases"]["successes"]) + len(metrics["cases"]["failures"])
    assert shown == min(correct, 5) + min(100 - correct, 5)
    assert Image.open(out / "cases.png").size[0] > 5 * p3.CELL
    assert sorted(path.name for path in out.iterdir()) == ["cases.png", "metrics.json", "predictions.csv"]


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(p3.main, ["--data", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "id2label.json not found" in err
