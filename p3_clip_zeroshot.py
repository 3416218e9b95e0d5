"""P3: CLIP zero-shot classification of `clip_zeroshot/val` with open_clip (Radford et al. 2021, sec. 3.1.2).

    python p3_clip_zeroshot.py --data hw2_data/clip_zeroshot --model ViT-B-32 --pretrained openai \\
        --prompts single --out outputs/p3_clip_zeroshot

Each class name becomes prompts ("a photo of a willow tree."); open_clip's `build_zero_shot_classifier` turns them
into one unit vector per class (the mean over templates, re-normalised: CLIP's prompt ensembling), stacked into a
[D, C] classifier. Every image is encoded once; its class is the argmax of the cosine similarities, which the model's
own learned logit scale (100 for CLIP's released weights) turns into softmax confidences. Everything runs in fp32
unless --autocast is given: half precision is faster on a GPU but can flip near ties among the classes.

Writes to --out: `predictions.csv` (image, label, prediction, score, top5), `cases.png` (successes and failures
with truth, prediction and confidence) and `metrics.json` (accuracies, per-class accuracy, settings).
On a toy world (`toy_data.py`) the default model is its tiny random-weight CLIP, so accuracy there is at chance.
"""

import argparse
import csv
import io
import json
import os
import re
import string
from collections import Counter
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from p3_clip_models import DEFAULT_MODEL, DEFAULT_PRETRAINED, activation, load_clip, resolve_model
from utils import (
    Hw2Error,
    amp_dtype,
    announce_toy_world,
    atomic_write_text,
    autocast,
    get_device,
    load_rgb,
    run_cli,
    save_pil,
    seed_everything,
)

TOP_K = 5
IMAGE_NAME = re.compile(r"(\d+)_(\d+)\.png")  # val/{class_id}_{idx}.png
SINGLE_TEMPLATES = ("a photo of a {}.",)
# The 18 CIFAR-100 templates CLIP's zero-shot results used (openai/CLIP data/prompts.md, "CIFAR100").
# open_clip ships only ImageNet template lists (zero_shot_metadata), so the CIFAR-100 list lives here.
CIFAR100_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
CELL = 160  # side of one enlarged image in cases.png
FONT_SIZE = 13
GREEN, RED, GREY = (0, 120, 0), (190, 0, 0), (60, 60, 60)


# ------------------------------------------------------------------------------------------- data


def clean_class_name(name):
    """A label as a prompt word: `willow_tree` -> `willow tree`."""
    return " ".join(name.replace("_", " ").split())


def read_id2label(folder):
    """{class_id: label} from `folder/id2label.json`, class ids as ints, in numeric order."""
    path = Path(folder) / "id2label.json"
    if not path.is_file():
        raise Hw2Error(f"{path} not found: --data must be the clip_zeroshot folder holding id2label.json and val/")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        id2label = {int(class_id): str(label) for class_id, label in raw.items()}
    except (ValueError, AttributeError) as err:
        raise Hw2Error(f"{path} must be a JSON object mapping class ids to names, like {{\"0\": \"apple\"}} "
                       f"({err})") from err
    if not id2label:
        raise Hw2Error(f"{path} lists no classes")
    return dict(sorted(id2label.items()))


def list_images(folder, id2label):
    """The `val/{class_id}_{idx}.png` paths and their class ids, sorted by class id then idx (numerically)."""
    val = Path(folder) / "val"
    if not val.is_dir():
        raise Hw2Error(f"{val} not found: --data must be the clip_zeroshot folder holding id2label.json and val/")
    entries = []
    for path in val.glob("*.png"):
        match = IMAGE_NAME.fullmatch(path.name)
        if match is None:
            raise Hw2Error(f"{path} is not named {{class_id}}_{{idx}}.png: rename or remove it")
        class_id, idx = int(match[1]), int(match[2])
        if class_id not in id2label:
            raise Hw2Error(f"{path} has class id {class_id}, which {Path(folder) / 'id2label.json'} does not list")
        entries.append((class_id, idx, path))
    if not entries:
        raise Hw2Error(f"{val} holds no .png images")
    entries.sort(key=lambda entry: entry[:2])
    return [path for _, _, path in entries], [class_id for class_id, _, _ in entries]


