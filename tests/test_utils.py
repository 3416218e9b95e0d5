"""Every helper of utils.py, with its error paths. References are independent: torchvision's save_image and
make_grid for the image helpers, torch's own state_dict loading for checkpoints, and pickletools to show that
the exploit file is real."""

import os
import pickletools
import random
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.utils import make_grid, save_image

import utils
from utils import Hw2Error


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------- device


def test_get_device_cpu_by_name():
    assert utils.get_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_get_device_default_prefers_cuda_then_mps(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert utils.get_device() == torch.device(expected)


def test_get_device_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Hw2Error, match="CUDA is not available.*--device cpu"):
        utils.get_device("cuda")


def test_get_device_missing_gpu_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert utils.get_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(Hw2Error, match="cuda:3.*1 GPU"):
        utils.get_device("cuda:3")


def test_get_device_mps_without_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(Hw2Error, match="MPS is not available"):
        utils.get_device("mps")


def test_get_device_bogus_name():
    with pytest.raises(Hw2Error, match="unknown device 'gpu0'"):
        utils.get_device("gpu0")


# ---------------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_dtype_on_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert utils.amp_dtype("cuda") == expected
    assert utils.amp_dtype(torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("major, minor, expected", [(7, 5, torch.float16), (7, 0, torch.float16),
                                                    (8, 0, torch.bfloat16), (8, 9, torch.bfloat16)])
def test_pre_ampere_gpus_get_fp16_with_loss_scaling(monkeypatch, major, minor, expected):
    """A T4 (7.5) or V100 (7.0) has no native bf16: torch's own is_bf16_supported() answers True there by default
    (it can emulate bf16), but cuDNN has no bf16 convolutions below 8.0. Only the device capability is faked here;
    torch.cuda.is_bf16_supported runs as it is, emulation check included (faked to succeed, as on those cards)."""
    from types import SimpleNamespace
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major,
                                                                                                  minor=minor))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    assert torch.cuda.is_bf16_supported() is True  # the default counts emulation: what the old choice asked
    assert utils.amp_dtype("cuda") == expected
    scaler = utils.make_grad_scaler(torch.device("cuda"))
    assert scaler.is_enabled() is (expected == torch.float16)  # fp16 needs loss scaling, bf16 does not


def test_amp_dtype_none_off_cuda():
    assert utils.amp_dtype("cpu") is None
    assert utils.amp_dtype(torch.device("mps")) is None
    assert utils.amp_dtype(torch.device("mps"), cpu_bf16=True) is None


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True),
                                                       (False, True, True), (True, True, True)])
def test_cpu_has_native_bf16_reads_both_cpu_features(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert utils.cpu_has_native_bf16() is expected


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: native)
    assert utils.amp_dtype("cpu", cpu_bf16=True) == (torch.bfloat16 if native else None)
    a = torch.randn(4, 4)
    with utils.autocast("cpu", cpu_bf16=True):
        assert (a @ a).dtype == (torch.bfloat16 if native else torch.float32)
    assert (a @ a).dtype == torch.float32


@pytest.mark.parametrize("enabled", [True, False])
def test_autocast_is_a_no_op_on_cpu(enabled):
    a = torch.randn(4, 4)
    with utils.autocast("cpu", enabled=enabled):
        assert not torch.is_autocast_enabled("cpu")
        product = a @ a
    assert product.dtype == torch.float32


def test_grad_scaler_disabled_on_cpu():
    scaler = utils.make_grad_scaler("cpu")
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0, requires_grad=True)
    assert scaler.scale(loss) is loss  # a disabled scaler passes the loss through untouched


# ----------------------------------------------------------------------------------------------- seeding


def draw():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_seed_everything_reproduces_python_numpy_torch():
    utils.seed_everything(123)
    first = draw()
    utils.seed_everything(123)
    assert draw() == first
    utils.seed_everything(124)
    second = draw()
    for a, b in zip(first, second):
        assert a != b


def test_seed_everything_accepts_seeds_beyond_numpy_range():
    utils.seed_everything(2**40 + 5)
    first = draw()
    utils.seed_everything(2**40 + 5)
    assert draw() == first


