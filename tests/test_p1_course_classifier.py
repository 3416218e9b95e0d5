"""`p1_eval.py score --course-classifier` against an independent re-implementation of the course's grader.

The reference below follows the course's digit_classifier.py (DLCV Fall 2024 hw2) line by line: its Dataset over
os.listdir, PIL RGB, Resize((28, 28)) + ToTensor + Normalize(0.5, 0.5), a DataLoader of batch 32, torch.max per
image, its printed lines. Only `torch.load` differs (map_location="cpu", weights_only=True: no GPU here).
"""

import importlib.util
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import p1_course_classifier
import p1_data
import p1_eval
from utils import run_cli, save_checkpoint

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------- the course's digit_classifier.py, as written

class CustomDataset(Dataset):
    def __init__(self, path, transform):
        self.img_dir = path
        self.transform = transform
        self.data = []
        self.labels = []
        for filename in os.listdir(self.img_dir):
            self.data.append(os.path.join(self.img_dir, filename))
            self.labels.append(int(filename[0]))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        img = Image.open(self.data[idx]).convert('RGB')
        return self.transform(img), self.labels[idx]


class MnistmClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


COURSE_TRANSFORM = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor(),
                                       transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])


def course_evaluate(model, folder):
    """digit_classifier.py's evaluate_model, also returning {file name: (prediction, logits)}."""
    dataset = CustomDataset(folder, COURSE_TRANSFORM)
    data_loader = DataLoader(dataset, batch_size=32, shuffle=False)
    model.eval()
    correct, total, per_image = 0, 0, {}
    with torch.no_grad():
        for i, (imgs, labels) in enumerate(data_loader):
            outputs = model(imgs)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
            for j, (p, out) in enumerate(zip(predicted, outputs)):
                per_image[os.path.basename(dataset.data[32 * i + j])] = (int(p), out)
    return correct, total, per_image


def course_line(name, correct, total):
    return f'{name} acc = {correct/total:.4f} (correct/total = {correct}/{total})'


# ------------------------------------------------------------------------------------------------- fixtures


def grader_like_folder(toy_world, out, per_digit=6):
    """Real toy val digits under the grader's names (0_001.png ...), a stand-in for generated images; a few are
    saved at 32x32, in grey and with alpha, so that the resize and the RGB conversion are exercised too."""
    for name in ("mnistm", "svhn"):
        (out / name).mkdir(parents=True)
        counts = {}
        for file_name, digit in p1_data.read_labels(toy_world / "digits" / name / "val.csv"):
            if counts.get(digit, 0) < per_digit:
                counts[digit] = counts.get(digit, 0) + 1
                with Image.open(toy_world / "digits" / name / "data" / file_name) as image:
                    image = image.convert("RGB")
                    index = len(os.listdir(out / name))
                    if index % 7 == 3:
                        image = image.resize((32, 32), Image.BICUBIC)
                    elif index % 7 == 5:
                        image = image.convert("L")
                    elif index % 7 == 6:
                        image = image.convert("RGBA")
                    image.save(out / name / f"{digit}_{counts[digit]:03d}.png")


@pytest.fixture()
def course_setup(toy_world, tmp_path):
    """A grader-like folder, a randomly initialised course classifier saved as the course ships Classifier.pth, and
    a random evaluator of ours (SVHN's fallback)."""
    out = tmp_path / "generated"
    grader_like_folder(toy_world, out)
    torch.manual_seed(0)
    reference = MnistmClassifier()
    # a random net predicts nearly one class for all digits; a few steps on these very images make it vary
    images, labels = next(iter(DataLoader(CustomDataset(out / "mnistm", COURSE_TRANSFORM), batch_size=1000)))
    optimizer = torch.optim.Adam(reference.parameters(), lr=3e-3)
    for _ in range(10):  # about 34 of the 60 right, 9 different digits predicted
        optimizer.zero_grad()
        F.cross_entropy(reference(images), labels).backward()
        optimizer.step()
    torch.save({'state_dict': reference.state_dict()}, tmp_path / "Classifier.pth")
    evaluator = tmp_path / "evaluator.safetensors"
    save_checkpoint(evaluator, {"config": asdict(p1_eval.ClassifierConfig()),
                                "model": p1_eval.DigitClassifier(p1_eval.ClassifierConfig()).state_dict()})
    return out, reference, tmp_path / "Classifier.pth", evaluator


# ---------------------------------------------------------------------------------------------------- tests


