"""P1 data: label files, bad data, the memory-mapped decoded cache, and the val split held out of train.csv."""

import os
import shutil

import pytest
import torch

import p1_data
from utils import Hw2Error


def test_load_split_of_the_toy_world(toy_world):
    images, digits, dataset_ids = p1_data.load_split(toy_world / "digits", "train", limit=20)
    assert images.shape == (40, 3, 28, 28) and images.dtype == torch.uint8
    assert dataset_ids.tolist() == [0] * 20 + [1] * 20
    assert 0 <= digits.min() and digits.max() <= 9
    x = p1_data.to_model_range(images)
    assert -1 <= x.min() and x.max() <= 1


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "svhn" / "train.csv").unlink(), "label file not found"),
    (lambda d: (d / "svhn" / "train.csv").write_text("name,digit\n00000.png,1\n"), "header"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\n00000.png\n"), "line 2 is malformed"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\n00000.png,10\n"), "not a digit 0..9"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\n00000.png,-1\n"), "not a digit 0..9"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\n"), "lists no images"),
    (lambda d: (d / "svhn" / "train.csv").write_bytes(b"image_name,label\n\xff\xfe,1\n"), "cannot read"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\nnope.png,1\n"), "does not exist"),
    (lambda d: (d / "svhn" / "data" / "00000.png").write_bytes(b"not a png"), "cannot read image"),
])
@pytest.mark.parametrize("cached", [False, True])
def test_bad_data_is_one_clear_error_and_leaves_no_cache(small_digits, tmp_path, damage, message, cached):
    data = small_digits()
    first = (data / "svhn" / "train.csv").read_text().splitlines()[1].split(",")[0]
    if first != "00000.png":  # the damage above assumes the first listed file
        os.replace(data / "svhn" / "data" / first, data / "svhn" / "data" / "00000.png")
        text = (data / "svhn" / "train.csv").read_text()
        (data / "svhn" / "train.csv").write_text(text.replace(first, "00000.png", 1))
    damage(data)
    cache = tmp_path / "cache" if cached else None
    with pytest.raises(Hw2Error, match=message) as err:
        p1_data.load_split(data, "train", cache_dir=cache)
    assert "svhn" in str(err.value)
    assert leftovers(tmp_path / "cache") == []  # neither a cache file nor a temp file


def mapped_files(tensor):
    """The files of /proc/self/maps whose mapping holds the tensor's first byte."""
    address = tensor.data_ptr()
    files = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end and len(fields) >= 6:
                files.append(fields[5])
    return files


def test_the_cache_is_decoded_once_and_memory_mapped(small_digits, tmp_path, monkeypatch):
    data, cache = small_digits(rows=20), tmp_path / "cache"
    decoded, digits, dataset_ids = p1_data.load_split(data, "train")
    images, cached_digits, cached_ids = p1_data.load_split(data, "train", cache_dir=cache)
    assert torch.equal(images, decoded) and torch.equal(cached_digits, digits) and torch.equal(cached_ids, dataset_ids)
    files = leftovers(cache)
    assert len(files) == 1 and files[0].startswith("train-") and files[0].endswith(".npy"), files
    assert str(cache / files[0]) in mapped_files(images), "the images are not mapped from the cache file"

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded again although the cache is current")

    monkeypatch.setattr(p1_data, "load_rgb", no_decoding)
    again, _, _ = p1_data.load_split(data, "train", cache_dir=cache)
    assert torch.equal(again, decoded) and leftovers(cache) == files


def test_the_cache_follows_changes_to_the_csv_and_the_images(small_digits, tmp_path):
    data, cache = small_digits(rows=20), tmp_path / "cache"
    p1_data.load_split(data, "train", cache_dir=cache)
    first = leftovers(cache)
    csv_path = data / "mnistm" / "train.csv"
    csv_path.write_text("\n".join(csv_path.read_text().splitlines()[:-1]) + "\n")  # one row fewer
    images, _, _ = p1_data.load_split(data, "train", cache_dir=cache)
    second = leftovers(cache)
    assert images.shape[0] == 39 and len(second) == 1 and second != first  # rebuilt, the stale file removed
    # replace one image's content (a later modification time, another size): the cache must show the new pixels
    names = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:3]]
    target = data / "mnistm" / "data" / names[0]
    shutil.copy(data / "mnistm" / "data" / names[1], target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    images, _, _ = p1_data.load_split(data, "train", cache_dir=cache)
    assert torch.equal(images[0], images[1]) and leftovers(cache) not in (first, second)


def test_a_damaged_cache_file_is_rebuilt(small_digits, tmp_path):
    data, cache = small_digits(rows=10), tmp_path / "cache"
    expected, _, _ = p1_data.load_split(data, "train", cache_dir=cache)
    expected = expected.clone()
    path = cache / leftovers(cache)[0]
    path.write_bytes(path.read_bytes()[:200])  # truncated
    images, _, _ = p1_data.load_split(data, "train", cache_dir=cache)
    assert torch.equal(images, expected) and path.stat().st_size > 200


def test_a_missing_val_csv_holds_out_a_fixed_tenth_of_train(small_digits, capsys):
    data = small_digits(rows=50)  # the copy has train.csv only
    train, train_digits, _ = p1_data.load_split(data, "train")
    fit, fit_digits, fit_sets = p1_data.load_split(data, "train", exclude_val=True)
    assert capsys.readouterr().out == ""  # only the val split is announced
    val, val_digits, val_sets = p1_data.load_split(data, "val")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("no val.csv" in line and "5 of 50 images" in line for line in lines), lines
    assert lines[0].startswith("mnistm:") and lines[1].startswith("svhn:")
    assert len(train) == 100 and len(fit) == 90 and len(val) == 10 and val_sets.tolist() == [0] * 5 + [1] * 5
    # disjoint, and together exactly train.csv (compare the images themselves, one row each)
    rows = {bytes(image.numpy()) + bytes([digit]) for image, digit in zip(train, train_digits.tolist())}
    fit_rows = [bytes(image.numpy()) + bytes([digit]) for image, digit in zip(fit, fit_digits.tolist())]
    val_rows = [bytes(image.numpy()) + bytes([digit]) for image, digit in zip(val, val_digits.tolist())]
    assert set(fit_rows).isdisjoint(val_rows) and set(fit_rows) | set(val_rows) == rows
    again, _, _ = p1_data.load_split(data, "val")
    assert torch.equal(again, val)  # deterministic
    torch.manual_seed(1)
    first = p1_data.held_out(50)
    torch.manual_seed(2)  # fails if the held-out rows follow the global RNG (they would move between train and score)
    assert p1_data.held_out(50) == first and len(first) == 5 and first <= set(range(50))
    assert len(p1_data.held_out(1234)) == 123 and first != set(range(5)), "10 %, drawn at random, not the first rows"


def test_an_existing_val_csv_is_used_as_it_is(toy_world, capsys):
    val, _, _ = p1_data.load_split(toy_world / "digits", "val")
    # the first 200 rows per set: about 20 of them would be held out if the existing val.csv were ignored
    fit, _, _ = p1_data.load_split(toy_world / "digits", "train", 200, exclude_val=True)
    train, _, _ = p1_data.load_split(toy_world / "digits", "train", 200)
    listed = sum(len(p1_data.read_labels(toy_world / "digits" / name / "val.csv")) for name in ("mnistm", "svhn"))
    assert len(val) == listed and torch.equal(fit, train) and "no val.csv" not in capsys.readouterr().out