def test_seed_everything_deterministic_flag(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    benchmark = torch.backends.cudnn.benchmark
    try:
        utils.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = benchmark
    utils.seed_everything(0)
    assert not torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------------------- atomic writes


def test_atomic_path_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with utils.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "new"
    assert files_in(target.parent) == ["out.txt"]


def test_atomic_path_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert files_in(tmp_path) == ["out.txt"]


def test_atomic_path_unwritable_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(Hw2Error, match="cannot write .*a_file"):
        with utils.atomic_path(blocker / "sub" / "out.txt"):
            pass


def test_outputs_get_the_modes_that_plain_open_and_mkdir_give(umask, tmp_path):
    """Another account (the grader's) reads what the scripts write: every file and folder made by atomic_dir,
    atomic_path, save_checkpoint and save_png has the mode open() / mkdir() give under the same umask, 0644 / 0755
    under 022 and 0640 / 0750 under 027, where mkstemp and mkdtemp alone make 0600 / 0700."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    file_mode, dir_mode = (tmp_path / "plain.txt").stat().st_mode, (tmp_path / "plain_dir").stat().st_mode
    assert (file_mode & 0o777, dir_mode & 0o777) == (0o666 & ~umask, 0o777 & ~umask)  # the reference itself
    with utils.atomic_dir(tmp_path / "out") as tmp:
        utils.save_png(torch.zeros(3, 4, 4), tmp / "image.png")
        (tmp / "sub").mkdir()
        utils.save_checkpoint(tmp / "sub" / "state.safetensors", {"w": torch.zeros(2)})
        save_file({"w": torch.zeros(2)}, tmp / "sub" / "owner_only.safetensors")  # safetensors writes 0600 files
        (tmp / "run.sh").write_text("true\n")
        (tmp / "run.sh").chmod(0o700)
    utils.atomic_write_text(tmp_path / "atomic.txt", "x")
    utils.save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "grid.png", nrow=2)
    with utils.atomic_path(tmp_path / "raw.bin") as tmp:
        tmp.write_bytes(b"x")
    made = [tmp_path / "out", tmp_path / "out" / "sub", tmp_path / "out" / "image.png",
            tmp_path / "out" / "sub" / "state.safetensors", tmp_path / "out" / "sub" / "owner_only.safetensors",
            tmp_path / "atomic.txt", tmp_path / "grid.png", tmp_path / "raw.bin"]
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode) for p in made}
    expected = {p.relative_to(tmp_path).as_posix(): oct(dir_mode if p.is_dir() else file_mode) for p in made}
    assert modes == expected
    assert (tmp_path / "out" / "run.sh").stat().st_mode & 0o777 == 0o777 & ~umask  # executable stays executable
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "a temp file was left"


def test_current_umask_is_read_without_changing_it(umask, monkeypatch):
    assert utils.current_umask() == umask
    # where /proc/self/status is missing (macOS), os.umask is read once and remembered
    monkeypatch.setattr(utils, "PROC_STATUS", "/nonexistent/status")
    utils._umask_read_once.cache_clear()
    try:
        assert utils.current_umask() == umask and utils.current_umask() == umask
        assert utils._umask_read_once.cache_info().misses == 1
    finally:
        utils._umask_read_once.cache_clear()
    assert os.umask(umask) == umask, "reading the umask changed it"


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with utils.atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert files_in(target) == ["old.txt"] and files_in(tmp_path) == ["out"]
    with utils.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert files_in(target) == ["old.txt"]  # nothing visible until the block succeeds
    assert files_in(target) == ["new.txt"] and files_in(tmp_path) == ["out"]


def test_ensure_writable_dir(tmp_path):
    assert utils.ensure_writable_dir(tmp_path / "a" / "b", "OUT_DIR").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(Hw2Error, match="cannot write to OUT_DIR .*file"):
        utils.ensure_writable_dir(tmp_path / "file" / "sub", "OUT_DIR")


def test_atomic_write_bytes_and_text(tmp_path):
    utils.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    utils.atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert files_in(tmp_path) == ["b.bin", "t.txt"]


# ------------------------------------------------------------------------------------------- checkpoints


def trained_state():
    """A realistic training state: model, optimizer after one step (int keys), RNG, nested config."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).square().mean().backward()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "config": {"unet": {"widths": [32, 64], "dropout": 0.1, "name": "toy", "attn": None, "ema": True}},
        "step": 7,
    }
    return model, optimizer, state


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where  # same keys, same types (int keys stay int), same order
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b and type(a) is type(b), where


def test_checkpoint_round_trip(tmp_path):
    model, optimizer, state = trained_state()
    path = tmp_path / "ckpt.safetensors"
    utils.save_checkpoint(path, state)
    assert files_in(tmp_path) == ["ckpt.safetensors"]
    loaded = utils.load_checkpoint(path)
    assert_same(state, loaded)
    assert all(isinstance(key, int) for key in loaded["optimizer"]["state"])
    # the loaded pieces are accepted by torch itself
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    torch.set_rng_state(loaded["rng"])


def test_checkpoint_tied_tensors_are_stored(tmp_path):
    weight = torch.randn(3, 3)
    utils.save_checkpoint(tmp_path / "tied.safetensors", {"a": weight, "b": weight, "view": weight[0]})
    loaded = utils.load_checkpoint(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["a"], weight) and torch.equal(loaded["b"], weight)
    assert torch.equal(loaded["view"], weight[0])


