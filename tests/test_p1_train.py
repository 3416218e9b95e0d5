"""P1 training: bad data through the CLI, exact resume, DDP on 2 CPU processes (gloo), and the helpers."""

import copy
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

import p1_train
from p1_model import Diffusion, P1Config, preset
from utils import Hw2Error, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_bad_data_through_the_cli(small_digits, tmp_path):
    data = small_digits()
    (data / "mnistm" / "train.csv").write_text("image_name,label\n00000.png,x\n")
    result = subprocess.run([sys.executable, "p1_train.py", "--data", str(data), "--out", str(tmp_path / "out")],
                            cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "mnistm/train.csv" in last and "Traceback" not in result.stderr


def test_epoch_order_is_a_function_of_seed_and_epoch_and_shards_disjointly():
    """The order is a permutation that depends on (seed, epoch) only, not on the global RNG (fails on an order drawn
    from torch's default generator, or on a seed or epoch left out); ranks are dealt as DistributedSampler with
    drop_last deals them (fails on contiguous shards or a remainder kept)."""
    torch.manual_seed(0)
    a = p1_train.epoch_order(3, 5, 101)
    torch.manual_seed(1)
    assert torch.equal(p1_train.epoch_order(3, 5, 101), a), "the order follows the global RNG"
    assert sorted(a.tolist()) == list(range(101))
    assert not torch.equal(a, p1_train.epoch_order(3, 6, 101)) and not torch.equal(a, p1_train.epoch_order(4, 5, 101))
    shards = [p1_train.epoch_order(3, 5, 101, rank, 2) for rank in range(2)]
    for rank, shard in enumerate(shards):
        sampler = DistributedSampler(range(101), num_replicas=2, rank=rank, shuffle=False, drop_last=True)
        assert shard.tolist() == [a[i].item() for i in sampler], f"rank {rank}"
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())


def test_lr_factor_warmup_then_cosine():
    assert p1_train.lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert p1_train.lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert p1_train.lr_factor(60, 10, 110) == pytest.approx(0.5)
    assert p1_train.lr_factor(110, 10, 110) == pytest.approx(0.0)


def test_ema_update():
    """k updates towards fixed weights p from e_0 leave p + (e_0 - p) decay^k (the geometric closed form of
    e <- decay e + (1 - decay) p); fails on decay and 1 - decay swapped, or on the online weights being changed.
    Buffers are copied, not averaged (BatchNorm's running statistics)."""
    ema, model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.copy_(torch.tensor([0.0, 2.0, -3.0]))
        model.running_mean.fill_(7.0)
    online = model.weight.detach().clone()
    for _ in range(5):
        p1_train.ema_update(ema, model, 0.9)
    torch.testing.assert_close(ema.weight.detach(), online + (1.0 - online) * 0.9**5)
    assert torch.equal(model.weight.detach(), online) and torch.equal(ema.running_mean, torch.full((3,), 7.0))


TINY = ["--limit", "16", "--batch-size", "8", "--epochs", "2", "--preset", "toy", "--device", "cpu"]


def test_resume_is_exact(toy_world, tmp_path):
    """2 epochs straight == 1 epoch (as if killed) + --resume for the 2nd, bit for bit; grids on the side."""
    data = str(toy_world / "digits")
    p1_train.main(["--data", data, "--out", str(tmp_path / "straight"), *TINY, "--grid-every", "1"])
    p1_train.main(["--data", data, "--out", str(tmp_path / "split"), *TINY, "--grid-every", "0", "--stop-after", "1"])
    first = load_checkpoint(tmp_path / "split" / p1_train.CHECKPOINT_NAME)
    assert first["epoch"] == 1
    p1_train.main(["--data", data, "--out", str(tmp_path / "split"),
                   "--resume", str(tmp_path / "split" / p1_train.CHECKPOINT_NAME)])
    straight = load_checkpoint(tmp_path / "straight" / p1_train.CHECKPOINT_NAME)
    resumed = load_checkpoint(tmp_path / "split" / p1_train.CHECKPOINT_NAME)
    assert straight["epoch"] == resumed["epoch"] == 2 and straight["step"] == resumed["step"] == 8
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    assert not torch.equal(first["model"]["conv_in.weight"], straight["model"]["conv_in.weight"])  # it trained
    assert sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir()) == ["epoch_001.png",
                                                                                     "epoch_002.png"]
    assert straight["config"]["schedule"] == "cosine" and straight["train"]["lr"] == p1_train.TRAIN_PRESETS["toy"]["lr"]


