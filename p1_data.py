"""P1 data: the MNIST-M and SVHN label files, their images decoded once into a shared uint8 cache, the val split.

    python -c "from p1_data import load_split; print(load_split('hw2_data/digits', 'val')[0].shape)"

Each set is `<digits>/<set>/train.csv` (header image_name,label) with the images in `<set>/data/`, and `val.csv`
where the archive has one. Without `val.csv`, the val split is a fixed 10% of `train.csv` (the same rows on every
run and machine), announced in one line; a classifier validated on it trains on the other 90%.

With a cache folder, the images are decoded once into `<cache>/<split>-<request>-<content>.npy` (uint8
[N, 3, 28, 28]), written atomically and memory-mapped by every reader, so DDP ranks share one copy in the page
cache instead of each decoding ~135k PNGs. `<content>` hashes the CSV rows and every listed file's size and
modification time: a changed CSV or image gives a new file, and the older one of the same request is removed.
"""

import csv
import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from p1_model import DATASETS, NUM_DIGITS
from utils import Hw2Error, atomic_path, load_rgb

IMAGE_SIZE = 28
HOLDOUT_FRACTION = 0.1  # of train.csv, standing in for a missing val.csv
HOLDOUT_SEED = 0  # fixed, not --seed: the held-out rows must not change between training and scoring


def read_labels(csv_path):
    """(image_name, digit) rows of a digits CSV (header image_name,label); any defect is an Hw2Error naming it."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise Hw2Error(f"label file not found: {csv_path} (expected digits/<dataset>/train.csv from hw2_download.sh)")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise Hw2Error(f"cannot read {csv_path}: {err}") from err
    if not rows or [c.strip() for c in rows[0]] != ["image_name", "label"]:
        raise Hw2Error(f"{csv_path} is malformed: its first line must be the header 'image_name,label'")
    labels = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip():
            raise Hw2Error(f"{csv_path} line {line} is malformed: expected 'image_name,label', got {','.join(row)!r}")
        name, label = row[0].strip(), row[1].strip()
        if not label.lstrip("-").isdigit() or not 0 <= int(label) < NUM_DIGITS:
            raise Hw2Error(f"{csv_path} line {line}: label {label!r} is not a digit 0..9")
        labels.append((name, int(label)))
    if not labels:
        raise Hw2Error(f"{csv_path} lists no images")
    return labels


def held_out(count):
    """Indices of the rows of a `count`-row train.csv that form the val split when val.csv is missing."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return set(order[:round(count * HOLDOUT_FRACTION)].tolist())


def split_rows(set_dir, split, exclude_val=False):
    """(image_name, digit) rows of one set's `split`: "train" is train.csv (without the held-out rows when
    `exclude_val` and val.csv is missing); "val" is val.csv, or the held-out 10% of train.csv."""
    set_dir = Path(set_dir)
    if split == "val" and (set_dir / "val.csv").is_file():
        return read_labels(set_dir / "val.csv")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rows = read_labels(set_dir / "train.csv")
    if (set_dir / "val.csv").is_file() or (split == "train" and not exclude_val):
        return rows
    val = held_out(len(rows))
    if split == "val":
        print(f"{set_dir.name}: no val.csv in {set_dir}, so the val split is a fixed {HOLDOUT_FRACTION:.0%} of "
              f"train.csv ({len(val)} of {len(rows)} images), not used for training the evaluator.")
    return [row for i, row in enumerate(rows) if (i in val) == (split == "val")]


def image_paths(data_root, split, limit, exclude_val):
    """Image paths, digits and dataset ids of both sets' `split`; a listed file that is missing is an error."""
    paths, digits, dataset_ids = [], [], []
    for dataset_id, name in enumerate(DATASETS):
        rows = split_rows(data_root / name, split, exclude_val)
        for file_name, digit in rows[:limit] if limit > 0 else rows:
            path = data_root / name / "data" / file_name
            if not path.is_file():
                raise Hw2Error(f"{data_root / name} lists {file_name} for its {split} split, but {path} does not "
                               f"exist")
            paths.append(path)
            digits.append(digit)
            dataset_ids.append(dataset_id)
    return paths, torch.tensor(digits), torch.tensor(dataset_ids)


def decode_into(paths, images):
    """Decode each image file into images[i] (uint8 [3, 28, 28]; other sizes are resized bicubically)."""
    for i, path in enumerate(tqdm(paths, desc="decoding images", leave=False)):
        image = load_rgb(path)
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), resample=3)  # 3 = bicubic
        images[i] = np.asarray(image).transpose(2, 0, 1)


def cache_file(cache_dir, data_root, split, limit, exclude_val, paths, digits):
    """The cache file for this request and content; a stale file of the same request is removed."""
    request = hashlib.sha256(f"{data_root.resolve()}|{split}|{limit}|{exclude_val}".encode()).hexdigest()[:8]
    content = hashlib.sha256()
    for path, digit in zip(paths, digits.tolist()):
        stat = path.stat()
        content.update(f"{path.relative_to(data_root)},{digit},{stat.st_size},{stat.st_mtime_ns}\n".encode())
    target = Path(cache_dir) / f"{split}-{request}-{content.hexdigest()[:16]}.npy"
    for stale in Path(cache_dir).glob(f"{split}-{request}-*.npy"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def cached_images(target, paths):
    """The memory-mapped uint8 [N, 3, 28, 28] array of `target`, decoding `paths` into it first if it is missing."""
    if target.is_file():
        try:
            images = np.load(target, mmap_mode="c")  # copy-on-write: writable for torch, never written back
            if images.shape == (len(paths), 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.uint8:
                return images
        except (OSError, ValueError):
            pass  # damaged: decode again below
    with atomic_path(target) as tmp:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                           shape=(len(paths), 3, IMAGE_SIZE, IMAGE_SIZE))
        decode_into(paths, images)
        images.flush()
        del images  # unmap before the file is renamed
    return np.load(target, mmap_mode="c")


def load_split(data_root, split="train", limit=0, cache_dir=None, exclude_val=False):
    """Images (uint8 [N, 3, 28, 28]), digits [N] and dataset ids [N] (0 = mnistm, 1 = svhn) of both sets' `split`.

    `limit` > 0 keeps the first `limit` rows of each set; `exclude_val` leaves out the rows that stand in for a
    missing val.csv; with `cache_dir` the images come memory-mapped from the decoded cache (built if needed).
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise Hw2Error(f"data folder not found: {data_root} (pass --data hw2_data/digits, or run hw2_download.sh)")
    paths, digits, dataset_ids = image_paths(data_root, split, limit, exclude_val)
    if cache_dir is None or not paths:
        images = np.empty((len(paths), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        decode_into(paths, images)
    else:
        images = cached_images(cache_file(cache_dir, data_root, split, limit, exclude_val, paths, digits), paths)
    return torch.from_numpy(images), digits, dataset_ids


def data_fingerprint(images, digits, dataset_ids):
    """sha256 of a split's decoded uint8 images and their labels, in order (hex): the same training data gives the
    same fingerprint on any machine, whatever its file paths and times."""
    digest = hashlib.sha256()
    for array in (images, digits, dataset_ids):
        digest.update(np.ascontiguousarray(array.numpy()))
    return digest.hexdigest()


def to_model_range(images_uint8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float() / 127.5 - 1