def test_checkpoint_unsupported_value_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="object"):
        utils.save_checkpoint(tmp_path / "bad.safetensors", {"x": object()})
    assert files_in(tmp_path) == []


def test_checkpoint_missing(tmp_path):
    with pytest.raises(Hw2Error, match="not found.*nope.safetensors"):
        utils.load_checkpoint(tmp_path / "nope.safetensors")


def test_checkpoint_corrupt_truncated_and_foreign(tmp_path):
    _, _, state = trained_state()
    good = tmp_path / "good.safetensors"
    utils.save_checkpoint(good, state)
    data = good.read_bytes()
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(256))
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")  # valid safetensors, not ours
    for name in ["garbage", "truncated", "empty", "foreign"]:
        path = tmp_path / f"{name}.safetensors"
        with pytest.raises(Hw2Error, match=f"{name}.safetensors is not a valid hw2 checkpoint"):
            utils.load_checkpoint(path)
    with pytest.raises(Hw2Error, match=r"\(no hw2 metadata in its header\)$"):
        utils.load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(Hw2Error, match=r"\(SafetensorError: ") as damaged:  # the reader's own words for real damage
        utils.load_checkpoint(tmp_path / "truncated.safetensors")
    assert "no hw2 metadata" not in str(damaged.value)


def test_checkpoint_tensors_inside_lists_come_back(tmp_path):
    state = {"moments": [torch.arange(3.0), {"inner": [torch.ones(2, 2), 4]}], "step": 7}
    utils.save_checkpoint(tmp_path / "lists.safetensors", state)
    loaded = utils.load_checkpoint(tmp_path / "lists.safetensors")
    assert torch.equal(loaded["moments"][0], torch.arange(3.0)) and loaded["step"] == 7
    assert torch.equal(loaded["moments"][1]["inner"][0], torch.ones(2, 2)) and loaded["moments"][1]["inner"][1] == 4


# ------------------------------------------------------------------------------------------- .pt files


