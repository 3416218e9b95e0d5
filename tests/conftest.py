"""Shared test fixtures. Nothing in the suite may reach the network: the hub is forced offline here."""

import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toy_data import build_toy_world  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (full-size models, "
                     "long training); `-m slow` then selects only those")


def pytest_collection_modifyitems(config, items):
    """Slow tests are skipped by default; `--runslow` runs them with everything else, and a `-m` expression that
    names them (`-m slow`) selects them as written."""
    if config.getoption("--runslow") or "slow" in config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """One toy `hw2_data` tree (seed 0) for the whole session; tests must not modify it. HW2_TEST_TOY_WORLD may name
    one built before (`python toy_data.py --out DIR --seed 0`), for runs that start many short sessions."""
    prebuilt = os.environ.get("HW2_TEST_TOY_WORLD")
    if prebuilt:
        return Path(prebuilt)
    return build_toy_world(tmp_path_factory.mktemp("toy") / "hw2_data", seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one thread: their ops are too small to split, and on a busy 2-core
    machine two spinning OpenMP threads made them up to 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    """Run a test under umask 022 (the usual one) and 027 (a group-only site); the old umask comes back after."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture()
def small_digits(toy_world, tmp_path):
    """A function that copies the first `rows` train.csv images of each toy digit set into tmp_path/hw2_data and
    returns its digits/ folder (tests may damage the copy). No val.csv; `toy=False` leaves out the TOY marker, so
    that the scripts take the copy for real data."""
    def copy(rows=8, toy=True):
        root = tmp_path / "hw2_data"
        root.mkdir(parents=True)
        if toy:
            shutil.copy(toy_world / "TOY", root / "TOY")
        for name in ("mnistm", "svhn"):
            src, dst = toy_world / "digits" / name, root / "digits" / name
            (dst / "data").mkdir(parents=True)
            lines = (src / "train.csv").read_text().splitlines()[: rows + 1]
            (dst / "train.csv").write_text("\n".join(lines) + "\n")
            for line in lines[1:]:
                file_name = line.split(",")[0]
                shutil.copy(src / "data" / file_name, dst / "data" / file_name)
        return root / "digits"
    return copy