class CountedReads(torch.Tensor):
    """A loss tensor that counts how often it, or anything computed from it, is read back to the host."""
    reads = 0

    def item(self):
        CountedReads.reads += 1
        return super().item()


def test_the_loss_is_read_back_once_per_log_interval_not_every_step(toy_world, tmp_path, monkeypatch):
    real_step = p1_train.train_step
    monkeypatch.setattr(p1_train, "train_step", lambda *args: real_step(*args).as_subclass(CountedReads))
    monkeypatch.setattr(p1_train, "LOG_EVERY", 3)
    monkeypatch.setattr(CountedReads, "reads", 0)
    p1_train.main(["--data", str(toy_world / "digits"), "--out", str(tmp_path), "--limit", "16", "--batch-size", "8",
                   "--epochs", "1", "--grid-every", "0", "--device", "cpu"])
    assert load_checkpoint(tmp_path / p1_train.CHECKPOINT_NAME)["step"] == 4  # 32 images, batch 8
    assert CountedReads.reads == 2, f"{CountedReads.reads} reads in 4 steps: after step 3 and at the epoch's end"


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    """A few of p1_train's own optimizer steps (autocast, scaler, clipping, AdamW, LR schedule, EMA) on one batch,
    for the course's schedule and the toy preset's: the loss at fixed noise and timesteps goes down."""
    for schedule, prediction in (("linear", "eps"), ("cosine", "v")):
        torch.manual_seed(0)
        config = preset("toy", widths=(16, 32), embed_dim=32, schedule=schedule, prediction=prediction)
        diffusion = Diffusion(config)
        ema = copy.deepcopy(diffusion).requires_grad_(False)
        settings = p1_train.TrainSettings(**{**p1_train.TRAIN_PRESETS["toy"], "lr": 3e-3, "warmup_steps": 1,
                                             "limit": 0, "seed": 0})
        optimization = p1_train.build_optimization(diffusion, settings, 100, torch.device("cpu"))
        batch = (torch.rand(8, 3, 28, 28) * 2 - 1, torch.arange(8) % 10, torch.arange(8) % 2)

        def fixed_loss():
            with torch.no_grad():
                return diffusion.loss(*batch, torch.Generator().manual_seed(0)).item()

        before = fixed_loss()
        losses = [p1_train.train_step(diffusion.net, diffusion, ema, optimization, batch, settings).item()
                  for _ in range(15)]
        after = fixed_loss()
        assert all(math.isfinite(loss) for loss in losses) and after < before, \
            f"{schedule}/{prediction}: loss {before:.4f} -> {after:.4f}"
        assert optimization[1].last_epoch == 15 and not torch.equal(ema.net.conv_in.weight,
                                                                     diffusion.net.conv_in.weight)


def test_real_data_gets_the_full_preset(small_digits, tmp_path, capsys):
    """A digits tree without the toy world's marker is real data: the full preset, unless --preset says otherwise."""
    data = small_digits(rows=8, toy=False)
    p1_train.main(["--data", str(data), "--out", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "8",
                   "--grid-every", "0", "--device", "cpu"])
    assert "Toy world" not in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "out" / p1_train.CHECKPOINT_NAME)
    assert P1Config.from_dict(state["config"]) == preset("full")
    expected = {**p1_train.TRAIN_PRESETS["full"], "epochs": 1, "batch_size": 8, "grid_every": 0}
    assert {key: state["train"][key] for key in expected} == expected


