"""P1 evaluator: digit classifiers that score generated MNIST-M / SVHN folders.

    python p1_eval.py train                        # hw2_data/digits -> checkpoints/p1/evaluator.safetensors
    python p1_eval.py score OUT_DIR                # OUT_DIR/mnistm, OUT_DIR/svhn from p1_inference.py
    python p1_eval.py score OUT_DIR --course-classifier Classifier.pth   # the course's own grader, reproduced

`train` fits one small CNN on the train.csv images of both datasets and reports its accuracy on each dataset's
held-out val.csv; a set without val.csv is validated on a fixed 10% of its train.csv, left out of training (see
p1_data.py). One classifier serves both sets: the digit shapes are shared, and each set's images teach it more
about the other's digits.
`score` reads every file of OUT_DIR/<dataset>/ as an image, takes the label from the file name's first
character (as the grader does), takes one argmax per image (as the grader does; `--tta` averages the softmax over
five shifted copies instead) and prints `MNIST-M acc = ...`, `SVHN acc = ...`, `acc = <mean>`, then per set the
FD_eval: the Fréchet distance between the generated and the real val images in the evaluator's penultimate
features, beside the same distance between two halves of the real images (the floor: what a perfect generator
would score with as many images). Accuracy alone rewards a model that draws one perfect digit every time; FD_eval
grows when the images lose the real data's variety. With
`--course-classifier`, MNIST-M is scored exactly as the course's digit_classifier.py does, and SVHN by its
resnet34_svhn where that loads offline (see p1_course_classifier.py).
"""

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from p1_course_classifier import course_predictions, labelled_files, load_course_classifier, resnet34_svhn
from p1_data import load_split, to_model_range
from p1_model import DATASETS, NUM_DIGITS
from p1_train import DEFAULT_DATA, DEFAULT_OUT
from utils import (
    Hw2Error,
    announce_toy_world,
    get_device,
    load_checkpoint,
    load_rgb,
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
def penultimate_features(model, images, batch_size=500):
    """The evaluator's penultimate activations (the hidden layer after its ReLU) of images [N, 3, 28, 28], float64."""
    model.eval()
    return torch.cat([model.head[:-1](model.features(images[i:i + batch_size])).double()
                      for i in range(0, len(images), batch_size)])


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (Heusel et al. 2017, the FID formula):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with sample covariances (N - 1 in the denominator).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2): symmetric,
    with the spectrum of S_a S_b, so a symmetric eigensolver serves even where dead ReLU units make S singular."""
    a, b = features_a.double(), features_b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    root_a = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def real_halves(model, data, device, seed=0):
    """Per dataset, the penultimate features of its real val images split in two random halves (reference, other):
    FD_eval compares generated images with the reference half, the floor the other half with it."""
    images, _, dataset_ids = load_split(data, "val")
    halves = []
    for d in range(len(DATASETS)):
        features = penultimate_features(model, to_model_range(images[dataset_ids == d]).to(device))
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
        halves.append((features[order[:len(order) // 2]], features[order[len(order) // 2:]]))
    return halves


def fd_eval(model, generated, halves):
    """(FD_eval, floor) of generated images [N, 3, 28, 28] against one dataset's `real_halves` entry; the floor uses
    as many real images as there are generated ones (up to the half's size): FD's bias grows as N shrinks."""
    reference, other = halves
    features = penultimate_features(model, generated)
    return frechet_distance(features, reference), frechet_distance(other[:len(features)], reference)


@torch.no_grad()
def predict(model, images, batch_size=500, tta=False):
    """Argmax digits of float images [N, 3, 28, 28]: one plain argmax per image, as the course's grader takes;
    with `tta`, of the softmax averaged over the image and its four one-pixel shifts (test-time augmentation)."""
    model.eval()
    predictions = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        if tta:
            predictions.append(sum(F.softmax(model(shift(x, dy, dx)), dim=1) for dy, dx in TTA_SHIFTS).argmax(1))
        else:
            predictions.append(model(x).argmax(1))
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
    train_images, train_digits, _ = load_split(args.data, "train", args.limit, cache_dir=cache, exclude_val=True)
    val_images, val_digits, val_sets = load_split(args.data, "val", cache_dir=cache)
    model = fit_classifier(to_model_range(train_images), train_digits, args.epochs, args.seed, device,
                           "training the digit classifier")
    val_images = to_model_range(val_images).to(device)
    predictions, with_tta = predict(model, val_images), predict(model, val_images, tta=True)
    state = {"config": asdict(ClassifierConfig()), "model": model.state_dict(), "val_acc": {}}
    for d, name in enumerate(DATASETS):
        acc, correct, total = accuracy(predictions[val_sets == d], val_digits[val_sets == d])
        tta_acc, tta_correct, _ = accuracy(with_tta[val_sets == d], val_digits[val_sets == d])
        print(f"{DISPLAY[name]}: held-out val acc = {acc:.4f} (correct/total = {correct}/{total}); with --tta "
              f"{tta_acc:.4f} ({tta_correct}/{total})")
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


def read_generated(folder):
    """Every file of `folder` as a float image in [-1, 1] resized to 28x28, and the digit its name starts with."""
    files, labels = labelled_files(folder)
    images = []
    for path in files:
        image = load_rgb(path)
        if image.size != (28, 28):
            image = image.resize((28, 28), resample=3)
        images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(28, 28, 3))
    return to_model_range(torch.stack(images).permute(0, 3, 1, 2)), labels


def evaluator_counts(model, folder, device, tta):
    """(correct, total) of our evaluator on the generated images of `folder`."""
    images, labels = read_generated(folder)
    return accuracy(predict(model, images.to(device), tta=tta), labels)[1:]


def course_counts(args, device):
    """(correct, total) per dataset as the course's digit_classifier.py counts them: MNIST-M by Classifier.pth,
    SVHN by resnet34_svhn where it loads offline, else by our evaluator; one line says which scored SVHN."""
    classifier = load_course_classifier(args.course_classifier)
    svhn_model, why_not = resnet34_svhn()
    if svhn_model is None:
        if not Path(args.evaluator).is_file():
            raise Hw2Error(f"SVHN needs the course's resnet34_svhn, but {why_not}, or our evaluator, but "
                           f"{args.evaluator} does not exist: train it with `python p1_eval.py train`, or see "
                           f"docs/p1.md for resnet34_svhn")
        evaluator = load_evaluator(args.evaluator, device)
        print(f"SVHN: scored by our evaluator {args.evaluator}{' with --tta' if args.tta else ''}, not the course's "
              f"resnet34_svhn: {why_not}")
    else:
        print("SVHN: scored by the course's resnet34_svhn (timm, registered by the detectors package)")
    out = Path(args.out_dir)
    _, predicted, labels = course_predictions(classifier, out / "mnistm", device)
    counts = [accuracy(predicted, labels)[1:]]
    if svhn_model is None:
        counts.append(evaluator_counts(evaluator, out / "svhn", device, args.tta))
    else:
        _, predicted, labels = course_predictions(svhn_model, out / "svhn", device)
        counts.append(accuracy(predicted, labels)[1:])
    return counts


def score_command(args, device):
    """Print each dataset's accuracy and their mean in the grader's three lines, then FD_eval per dataset (not with
    --course-classifier); return the two accuracies."""
    if args.data is not None and not Path(args.data).is_dir():
        raise Hw2Error(f"--data {args.data} is not a folder: pass the digits folder whose val images FD_eval compares "
                       f"with (hw2_data/digits)")
    if args.course_classifier:
        counts = course_counts(args, device)
    else:
        model = load_evaluator(Path(args.evaluator), device)
        generated = [read_generated(Path(args.out_dir) / name) for name in DATASETS]
        counts = [accuracy(predict(model, images.to(device), tta=args.tta), labels)[1:] for images, labels in generated]
    for name, (correct, total) in zip(DATASETS, counts):
        print(f"{DISPLAY[name]} acc = {correct / total:.4f} (correct/total = {correct}/{total})")
    accs = [correct / total for correct, total in counts]
    print(f"acc = {sum(accs) / len(accs):.4f}")
    if not args.course_classifier:
        print_fd_eval(model, [images for images, _ in generated], args.data, device)
    return accs


def print_fd_eval(model, generated, data, device):
    """One FD_eval line per dataset (see `fd_eval`); without --data and without the default data, one line why not."""
    if data is None and not Path(DEFAULT_DATA).is_dir():
        print(f"FD_eval: skipped, no real images in {DEFAULT_DATA}: pass --data")
        return
    halves = real_halves(model, data or DEFAULT_DATA, device)
    for name, images, half in zip(DATASETS, generated, halves):
        fd, floor = fd_eval(model, images.to(device), half)
        print(f"{DISPLAY[name]} FD_eval = {fd:.2f} ({len(images)} generated vs {len(half[0])} real val images; "
              f"two real halves with as many images: {floor:.2f})")


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
    train.add_argument("--limit", type=int, default=0,
                       help="Train on only the first N training images of each dataset (0 = all); for smoke tests.")
    score = commands.add_parser("score", help="Score a folder written by p1_inference.py.")
    score.add_argument("out_dir", type=str, help="Folder holding mnistm/ and svhn/ of generated images.")
    score.add_argument("--evaluator", type=str, default=str(Path(DEFAULT_OUT) / EVALUATOR_NAME),
                       help="Evaluator checkpoint written by `p1_eval.py train`.")
    score.add_argument("--data", type=str, default=None,
                       help=f"Folder holding mnistm/ and svhn/ whose val images FD_eval compares with; default: "
                            f"{DEFAULT_DATA} (FD_eval is skipped if it does not exist). Not used with "
                            f"--course-classifier.")
    score.add_argument("--course-classifier", type=str, default=None,
                       help="The course's MNIST-M Classifier.pth: score as its digit_classifier.py does (MNIST-M by "
                            "this file, SVHN by timm's resnet34_svhn where it loads offline, else by --evaluator).")
    score.add_argument("--tta", action="store_true",
                       help="Our evaluator only: average the softmax over each image and its four one-pixel shifts "
                            "instead of one plain argmax (the course's grader takes the plain argmax).")
    return parser


if __name__ == "__main__":
    run_cli(main)