class Exploit:
    """Unpickling this calls open(path, "w"), i.e. creates a file: what a hostile .pt could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_load_torch_file_state_dict(tmp_path):
    state_dict = torch.nn.Conv2d(3, 4, 3).state_dict()
    torch.save(state_dict, tmp_path / "UNet.pt")
    loaded = utils.load_torch_file(tmp_path / "UNet.pt")
    assert_same(dict(state_dict), dict(loaded))
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_load_torch_file_missing_and_truncated(tmp_path):
    with pytest.raises(Hw2Error, match="file not found.*00.pt"):
        utils.load_torch_file(tmp_path / "00.pt")
    torch.save(torch.randn(1, 3, 16, 16), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "01.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(Hw2Error, match="cannot load .*01.pt") as damaged:
        utils.load_torch_file(tmp_path / "01.pt")
    with pytest.raises(Exception) as torch_error:  # the message names torch's own first line of the reason
        torch.load(tmp_path / "01.pt", weights_only=True)
    assert str(damaged.value).endswith(f"01.pt: {str(torch_error.value).strip().splitlines()[0]}"), damaged.value


def test_load_torch_file_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(1), "payload": Exploit(marker)}, tmp_path / "evil.pt")
    refused = "evil.pt: it holds pickled objects other than tensors, which are refused for safety$"
    with pytest.raises(Hw2Error, match=refused):
        utils.load_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()
    # the file really is hostile: its pickle calls open() on the marker path (read, never run, here)
    with zipfile.ZipFile(tmp_path / "evil.pt") as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    opcodes = [(op.name, arg) for op, arg, _ in pickletools.genops(pickled)]
    assert ("GLOBAL", "io open") in opcodes and ("BINUNICODE", str(marker)) in opcodes, opcodes


# --------------------------------------------------------------------------------------------- images


def png_pixels(path):
    with Image.open(path) as image:
        return np.asarray(image)


def test_to_uint8_matches_save_image(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(3, 16, 20) * 2.4 - 1.2  # includes values outside [-1, 1]
    # exact rounding boundaries: (x + 1) / 2 * 255 = k + 0.5 and k + 0.49
    x[0, 0, :4] = torch.tensor([0.5, 127.5, 127.49, 254.5]) / 127.5 - 1
    save_image((x + 1) / 2, tmp_path / "ref.png")
    ours = utils.to_uint8(x)
    assert ours.dtype == np.uint8 and ours.shape == (16, 20, 3)
    np.testing.assert_array_equal(ours, png_pixels(tmp_path / "ref.png"))
    assert ours.min() == 0 and ours.max() == 255  # clamped, not wrapped


def test_to_uint8_batch_and_endpoints():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 1, 1)
    out = utils.to_uint8(x)
    assert out.shape == (2, 1, 1, 3)
    assert out[0, 0, 0].tolist() == [0, 128, 255]  # 127.5 + 0.5 rounds half up


def test_save_png_rgb_and_grey(tmp_path):
    x = torch.rand(3, 12, 7) * 2 - 1
    utils.save_png(x, tmp_path / "out" / "rgb.png")
    with Image.open(tmp_path / "out" / "rgb.png") as image:
        assert image.mode == "RGB" and image.size == (7, 12)
    np.testing.assert_array_equal(png_pixels(tmp_path / "out" / "rgb.png"), utils.to_uint8(x))
    utils.save_png(torch.zeros(1, 5, 6), tmp_path / "out" / "grey.png")
    with Image.open(tmp_path / "out" / "grey.png") as image:
        assert image.mode == "L" and image.size == (6, 5)
    assert files_in(tmp_path / "out") == ["grey.png", "rgb.png"]


@pytest.mark.parametrize("count, nrow", [(5, 3), (1, 4), (8, 8)])
def test_save_grid_matches_torchvision(tmp_path, count, nrow):
    torch.manual_seed(count)
    images = torch.rand(count, 3, 9, 11) * 2 - 1
    utils.save_grid(images, tmp_path / "grid.png", nrow=nrow)
    save_image((images + 1) / 2, tmp_path / "ref.png", nrow=nrow, padding=2, pad_value=1.0)
    grid = make_grid(images, nrow=nrow, padding=2)
    ours = png_pixels(tmp_path / "grid.png")
    assert ours.shape == (grid.shape[1], grid.shape[2], 3)
    np.testing.assert_array_equal(ours, png_pixels(tmp_path / "ref.png"))


def test_load_rgb(tmp_path):
    Image.new("L", (4, 3), 200).save(tmp_path / "grey.png")
    image = utils.load_rgb(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (4, 3) and image.getpixel((0, 0)) == (200, 200, 200)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(Hw2Error, match="cannot read image .*corrupt.png"):
        utils.load_rgb(tmp_path / "corrupt.png")
    with pytest.raises(Hw2Error, match="cannot read image .*missing.png"):
        utils.load_rgb(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------------- cli


def test_run_cli_reports_one_line_and_exits_1(capsys):
    def main(argv):
        raise Hw2Error(f"bad flag {argv[0]}: use --seed 0")

    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main, ["--seed=x"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == "error: bad flag --seed=x: use --seed 0\n" and captured.out == ""


def test_run_cli_passes_results_and_bugs_through():
    assert utils.run_cli(lambda argv: argv, ["a"]) == ["a"]
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: full traceback
        utils.run_cli(lambda argv: 1 / 0)


# ------------------------------------------------------------------------------------------- toy world


def test_find_toy_root_and_announce(tmp_path, capsys):
    root = tmp_path / "hw2_data"
    (root / "digits" / "svhn").mkdir(parents=True)
    (tmp_path / "real").mkdir()
    assert utils.find_toy_root(root / "digits" / "svhn") is None
    (root / utils.TOY_MARKER).write_text("{}")
    assert utils.find_toy_root(root / "digits" / "svhn") == root.resolve()
    assert utils.find_toy_root(root / "digits" / "svhn" / "no_such_file.png") == root.resolve()
    assert utils.find_toy_root(tmp_path / "real") is None

    assert utils.announce_toy_world(root / "digits")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "Toy world" in out and str(root.resolve()) in out
    assert not utils.announce_toy_world(tmp_path / "real")
    assert capsys.readouterr().out == ""


def test_labelled_grid_draws_each_label_in_its_margin():
    """Tiles are white, so any dark pixel can only come from a label; each label must darken its own margin cell."""
    tile = np.full((8, 8, 3), 255, np.uint8)
    rows, cols = [f"eta = {e}" for e in (0, 0.25, 0.5, 0.75, 1.0)], [f"{i:02d}.pt" for i in range(4)]
    labelled = np.asarray(utils.labelled_grid([[tile] * 4 for _ in rows], rows, cols, pad=4).convert("L"))
    blank = np.asarray(utils.labelled_grid([[tile] * 4 for _ in rows], [""] * 5, [""] * 4, pad=4).convert("L"))
    assert blank.min() == 255, "with empty labels the figure must be all white"
    top = labelled.shape[0] - 5 * (8 + 4)  # height of the column-label strip
    left = labelled.shape[1] - 4 * (8 + 4)  # width of the row-label strip
    assert top > 4 and left > 4, f"no margin for labels: top {top}, left {left}"
    for col in range(4):
        strip = labelled[:top, left + col * 12:left + (col + 1) * 12]
        assert (strip < 128).any(), f"column label {cols[col]!r} not drawn"
    for row in range(5):
        strip = labelled[top + row * 12:top + (row + 1) * 12, :left]
        assert (strip < 128).any(), f"row label {rows[row]!r} not drawn"
    tiles_only = labelled[top:, left:]
    assert tiles_only.min() == 255, "label text spilled over the tiles"