def test_resume_refuses_a_foreign_checkpoint(tmp_path):
    from utils import save_checkpoint
    save_checkpoint(tmp_path / "other.safetensors", {"config": {"depth": 3}, "model": {}})
    with pytest.raises(Hw2Error, match="not a P1 diffusion checkpoint"):
        p1_train.main(["--resume", str(tmp_path / "other.safetensors")])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args):
    """p1_train.py in 2 CPU processes (gloo); returns stdout after checking that both ranks hold the same weights."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "p1_train.py", "--device", "cpu", *[str(a) for a in args]],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d): weights sha256 ([0-9a-f]{64})", result.stdout))
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], result.stdout[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model", [["--preset", "toy", "--dropout", "0.1"], ["--preset", "full"]], ids=["toy", "full"])
def test_ddp_resume_is_exact_with_dropout_and_works_on_another_world_size(toy_world, tmp_path, capsys, model):
    """2 processes with dropout 0.1 (the toy model given dropout; the full preset, 16 M parameters, when slow tests
    run): 2 epochs straight == 1 epoch + --resume, bit for bit, so each rank's dropout stream came back as it was.
    The images are decoded once, into one shared cache file."""
    flags = ["--data", toy_world / "digits", *model, "--limit", "16", "--batch-size", "4", "--epochs", "2",
             "--grid-every", "0"]
    torchrun(*flags, "--out", tmp_path / "straight")
    torchrun(*flags, "--out", tmp_path / "split", "--stop-after", "1")
    split = tmp_path / "split" / p1_train.CHECKPOINT_NAME
    first = load_checkpoint(split)
    assert first["epoch"] == 1 and len(first["rng"]) == 2 and first["config"]["dropout"] == 0.1
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(split, single / p1_train.CHECKPOINT_NAME)
    torchrun("--resume", split, "--data", toy_world / "digits", "--out", tmp_path / "split")
    straight, resumed = load_checkpoint(tmp_path / "straight" / p1_train.CHECKPOINT_NAME), load_checkpoint(split)
    assert straight["step"] == resumed["step"] == 8  # 32 images / 2 ranks / batch 4, 2 epochs
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    assert not torch.equal(first["model"]["conv_in.weight"], straight["model"]["conv_in.weight"])  # it trained
    assert len(list((tmp_path / "straight" / "cache").iterdir())) == 1
    # one process resuming the 2-process checkpoint of epoch 1: it trains epoch 2 and says the streams now differ
    capsys.readouterr()
    p1_train.main(["--resume", str(single / p1_train.CHECKPOINT_NAME), "--data", str(toy_world / "digits"), "--out",
                   str(single), "--device", "cpu"])
    warning = capsys.readouterr().err
    assert "warning: the checkpoint holds the random states of 2 process(es) and this run has 1" in warning
    state = load_checkpoint(single / p1_train.CHECKPOINT_NAME)
    assert state["epoch"] == 2 and state["step"] == 4 + 8 and len(state["rng"]) == 1  # 32 images / batch 4




def test_a_new_run_refuses_to_replace_a_trained_model(small_digits, tmp_path):
    """`p1_train.py` into a folder that holds a checkpoint: one line, exit 1, the old file byte for byte as it was;
    --overwrite starts over and replaces it."""
    out = tmp_path / "out"
    out.mkdir()
    old = b"a trained model"
    (out / p1_train.CHECKPOINT_NAME).write_bytes(old)
    flags = ["p1_train.py", "--data", str(small_digits()), "--out", str(out), "--epochs", "1", "--batch-size", "8",
             "--grid-every", "0", "--device", "cpu"]
    result = subprocess.run([sys.executable, *flags], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert (out / p1_train.CHECKPOINT_NAME).read_bytes() == old
    p1_train.main([*flags[1:], "--overwrite"])
    assert load_checkpoint(out / p1_train.CHECKPOINT_NAME)["epoch"] == 1


def test_ema_update_is_one_fused_call(monkeypatch):
    """The EMA is one torch._foreach_lerp_ over every parameter (not a kernel per parameter), with the closed-form
    result ema <- decay ema + (1 - decay) model."""
    torch.manual_seed(0)
    ema, model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv2d(4, 2, 3)), torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Conv2d(4, 2, 3))
    expected = [0.99 * e.detach().clone() + 0.01 * p.detach() for e, p in zip(ema.parameters(), model.parameters())]
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *args: calls.append(len(args[0])) or real(*args))
    p1_train.ema_update(ema, model, 0.99)
    assert calls == [4]  # one call, all four parameter tensors
    for e, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(e, want)


def test_batches_gathered_on_the_device_equal_those_gathered_on_the_cpu(toy_world, tmp_path, monkeypatch):
    """On a GPU with room the uint8 images go there once and each batch is gathered there. Here the CPU plays the
    GPU: forcing that path (the data copied out of the memory map, the order moved with it) gives the same batches
    and so the same weights, bit for bit, as gathering from the memory-mapped cache."""
    images = torch.randint(0, 256, (10, 3, 28, 28), dtype=torch.uint8)
    data = (images, torch.arange(10) % 10, torch.arange(10) % 2)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    x0, digit, dataset = p1_train.training_batch(data, order, 1, 4, torch.device("cpu"))
    idx = order[4:8]
    torch.testing.assert_close(x0, images[idx].float() / 127.5 - 1, rtol=0, atol=0)  # p1_data's [-1, 1] mapping
    assert torch.equal(digit, idx % 10) and torch.equal(dataset, idx % 2)

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    assert p1_train.fits_on_device(320 * 2**20, torch.device("cuda"))  # the real sets, ~320 MB as uint8
    assert not p1_train.fits_on_device(2 * 2**30, torch.device("cuda"))  # more than a quarter of the free memory
    assert not p1_train.fits_on_device(1, torch.device("cpu"))

    flags = ["--data", str(toy_world / "digits"), "--limit", "16", "--batch-size", "8", "--epochs", "1",
             "--grid-every", "0", "--device", "cpu"]
    p1_train.main([*flags, "--out", str(tmp_path / "mapped")])
    monkeypatch.setattr(p1_train, "fits_on_device", lambda nbytes, device: True)
    p1_train.main([*flags, "--out", str(tmp_path / "staged")])
    mapped = load_checkpoint(tmp_path / "mapped" / p1_train.CHECKPOINT_NAME)
    staged = load_checkpoint(tmp_path / "staged" / p1_train.CHECKPOINT_NAME)
    for name, tensor in mapped["model"].items():
        assert torch.equal(tensor, staged["model"][name]), name


def test_resume_on_another_number_of_processes_continues_the_learning_rate_curve(toy_world, tmp_path, monkeypatch):
    """Epoch 1 of 3 in one process (8 steps of 4 images), then epoch 2 resumed in two processes (4 steps each).
    The learning rate after epoch 2 is the closed-form warm-up + cosine value at 2/3 of the planned 24 steps, as in
    an uninterrupted one-process run; recomputing the plan from the new world size (12 steps) would have put the
    resumed run at the end of its schedule, LR 0."""
    monkeypatch.setitem(p1_train.TRAIN_PRESETS, "toy", {**p1_train.TRAIN_PRESETS["toy"], "warmup_steps": 2})
    out = tmp_path / "run"
    p1_train.main(["--data", str(toy_world / "digits"), "--out", str(out), "--preset", "toy", "--limit", "16",
                   "--batch-size", "4", "--epochs", "3", "--stop-after", "1", "--grid-every", "0", "--device", "cpu"])
    first = load_checkpoint(out / p1_train.CHECKPOINT_NAME)
    peak, warmup, planned = first["train"]["lr"], 2, 3 * 8
    assert first["step"] == 8 and first["planned_steps"] == planned
    torchrun("--resume", out / p1_train.CHECKPOINT_NAME, "--data", toy_world / "digits", "--out", out,
             "--stop-after", "2")
    resumed = load_checkpoint(out / p1_train.CHECKPOINT_NAME)
    expected = peak * 0.5 * (1 + math.cos(math.pi * (16 - warmup) / (planned - warmup)))  # 2/3 of the plan
    assert resumed["epoch"] == 2 and resumed["step"] == 8 + 4
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected, rel=1e-9), \
        f"LR after the resumed epoch {resumed['optimizer']['param_groups'][0]['lr']:.6g}, expected {expected:.6g}"


def test_the_levers_benchmark_runs_each_variant_as_named(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import p1_train_bench

    seen = {}
    real_step = p1_train.train_step

    def recording_step(net, diffusion, ema, optimization, batch, settings, **kwargs):
        x0 = batch[0]
        seen.setdefault(current, []).append((x0.shape[0], x0.is_contiguous(memory_format=torch.channels_last)
                                             and not x0.is_contiguous()))
        return real_step(net, diffusion, ema, optimization, batch, settings, **kwargs)

    monkeypatch.setattr(p1_train, "train_step", recording_step)
    config = preset("toy", widths=(8, 16), embed_dim=16, attention_heads=2)
    settings = p1_train.TrainSettings(**{**p1_train.TRAIN_PRESETS["toy"], "batch_size": 4, "limit": 0, "seed": 0})
    data = p1_train_bench.random_training_data(16)
    for current in ("default", "channels_last", "half batch"):
        p1_train_bench.lever_run(config, settings, data, torch.device("cpu"), 2, **p1_train_bench.LEVERS[current])()
    # the half batch covers the same images in twice the steps; channels_last reaches the step as channels_last
    assert seen == {"default": [(4, False)] * 2, "channels_last": [(4, True)] * 2, "half batch": [(2, False)] * 4}
