"""P1 evaluator: digit classifiers that score generated MNIST-M / SVHN folders.

    python p1_eval.py train                        # hw2_data/digits -> checkpoints/p1/evaluator.safetensors
    python p1_eval.py score OUT_DIR                # OUT_DIR/mnistm, OUT_DIR/svhn from p1_inference.py
    python p1_eval.py score OUT_DIR --lenet Classifier.pth   # also the course's MNIST-M LeNet

`train` fits one small CNN on the train.csv images of both datasets and reports its accuracy on each dataset's
held-out val.csv; a set without val.csv is validated on a fixed 10% of its train.csv, left out of training (see
p1_data.py). One classifier serves both sets: the digit shapes are shared, and each set's images teach it more
about the other's digits.
`score` reads every file of OUT_DIR/<dataset>/ as an image, takes the label from the file name's first
character (as the grader does) and prints `MNIST-M acc = ...`, `SVHN acc = ...`, `acc = <mean>`.
"""

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from p1_data import load_split, to_model_range
from p1_model import DATASETS, NUM_DIGITS
from p1_train import DEFAULT_DATA, DEFAULT_OUT
from utils import (
    Hw2Error,
    announce_toy_world,
    get_device,
    load_checkpoint,
    load_rgb,
    load_torch_file,
    run_cli,
    save_checkpoint,
    seed_everything,
)

EVALUATOR_NAME = "evaluator.safetensors"
DISPLAY = {"mnistm": "MNIST-M", "svhn": "SVHN"}
TTA_SHIFTS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]


@dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple = (16, 32)
    hidden: int = 128


class DigitClassifier(nn.Module):
    """Two conv-conv-pool stages (28 -> 14 -> 7) and a two-layer head; inputs in [-1, 1]."""

    def __init__(self, config):
        super().__init__()
        layers, ch = [], 3
        for width in config.widths:
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            ch = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(ch * 7 * 7, config.hidden), nn.ReLU(),
                                  nn.Linear(config.hidden, NUM_DIGITS))

    def forward(self, x):
        return self.head(self.features(x))


class LeNet(nn.Module):
    """The course's MNIST-M classifier (Classifier.pth): inputs 28x28, normalised with mean = std = 0.5."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 6, 12, 12]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 16, 4, 4]
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def shift(x, dy, dx):
    """Translate images [N, C, H, W] by (dy, dx) pixels, repeating the edge pixels into the gap."""
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, [pad] * 4, mode="replicate")
    return padded[:, :, pad - dy:pad - dy + x.shape[2], pad - dx:pad - dx + x.shape[3]]


def random_shift(x, generator, max_shift=2):
    """One random translation of up to `max_shift` pixels per batch: generated digits are not centred exactly."""
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    return shift(x, dy, dx)


@torch.no_grad()
def predict(model, images, batch_size=500):
    """Argmax digits of float images [N, 3, 28, 28], averaging the softmax over the image and its four
    one-pixel shifts (test-time augmentation: +0.5 to 1 point on the toy val sets)."""
    model.eval()
    predictions = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        probs = sum(F.softmax(model(shift(x, dy, dx)), dim=1) for dy, dx in TTA_SHIFTS)
        predictions.append(probs.argmax(1))
    return torch.cat(predictions)


def accuracy(predictions, labels):
    correct = int((predictions.cpu() == labels.cpu()).sum())
    return correct / max(1, len(labels)), correct, len(labels)


def fit_classifier(images, labels, epochs, seed, device, desc, make_model=lambda: DigitClassifier(ClassifierConfig())):
    """Adam + one-cycle schedule, batch 128, random shifts; images in [-1, 1]; the model from `make_model()`."""
    seed_everything(seed)
    model = make_model().to(device)
    steps = epochs * (len(images) // 128 + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=desc):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), 128):
            idx = order[i:i + 128]
            x = random_shift(images[idx], generator).to(device)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def train_command(args, device):
    announce_toy_world(args.data)
    cache = Path(args.out) / "cache"  # the decoded images, shared with p1_train.py's
    train_images, train_digits, _ = load_split(args.data, "train", cache_dir=cache, exclude_val=True)
    val_images, val_digits, val_sets = load_split(args.data, "val", cache_dir=cache)
    model = fit_classifier(to_model_range(train_images), train_digits, args.epochs, args.seed, device,
                           "training the digit classifier")
    predictions = predict(model, to_model_range(val_images).to(device))
    state = {"config": asdict(ClassifierConfig()), "model": model.state_dict(), "val_acc": {}}
    for d, name in enumerate(DATASETS):
        acc, correct, total = accuracy(predictions[val_sets == d], val_digits[val_sets == d])
        print(f"{DISPLAY[name]}: held-out val acc = {acc:.4f} (correct/total = {correct}/{total})")
        state["val_acc"][name] = acc
    path = Path(args.out) / EVALUATOR_NAME
    save_checkpoint(path, state)
    print(f"Saved the evaluator to {path}")


def load_evaluator(path, device):
    state = load_checkpoint(path)
    try:
        model = DigitClassifier(ClassifierConfig(**{**state["config"], "widths": tuple(state["config"]["widths"])}))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise Hw2Error(f"{path} is not a P1 evaluator checkpoint ({str(err).splitlines()[0]}): run "
                       f"`python p1_eval.py train`") from err
    return model.to(device).eval()


def load_lenet(path):
    """The course's LeNet from a torch file holding {"state_dict": ...} (loaded with weights_only=True)."""
    checkpoint = load_torch_file(path)
    model = LeNet()
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise Hw2Error(f"{path} is not the course's LeNet classifier (a state_dict of conv1/conv2/fc1-fc3 under "
                       f"the key 'state_dict'): {str(err).splitlines()[0]}") from err
    return model.eval()