def test_course_classifier_equals_the_course_grader_image_for_image(course_setup, monkeypatch, capsys):
    out, reference, classifier, evaluator = course_setup
    correct, total, expected = course_evaluate(reference, out / "mnistm")
    predictions = [p for p, _ in expected.values()]
    assert total == 60 and 0 < correct < total and len(set(predictions)) >= 5, \
        f"the reference could not tell a wrong pipeline apart: {correct}/{total} right, predictions {predictions}"

    model = p1_course_classifier.load_course_classifier(classifier)
    files, predicted, labels = p1_course_classifier.course_predictions(model, out / "mnistm", torch.device("cpu"))
    logits = p1_course_classifier.course_logits(model, files, torch.device("cpu"))
    ours = {path.name: (int(p), out_) for path, p, out_ in zip(files, predicted, logits)}
    assert ours.keys() == expected.keys()
    differing = [n for n in ours if ours[n][0] != expected[n][0]]
    assert not differing, f"{len(differing)} predictions differ, e.g. {differing[:3]}"
    worst = max(float((ours[n][1] - expected[n][1]).abs().max()) for n in ours)
    assert worst < 1e-5, f"logits differ from the course's by up to {worst}"
    assert [int(x) for x in labels] == [int(p.name[0]) for p in files]

    monkeypatch.setitem(sys.modules, "detectors", None)  # resnet34_svhn unavailable, even where detectors is
    p1_eval.main(["--device", "cpu", "score", str(out), "--course-classifier", str(classifier), "--evaluator",
                  str(evaluator)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"SVHN: scored by our evaluator {evaluator}, not the course's resnet34_svhn: the "
                               f"detectors package does not import"), lines[0]
    assert lines[1] == course_line("MNIST-M", correct, total)
    svhn_correct, svhn_total = p1_eval.evaluator_counts(p1_eval.load_evaluator(evaluator, "cpu"), out / "svhn",
                                                        "cpu", tta=False)
    assert lines[2] == course_line("SVHN", svhn_correct, svhn_total)
    assert lines[3] == f'acc = {((correct/total + svhn_correct/svhn_total) / 2):.4f}' and len(lines) == 4


FAKE_DETECTORS = '''
import torch
from timm.models import register_model

from .net import build


@register_model
def resnet34_svhn(pretrained=False, **kwargs):  # as detectors does: weights from torch's hub cache
    model = build()
    if pretrained:
        model.load_state_dict(torch.hub.load_state_dict_from_url(
            "http://127.0.0.1:9/resnet34_svhn.pth", map_location="cpu", file_name="resnet34_svhn.pth"))
    return model
'''
FAKE_NET = '''
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
'''


def test_svhn_is_scored_by_resnet34_svhn_where_detectors_and_its_weights_are_there(course_setup, tmp_path):
    """A stand-in `detectors` package registers a small "resnet34_svhn" with timm and loads its weights from torch's
    hub cache, as the real one does; the course's preprocessing and argmax must then score SVHN with it."""
    out, reference, classifier, evaluator = course_setup
    package = tmp_path / "site" / "detectors"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_DETECTORS)
    (package / "net.py").write_text(FAKE_NET)
    spec = importlib.util.spec_from_file_location("svhn_net", package / "net.py")  # registers nothing here
    net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net)
    torch.manual_seed(1)
    svhn_net = net.build()
    (tmp_path / "torch_home" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(svhn_net.state_dict(), tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet34_svhn.pth")
    env = {**os.environ, "PYTHONPATH": str(package.parent), "TORCH_HOME": str(tmp_path / "torch_home"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "p1_eval.py", "--device", "cpu", "score", str(out),
                             "--course-classifier", str(classifier), "--evaluator", str(tmp_path / "absent")],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    mnistm = course_evaluate(reference, out / "mnistm")
    svhn = course_evaluate(svhn_net, out / "svhn")
    assert len({p for p, _ in svhn[2].values()}) >= 3, "the stand-in's predictions do not vary"
    assert result.stdout.strip().splitlines() == [
        "SVHN: scored by the course's resnet34_svhn (timm, registered by the detectors package)",
        course_line("MNIST-M", *mnistm[:2]), course_line("SVHN", *svhn[:2]),
        f'acc = {((mnistm[0]/mnistm[1] + svhn[0]/svhn[1]) / 2):.4f}']


@pytest.mark.parametrize("case", ["missing", "wrong_key", "wrong_shapes", "not_a_state_dict"])
def test_a_bad_classifier_file_is_one_line_and_a_nonzero_exit(course_setup, tmp_path, case, capsys):
    out, reference, _, evaluator = course_setup
    path = tmp_path / "bad.pth"
    if case == "wrong_key":
        torch.save({"model": reference.state_dict()}, path)
    elif case == "wrong_shapes":
        torch.save({"state_dict": nn.Linear(3, 4).state_dict()}, path)
    elif case == "not_a_state_dict":
        torch.save(torch.zeros(3), path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(p1_eval.main, ["--device", "cpu", "score", str(out), "--course-classifier", str(path),
                               "--evaluator", str(evaluator)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.out == ""
    assert captured.err.count("\n") == 1 and str(path) in captured.err, captured.err
    expected = {"missing": "file not found", "wrong_key": "it holds keys ['model']", "wrong_shapes": "Missing key",
                "not_a_state_dict": "it holds Tensor"}[case]
    assert expected in captured.err, captured.err


def test_without_resnet34_svhn_or_an_evaluator_it_says_what_to_do(course_setup, tmp_path, monkeypatch):
    out, _, classifier, _ = course_setup
    monkeypatch.setitem(sys.modules, "detectors", None)
    with pytest.raises(p1_eval.Hw2Error, match="SVHN needs the course's resnet34_svhn.*python p1_eval.py train"):
        p1_eval.main(["--device", "cpu", "score", str(out), "--course-classifier", str(classifier), "--evaluator",
                      str(tmp_path / "absent.safetensors")])


def test_a_file_name_without_its_digit_is_refused(course_setup):
    out, _, classifier, _ = course_setup
    (out / "mnistm" / "notes.txt").write_text("x")
    with pytest.raises(p1_eval.Hw2Error, match="notes.txt: the file name must start with its digit"):
        p1_course_classifier.course_predictions(p1_course_classifier.load_course_classifier(classifier),
                                                out / "mnistm", torch.device("cpu"))