def load_templates(spec):
    """Prompt templates: `single`, `ensemble` (CLIP's 18 CIFAR-100 templates) or a file, one template per line."""
    if spec == "single":
        return list(SINGLE_TEMPLATES)
    if spec == "ensemble":
        return list(CIFAR100_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise Hw2Error(f"--prompts {spec!r} is not 'single', 'ensemble' or an existing file of templates")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise Hw2Error(f"cannot read the --prompts file {path}: {err}") from err
    templates = []
    for number, line in enumerate(lines, start=1):
        template = line.strip()
        if not template:
            continue
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError:  # an unmatched brace
            fields = None
        if fields != [""]:
            raise Hw2Error(f"{path} line {number} ({template!r}) must contain one {{}} for the class name "
                           f"and no other braces")
        templates.append(template)
    if not templates:
        raise Hw2Error(f"{path} holds no templates: write one per line, e.g. 'a photo of a {{}}.'")
    return templates


class ImageFiles(Dataset):
    """Preprocessed images in file order. A file that cannot be read comes back as its error message, because an
    exception raised in a DataLoader worker would reach the user as a traceback instead of one line."""

    def __init__(self, paths, preprocess):
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return self.preprocess(load_rgb(self.paths[index]))
        except Hw2Error as err:
            return str(err)


def collate_images(items):
    """Stack a batch of image tensors, or pass on the first error message in it."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)


def make_loader(paths, preprocess, batch_size, workers, device):
    return DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_images, pin_memory=torch.device(device).type == "cuda")


# ----------------------------------------------------------------------------------- zero-shot math


def logit_scale(model):
    """CLIP's learned temperature exp(t): 100 for OpenAI's and LAION's weights (trained up to its clamp)."""
    return model.logit_scale.detach().exp().item()


def precision_name(device, use_autocast):
    """What the encoders compute in: float32, or autocast's half type where `use_autocast` applies on `device`."""
    return str((amp_dtype(device) if use_autocast else None) or torch.float32).removeprefix("torch.")


def zero_shot_logits(image_features, classifier, scale):
    """`scale` x the cosine similarity of each image to each class: [N, D] x [D, C] -> [N, C]."""
    return scale * F.normalize(image_features.float(), dim=-1) @ classifier


def build_classifier(model, tokenizer, classnames, templates, device, batch_size, use_autocast=False):
    """The [D, C] classifier, by open_clip's own `build_zero_shot_classifier` (per class the mean of its templates'
    unit text features, normalised again), about `batch_size` prompts per forward pass; fp32 unless `use_autocast`."""
    with autocast(device, enabled=use_autocast):
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, classnames, templates, num_classes_per_batch=max(1, batch_size // len(templates)),
            device=device, use_tqdm=True)
    return classifier.float()


def classify(model, batches, classifier, device, k, scale, use_autocast=False):
    """Top-k softmax probabilities and class indices ([N, k] each, on the CPU) of every image, in order."""
    top_probs, top_classes = [], []
    for pixels in tqdm(batches, desc="images", unit="batch"):
        if isinstance(pixels, str):
            raise Hw2Error(pixels)
        with torch.inference_mode(), autocast(device, enabled=use_autocast):
            features = model.encode_image(pixels.to(device, non_blocking=True))
        probs, classes = zero_shot_logits(features, classifier, scale).softmax(dim=-1).topk(k, dim=-1)
        top_probs.append(probs.cpu())
        top_classes.append(classes.cpu())
    return torch.cat(top_probs), torch.cat(top_classes)


def per_class_rows(predictions, labels, classnames):
    """Per class with images: (name, correct, total, most frequent wrong prediction or None), worst first."""
    rows = []
    for c, name in enumerate(classnames):
        mask = labels == c
        if not mask.any():
            continue
        wrong = Counter(predictions[mask & (predictions != c)].tolist()).most_common(1)
        confusion = (classnames[wrong[0][0]], wrong[0][1]) if wrong else None
        rows.append((name, int((predictions[mask] == c).sum()), int(mask.sum()), confusion))
    return sorted(rows, key=lambda row: (row[1] / row[2], row[0]))


def choose_cases(correct, count, seed):
    """`count` successes and `count` failures drawn with `seed` (fewer if there are fewer), each in file order."""
    order = torch.randperm(len(correct), generator=torch.Generator().manual_seed(seed))
    successes = sorted(order[correct[order]][:count].tolist())
    failures = sorted(order[~correct[order]][:count].tolist())
    return successes, failures


# ---------------------------------------------------------------------------------------- outputs


def predictions_csv(paths, labels, top_probs, top_classes, names):
    """CSV text: image, label, prediction, score (softmax probability of the prediction), top5 (names, `|`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "label", "prediction", "score", "top5"])
    for path, label, probs, classes in zip(paths, labels.tolist(), top_probs.tolist(), top_classes.tolist()):
        writer.writerow([Path(path).name, names[label], names[classes[0]], f"{probs[0]:.4f}",
                         "|".join(names[c] for c in classes)])
    return buffer.getvalue()


def fit_text(draw, text, font, width):
    """`text`, cut with an ellipsis so that it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_cases(rows, count):
    """One figure: per row a title and up to `count` enlarged images, each with truth, prediction, confidence.

    `rows` is a list of (title, colour, [(image, truth, prediction, confidence)]).
    """
    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 4
    pad = 8
    row_height = line + CELL + 3 * line + pad
    figure = Image.new("RGB", (pad + count * (CELL + pad), pad + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(figure)
    for r, (title, colour, cases) in enumerate(rows):
        top = pad + r * row_height
        draw.text((pad, top), title, fill=GREY, font=font)
        for i, (image, truth, prediction, confidence) in enumerate(cases):
            left = pad + i * (CELL + pad)
            figure.paste(image.resize((CELL, CELL), Image.BICUBIC), (left, top + line))
            captions = [(f"truth: {truth}", GREY), (f"pred: {prediction}", colour),
                        (f"confidence: {100 * confidence:.1f}%", GREY)]
            for j, (text, fill) in enumerate(captions):
                draw.text((left, top + line + CELL + 2 + j * line), fit_text(draw, text, font, CELL),
                          fill=fill, font=font)
    return figure


def cases_figure(paths, labels, predictions, confidences, names, successes, failures, count):
    """cases.png: the chosen successes (top row, prediction in green) and failures (bottom row, in red)."""
    rows = []
    for title, colour, chosen, pool in [("Successes", GREEN, successes, int((predictions == labels).sum())),
                                        ("Failures", RED, failures, int((predictions != labels).sum()))]:
        cases = [(load_rgb(paths[i]), names[labels[i]], names[predictions[i]], float(confidences[i])) for i in chosen]
        rows.append((f"{title}: {len(chosen)} shown of {pool}", colour, cases))
    return draw_cases(rows, count)


def print_results(correct, top5_correct, k, rows):
    """The report's accuracy line, the top-k accuracy and the per-class table (rows from `per_class_rows`)."""
    total = len(correct)
    print(f"Zero-shot accuracy: {100 * int(correct.sum()) / total:.2f}% ({int(correct.sum())}/{total})")
    print(f"Top-{k} accuracy: {100 * int(top5_correct.sum()) / total:.2f}% ({int(top5_correct.sum())}/{total})")
    width = max(len("class"), *(len(row[0]) for row in rows))
    print("Per-class accuracy, worst first:")
    print(f"  {'class':<{width}}  accuracy  correct/total  most often mistaken for")
    for class_name, right, count, confusion in rows:
        mistaken = f"{confusion[0]} ({confusion[1]})" if confusion else "-"
        print(f"  {class_name:<{width}}  {100 * right / count:7.1f}%  {f'{right}/{count}':>13}  {mistaken}")


# ------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag, value, minimum in [("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                                 ("--cases", args.cases, 1)]:
        if value < minimum:
            raise Hw2Error(f"{flag} must be at least {minimum}, got {value}")
    seed_everything(args.seed)
    device = get_device(args.device)
    toy = announce_toy_world(args.data)

    id2label = read_id2label(args.data)
    paths, class_ids = list_images(args.data, id2label)
    column = {class_id: c for c, class_id in enumerate(id2label)}  # class id -> classifier column
    labels = torch.tensor([column[class_id] for class_id in class_ids])
    names = list(id2label.values())
    templates = load_templates(args.prompts)
    name, pretrained, quick_gelu = resolve_model(args.model, args.pretrained, args.data, args.quick_gelu)

    model, preprocess, tokenizer = load_clip(name, pretrained, device, quick_gelu)
    precision = precision_name(device, args.autocast)
    scale = logit_scale(model)
    print(f"Model {name}, weights {pretrained or 'of its own'}, {activation(model)} activation, on {device} in "
          f"{precision}; logit scale {scale:.4g}; {len(names)} classes x {len(templates)} template(s); "
          f"{len(paths)} images.")
    if toy:
        print(f"The toy CLIP has random weights, so its accuracy is chance level (1/{len(names)} = "
              f"{100 / len(names):.1f}% on average; a random model often predicts one or two classes for "
              f"everything).")
    classifier = build_classifier(model, tokenizer, [clean_class_name(n) for n in names], templates, device,
                                  args.batch_size, args.autocast)
    loader = make_loader(paths, preprocess, args.batch_size, args.workers, device)
    top_probs, top_classes = classify(model, loader, classifier, device, min(TOP_K, len(names)), scale, args.autocast)

    predictions, confidences = top_classes[:, 0], top_probs[:, 0]
    correct = predictions == labels
    top5_correct = (top_classes == labels[:, None]).any(dim=1)
    rows = per_class_rows(predictions, labels, names)
    print_results(correct, top5_correct, top_classes.shape[1], rows)

    out = Path(args.out)
    atomic_write_text(out / "predictions.csv", predictions_csv(paths, labels, top_probs, top_classes, names))
    successes, failures = choose_cases(correct, args.cases, args.seed)
    figure = cases_figure(paths, labels, predictions, confidences, names, successes, failures, args.cases)
    save_pil(figure, out / "cases.png")
    metrics = {
        "accuracy": int(correct.sum()) / len(correct), "correct": int(correct.sum()), "total": len(correct),
        "top5_accuracy": int(top5_correct.sum()) / len(correct),
        "model": name, "pretrained": pretrained, "activation": activation(model), "precision": precision,
        "logit_scale": scale, "prompts": args.prompts,
        "templates": templates,
        "per_class_accuracy": {row[0]: row[1] / row[2] for row in rows},
        "cases": {"successes": [paths[i].name for i in successes], "failures": [paths[i].name for i in failures]},
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    print(f"Wrote {out / 'predictions.csv'}, {out / 'cases.png'} and {out / 'metrics.json'}.")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default="hw2_data/clip_zeroshot",
                        help="Folder with id2label.json and val/{class_id}_{idx}.png "
                             "(default: hw2_data/clip_zeroshot).")
    parser.add_argument("--model", type=str, default=None,
                        help=f"An open_clip model name (see open_clip.list_models()), the path of an open_clip "
                             f"config JSON, hf-hub:ORG/REPO or local-dir:FOLDER (default: {DEFAULT_MODEL}, or the "
                             f"toy world's tiny CLIP on a toy world).")
    parser.add_argument("--pretrained", type=str, default=None,
                        help=f"An open_clip pretrained tag of --model (e.g. openai, laion2b_s34b_b79k; downloaded "
                             f"once) or a local weights file, OpenAI's TorchScript ViT-B-32.pt included (default: "
                             f"{DEFAULT_PRETRAINED}, or the .safetensors file beside a config JSON).")
    parser.add_argument("--quick-gelu", action="store_true",
                        help="Build the model with QuickGELU, for a weights file trained with it such as OpenAI's "
                             "(a pretrained tag or a -quickgelu model name sets it already).")
    parser.add_argument("--prompts", type=str, default="single",
                        help="'single' ('a photo of a {}.'), 'ensemble' (CLIP's 18 CIFAR-100 templates) or a text "
                             "file with one template per line, each with {} for the class name (default: single).")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="Images (and prompts) per forward pass (default: 128).")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes that decode and preprocess images; 0 decodes in the "
                             "main process (default: the number of CPU cores, at most 8).")
    parser.add_argument("--device", type=str, default=None,
                        help="Device to run on, e.g. cpu, cuda, cuda:1 or mps (default: the best available).")
    parser.add_argument("--autocast", action="store_true",
                        help="Encode under bf16 autocast (fp16 on GPUs without native bf16): faster on a GPU, but "
                             "near ties among the classes can flip, so accuracy may move by a few images; no effect "
                             "on a CPU (default: fp32 everywhere).")
    parser.add_argument("--out", type=str, default="outputs/p3_clip_zeroshot",
                        help="Folder for predictions.csv, cases.png and metrics.json "
                             "(default: outputs/p3_clip_zeroshot).")
    parser.add_argument("--cases", type=int, default=5,
                        help="How many successes and how many failures cases.png shows (default: 5).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed for the choice of the cases shown in cases.png (default: 0).")
    return parser


if __name__ == "__main__":
    run_cli(main)