def read_generated(folder):
    """Every file of `folder` as a float image in [-1, 1] resized to 28x28, and the digit its name starts with."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Hw2Error(f"{folder} not found: OUT_DIR must hold mnistm/ and svhn/ (from p1_inference.py)")
    images, labels = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if not path.name[0].isdigit():
            raise Hw2Error(f"{path}: the file name must start with its digit label (e.g. 3_017.png)")
        image = load_rgb(path)
        if image.size != (28, 28):
            image = image.resize((28, 28), resample=3)
        images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(28, 28, 3))
        labels.append(int(path.name[0]))
    if not images:
        raise Hw2Error(f"{folder} holds no images")
    return to_model_range(torch.stack(images).permute(0, 3, 1, 2)), torch.tensor(labels)


def score_command(args, device):
    evaluator = Path(args.evaluator)
    model = load_evaluator(evaluator, device)
    lenet = load_lenet(args.lenet).to(device) if args.lenet else None
    accs = []
    for name in DATASETS:
        images, labels = read_generated(Path(args.out_dir) / name)
        acc, correct, total = accuracy(predict(model, images.to(device)), labels)
        accs.append(acc)
        print(f"{DISPLAY[name]} acc = {acc:.4f} (correct/total = {correct}/{total})")
        if name == "mnistm" and lenet is not None:
            # the same [-1, 1] images are what LeNet's (x - 0.5) / 0.5 normalisation of [0, 1] inputs gives
            acc, correct, total = accuracy(predict(lenet, images.to(device)), labels)
            print(f"MNIST-M acc (course LeNet) = {acc:.4f} (correct/total = {correct}/{total})")
    print(f"acc = {sum(accs) / len(accs):.4f}")
    return accs


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = get_device(args.device)
    if args.command == "train":
        if args.epochs < 1:
            raise Hw2Error(f"--epochs must be >= 1, got {args.epochs}")
        train_command(args, device)
    else:
        score_command(args, device)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps; default: the best.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Fit the digit classifier on the labelled images of both sets.")
    train.add_argument("--data", type=str, default=DEFAULT_DATA, help="Folder holding mnistm/ and svhn/.")
    train.add_argument("--out", type=str, default=DEFAULT_OUT,
                       help=f"Folder for {EVALUATOR_NAME} (beside the P1 diffusion checkpoints).")
    train.add_argument("--epochs", type=int, default=15, help="Training epochs of the classifier.")
    train.add_argument("--seed", type=int, default=0, help="Seed for initialisation, data order and shifts.")
    score = commands.add_parser("score", help="Score a folder written by p1_inference.py.")
    score.add_argument("out_dir", type=str, help="Folder holding mnistm/ and svhn/ of generated images.")
    score.add_argument("--evaluator", type=str, default=str(Path(DEFAULT_OUT) / EVALUATOR_NAME),
                       help="Evaluator checkpoint written by `p1_eval.py train`.")
    score.add_argument("--lenet", type=str, default=None,
                       help="The course's MNIST-M LeNet file (state_dict under 'state_dict'); also scores with it.")
    return parser


if __name__ == "__main__":
    run_cli(main)
