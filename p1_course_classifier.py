"""The course's P1 grader, `digit_classifier.py`, reproduced: MNIST-M by its classifier (Classifier.pth), SVHN by
timm's `resnet34_svhn`.

    python p1_eval.py score OUT_DIR --course-classifier Classifier.pth

Every convention here is the course's `digit_classifier.py` (DLCV Fall 2024 hw2; the Fall 2023 one scores one
MNIST-M folder with the same classifier, preprocessing and batch size):
- each file of OUT_DIR/<dataset>/ is one image, opened with PIL and converted to RGB; its label is the first
  character of its file name;
- `transforms.Compose([Resize((28, 28)), ToTensor(), Normalize([0.5] * 3, [0.5] * 3)])`, batches of 32;
- one plain argmax (`torch.max(output, 1)`) per image, no test-time augmentation;
- MNIST-M: `class Classifier` (conv 3->6 5x5, 2x2 max-pool, conv 6->16 5x5, pool, fc 256->128->64->10, ReLU between),
  whose weights are `torch.load(Classifier.pth)['state_dict']` (read here with weights_only=True);
- SVHN: `timm.create_model("resnet34_svhn", pretrained=True, num_classes=10)`, a model the `detectors` package
  registers with timm, its weights fetched once into torch's hub cache; the same transform;
- the lines `MNIST-M acc = 0.xxxx (correct/total = c/t)`, `SVHN acc = ...`, `acc = <mean of the two>`.
"""

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from utils import Hw2Error, load_rgb, load_torch_file

COURSE_BATCH_SIZE = 32
COURSE_TRANSFORM = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor(),
                                       transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])
SVHN_MODEL = "resnet34_svhn"
SVHN_WEIGHTS = f"{SVHN_MODEL}.pth"  # the file name detectors gives it in torch.hub.get_dir()/checkpoints/


class CourseClassifier(nn.Module):
    """The course's MNIST-M classifier, `Classifier` in digit_classifier.py: same layers, same state_dict keys."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))  # [B, 6, 12, 12]
        x = self.pool(F.relu(self.conv2(x)))  # [B, 16, 4, 4]
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


def load_course_classifier(path):
    """The course's classifier from a torch file holding {"state_dict": ...}, read with weights_only=True."""
    checkpoint = load_torch_file(path)
    what = f"{path} is not the course's MNIST-M Classifier.pth (a state_dict of conv1, conv2, fc1-fc3 under the key " \
           f"'state_dict')"
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        found = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, dict) else None
        raise Hw2Error(f"{what}: it holds {f'keys {found}' if found is not None else type(checkpoint).__name__}")
    model = CourseClassifier()
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise Hw2Error(f"{what}: {' '.join(str(err).split())[:300]}") from err
    return model.eval()


def resnet34_svhn():
    """The course's SVHN classifier if it loads without the network, else None; and a phrase saying why not."""
    try:
        importlib.import_module("detectors")  # registers resnet34_svhn with timm
        import timm
    except Exception as err:  # a missing package, or one that breaks on import with these versions
        return None, f"the detectors package does not import ({type(err).__name__}: {err})"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / SVHN_WEIGHTS
    if not weights.is_file():
        return None, f"its weights are not in {weights.parent}"
    try:
        model = timm.create_model(SVHN_MODEL, pretrained=True, num_classes=10)
    except Exception as err:  # timm and detectors raise many kinds; the fallback reports which
        return None, f"it does not load ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''})"
    return model.eval(), ""


def labelled_files(folder):
    """Every file of `folder`, sorted, with the digit its name starts with (digit_classifier.py's label)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Hw2Error(f"{folder} not found: OUT_DIR must hold mnistm/ and svhn/ (from p1_inference.py)")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise Hw2Error(f"{folder} holds no images")
    for path in files:
        if not path.name[0].isdigit():
            raise Hw2Error(f"{path}: the file name must start with its digit label (e.g. 3_017.png)")
    return files, torch.tensor([int(p.name[0]) for p in files])


@torch.no_grad()
def course_logits(model, files, device):
    """The model's outputs [N, 10] on `files`, preprocessed and batched as digit_classifier.py does."""
    model.to(device).eval()
    outputs = []
    for i in range(0, len(files), COURSE_BATCH_SIZE):
        batch = torch.stack([COURSE_TRANSFORM(load_rgb(path)) for path in files[i:i + COURSE_BATCH_SIZE]])
        outputs.append(model(batch.to(device)).float().cpu())
    return torch.cat(outputs)


def course_predictions(model, folder, device):
    """(files, predicted digits, labels) of `folder`: one plain argmax per image, as the course's grader takes."""
    files, labels = labelled_files(folder)
    return files, torch.max(course_logits(model, files, device), 1)[1], labels
