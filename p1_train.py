"""P1: train one digit- and dataset-conditional diffusion model on MNIST-M + SVHN.

    python p1_train.py                                     # hw2_data/digits -> checkpoints/p1/ddpm.safetensors
    python p1_train.py --resume checkpoints/p1/ddpm.safetensors
    torchrun --nproc_per_node=4 p1_train.py --preset full  # several GPUs (DistributedDataParallel)

Data: the union of `digits/mnistm` and `digits/svhn` (train.csv, header image_name,label), each sample an image
in [-1, 1], its digit and its dataset id (0 = mnistm, 1 = svhn). No flips: digits are not mirror-symmetric.
The images are decoded once into a uint8 cache under `--out`/cache that every rank memory-maps (p1_data.py). On a
GPU with room for them (the real sets are ~320 MB as uint8) they are copied there once and batches are gathered
on the GPU; otherwise batches are gathered from the cache on the CPU (no DataLoader workers either way). The
default paths are relative to this file's folder. An existing checkpoint in `--out` is never replaced unless
`--resume` or `--overwrite` says so.

Each epoch ends with an atomic checkpoint (model, EMA, optimizer, LR schedule, grad scaler, epoch/step, every
rank's random states, config, preset name, fingerprint of the training data), so a kill loses at most the current
epoch and `--resume` continues exactly: the data order and the diffusion noise of an epoch are functions of (seed,
epoch, rank) only, and each rank gets its own dropout stream back (on GPUs with `--deterministic` kernels). The
learning rate is a function of the progress through the planned epochs, so a run resumed on another number of GPUs
goes on along the same curve. Samples come from the EMA weights. The loss runs under bf16 autocast on GPUs with
native bf16 (compute capability 8.0 on) and on CPUs with native bf16 (AVX512-BF16 or AMX), fp16 + loss scaling on
older GPUs, fp32 elsewhere; it is read back to the host every LOG_EVERY steps only.
"""

import argparse
import contextlib
import copy
import hashlib
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from p1_data import data_fingerprint, load_split, to_model_range
from p1_model import NUM_DIGITS, Diffusion, P1Config, diffusion_loss, final, preset
from utils import (
    Hw2Error,
    announce_toy_world,
    autocast,
    find_toy_root,
    get_device,
    load_checkpoint,
    make_grad_scaler,
    run_cli,
    save_checkpoint,
    save_grid,
    seed_everything,
)

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "hw2_data" / "digits"
DEFAULT_OUT = REPO / "checkpoints" / "p1"  # beside the code, so that the scripts find it from any folder
CHECKPOINT_NAME = "ddpm.safetensors"
GRID_SAMPLER = dict(sampler="ddim", steps=10)  # quick look at progress; p1_inference.py samples properly
LOG_EVERY = 20  # steps between progress-bar updates: reading the loss back forces a GPU sync, so not every step
DEVICE_DATA_SHARE = 0.25  # the uint8 training images go to the GPU if they take at most this share of its free memory


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; saved in the checkpoint so that --resume continues with exactly these."""

    epochs: int
    batch_size: int  # per process
    lr: float
    warmup_steps: int
    weight_decay: float
    ema_decay: float
    grad_clip: float
    grid_every: int  # epochs between 10x10 sample grids (0 = none)
    guidance: float  # guidance weight w for the sample grids
    limit: int  # > 0: only the first `limit` training images of each dataset (smoke tests)
    seed: int


# Toy: 2 CPU cores with native bf16, batch 128: 28 epochs of the toy world's 16,000 training images = 3,500 steps,
# 448 k images seen. At the same steps, peak LR 3e-3 scored 0.99 on MNIST-M where 2e-3 scored 0.94-0.96 and an EMA
# decay of 0.999 0.92 (BENCHMARKS.md, P1: how the preset was chosen). Half the images in as many steps (batch 64,
# 13 epochs: 0.49x the time) lost 5 points on MNIST-M; peak LR 5e-3, batch 32, narrower widths or a min-SNR gamma
# of 2, 1 or 0 (off) in half the time did worse (BENCHMARKS.md, P1: training in half the time).
# Full: one modern GPU; the real sets (~135k images) for 60 epochs.
TRAIN_PRESETS = {
    "toy": dict(epochs=28, batch_size=128, lr=3e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995,
                grad_clip=1.0, grid_every=6, guidance=5.0),
    "full": dict(epochs=60, batch_size=128, lr=4e-4, warmup_steps=1000, weight_decay=0.0, ema_decay=0.9995,
                 grad_clip=1.0, grid_every=1, guidance=2.0),
}

# ----------------------------------------------------------------------------------------------- steps


def epoch_order(seed, epoch, n, rank=0, world_size=1):
    """This rank's sample indices for `epoch`: one permutation per (seed, epoch), cut to a multiple of the world
    size and dealt round-robin (like DistributedSampler with drop_last), so every rank has the same count."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    return order[: n - n % world_size][rank::world_size]


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up from 0 to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter in one fused call (buffers are copied)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def build_optimization(diffusion, settings, total_steps, device, planned_steps=None):
    """AdamW, its warm-up + cosine LR schedule, and a grad scaler (active for fp16 only).

    The schedule is `lr_factor` over the `planned_steps` of the run as first planned (default `total_steps`), read
    at the progress step / `total_steps` through this run's own `total_steps`: a run resumed with another number of
    processes, hence another number of steps per epoch, stays on the planned curve.
    """
    planned_steps = planned_steps or total_steps
    optimizer = torch.optim.AdamW(diffusion.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step * planned_steps / total_steps, settings.warmup_steps, planned_steps))
    return optimizer, scheduler, make_grad_scaler(device)


def step_precision(device, dtype=None):
    """The autocast of a training step. dtype None: p1_train's choice, bf16 on CUDA and on CPUs with native bf16
    (toy preset: 1.5x the fp32 images/s), fp16 on GPUs without bf16, fp32 elsewhere; else autocast to `dtype`."""
    if dtype is None:
        return autocast(device, cpu_bf16=True)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def train_step(net, diffusion, ema, optimization, batch, settings, generator=None, dtype=None):
    """One optimizer step on `batch` = (x0 in [-1, 1], digits, dataset ids), all on the training device.

    `net` is diffusion.net, or its DDP wrapper; `optimization` is (optimizer, LR scheduler, grad scaler); `dtype`
    picks the autocast (see `step_precision`). Returns the loss as a detached tensor on the device: reading it
    back is left to the caller (a GPU sync).
    """
    optimizer, scheduler, scaler = optimization
    x0, digit, dataset = batch
    with step_precision(x0.device, dtype):
        loss = diffusion_loss(net, x0, digit, dataset, diffusion.config, diffusion.alpha_bar, generator)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(diffusion.parameters(), settings.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    ema_update(ema, diffusion, settings.ema_decay)
    return loss.detach()


def weights_digest(module):
    """SHA-256 of every parameter's bytes, to compare replicas."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def sample_grid(diffusion, guidance, seed, device):
    """100 EMA samples: row = digit 0..9; columns 0-4 MNIST-M, 5-9 SVHN; fixed noise so epochs compare."""
    digit = torch.arange(NUM_DIGITS, device=device).repeat_interleave(10)
    dataset = (torch.arange(10, device=device) >= 5).long().repeat(NUM_DIGITS)
    generator = torch.Generator(device).manual_seed(seed)
    x_T = torch.randn(100, 3, 28, 28, generator=generator, device=device)
    return final(diffusion.sample(x_T, digit, dataset, w=guidance, **GRID_SAMPLER))


# ------------------------------------------------------------------------------------------ checkpoints


def rng_states(device):
    """This process's random states: python, numpy, torch's CPU generator and, on CUDA, its own device's."""
    states = {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()), "python": random.getstate()}
    states["numpy"][1] = torch.from_numpy(states["numpy"][1].astype(np.int64))
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def all_rng_states(device, world_size):
    """Every rank's `rng_states`, in rank order (a collective: every rank must call it)."""
    if world_size == 1:
        return [rng_states(device)]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, rng_states(device))
    return gathered


def restore_rng_states(saved, device, rank, world_size, seed, epoch):
    """Give this rank the random states it had when the checkpoint was written. Saved by a different number of
    processes, they cannot be matched: the ranks are reseeded from (seed, epoch, rank) instead, with a warning."""
    if isinstance(saved, dict):  # written before the states were kept per rank: rank 0's, CUDA ones of all devices
        saved = [{key: value for key, value in saved.items() if key != "cuda"}]
    if len(saved) == world_size:
        set_rng_states(saved[rank], device)
        return
    seed_everything((seed * 1_000_003 + epoch) * 64 + rank)
    if rank == 0:
        print(f"warning: the checkpoint holds the random states of {len(saved)} process(es) and this run has "
              f"{world_size}: the data order and the diffusion noise stay exact, but the dropout streams differ from "
              f"an uninterrupted run.", file=sys.stderr)


def load_model_checkpoint(path, weights="ema"):
    """Rebuild a Diffusion from one of our checkpoints alone; `weights` is "ema" or "model"."""
    state = load_checkpoint(path)
    if weights not in state and "ema" in state:
        raise Hw2Error(f"{path} holds the EMA weights only (a release from hw2_release.py): it samples with "
                       f"p1_inference.py but cannot resume training; resume from the full training checkpoint")
    try:
        config = P1Config.from_dict(state["config"])
        diffusion = Diffusion(config)
        diffusion.net.load_state_dict(state[weights])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0]
        raise Hw2Error(f"{path} is not a P1 diffusion checkpoint of a config this code can build ({reason}); "
                       f"train one with p1_train.py") from err
    return diffusion, state


# ------------------------------------------------------------------------------------------------ train


def training_data(args, settings, rank, world_size):
    """The training split, decoded once by rank 0 into the shared cache under --out, memory-mapped by every rank."""
    cache = Path(args.out) / "cache"
    data = load_split(args.data, "train", settings.limit, cache) if rank == 0 else None
    if world_size > 1:
        dist.barrier()  # the other ranks read the cache only once rank 0 has written it
    return data or load_split(args.data, "train", settings.limit, cache)


def fits_on_device(nbytes, device):
    """Whether `nbytes` of training data should live on `device`: on a GPU when they take at most DEVICE_DATA_SHARE
    of its free memory; never elsewhere (on the CPU the memory-mapped cache is already where batches are made)."""
    if torch.device(device).type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_DATA_SHARE * free


def training_batch(data, order, step, batch_size, device):
    """Batch `step` of an epoch's `order` from `data` = (uint8 images, digits, dataset ids), on `device`.

    With `data` and `order` already on the GPU the gather runs there and nothing crosses the bus; with them on the
    CPU the batch is gathered from the memory-mapped cache and copied over."""
    idx = order[step * batch_size:(step + 1) * batch_size]
    images, digits, dataset_ids = data
    return (to_model_range(images[idx].to(device, non_blocking=True)), digits[idx].to(device),
            dataset_ids[idx].to(device))


def train(args, config, settings, device, rank, world_size, resume_state=None):
    images, digits, dataset_ids = training_data(args, settings, rank, world_size)
    fingerprint = data_fingerprint(images, digits, dataset_ids) if rank == 0 else None  # saved with the weights
    steps_per_epoch = len(epoch_order(settings.seed, 0, len(images), rank, world_size)) // settings.batch_size
    if steps_per_epoch == 0:
        raise Hw2Error(f"--batch-size {settings.batch_size} is larger than this process's share of the "
                       f"{len(images)} training images: lower --batch-size")
    data_device = device if fits_on_device(images.numel(), device) else torch.device("cpu")
    data = tuple(array.to(data_device) for array in (images, digits, dataset_ids))  # once, not every step

    # the same initial weights on every rank (DDP would broadcast rank 0's anyway), then a dropout stream per rank
    seed_everything(settings.seed, deterministic=args.deterministic)
    diffusion = Diffusion(config).to(device)
    ema = copy.deepcopy(diffusion).requires_grad_(False)
    seed_everything(settings.seed + rank)
    net = DistributedDataParallel(diffusion.net) if world_size > 1 else diffusion.net
    total_steps = settings.epochs * steps_per_epoch
    # the plan in the steps of the run that started it (checkpoints written before it was kept: this run's)
    planned_steps = resume_state.get("planned_steps", total_steps) if resume_state is not None else total_steps
    optimization = build_optimization(diffusion, settings, total_steps, device, planned_steps)
    optimizer, scheduler, scaler = optimization
    start_epoch, step = 0, 0
    if resume_state is not None:
        diffusion.net.load_state_dict(resume_state["model"])
        ema.net.load_state_dict(resume_state["ema"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["lr_scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        start_epoch, step = resume_state["epoch"], resume_state["step"]
        scheduler.last_epoch = start_epoch * steps_per_epoch  # in this run's steps, whatever the saved run's were
        restore_rng_states(resume_state["rng"], device, rank, world_size, settings.seed, start_epoch)
    out = Path(args.out)
    if rank == 0:
        print(f"P1 training: {len(images)} images, {sum(p.numel() for p in diffusion.parameters()) / 1e6:.2f} M "
              f"parameters, {world_size} process(es) on {device}, epochs {start_epoch + 1}..{settings.epochs}, "
              f"{steps_per_epoch} steps/epoch, batches gathered on {data_device}, checkpoint {out / CHECKPOINT_NAME}")

    for epoch in range(start_epoch, min(settings.epochs, args.stop_after or settings.epochs)):
        order = epoch_order(settings.seed, epoch, len(images), rank, world_size).to(data_device)
        # the diffusion noise of this epoch depends on (seed, epoch, rank) only, so a resumed run redraws it exactly
        noise_gen = torch.Generator(device).manual_seed((settings.seed * 1_000_003 + epoch) * 64 + rank)
        diffusion.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{settings.epochs}", disable=rank != 0)
        loss_sum, logged, start = torch.zeros((), device=device), 0, time.perf_counter()
        for i in bar:
            batch = training_batch(data, order, i, settings.batch_size, device)
            loss_sum += train_step(net, diffusion, ema, optimization, batch, settings, noise_gen)
            step += 1
            if (i + 1) % LOG_EVERY == 0 or i + 1 == steps_per_epoch:
                mean_loss = loss_sum.item() / (i + 1 - logged)  # the one host sync per LOG_EVERY steps
                loss_sum.zero_()
                logged, rate = i + 1, (i + 1) * settings.batch_size * world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

        states = all_rng_states(device, world_size)
        if rank == 0:
            done = epoch + 1
            if settings.grid_every > 0 and (done % settings.grid_every == 0 or done == settings.epochs):
                ema.eval()
                grid = sample_grid(ema, settings.guidance, settings.seed, device)
                save_grid(grid, out / "samples" / f"epoch_{done:03d}.png", nrow=10)
            save_checkpoint(out / CHECKPOINT_NAME, {
                "config": config.to_dict(), "train": asdict(settings), "model": diffusion.net.state_dict(),
                "ema": ema.net.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": done,
                "step": step, "planned_steps": planned_steps, "rng": states, "preset": args.preset,
                "data_fingerprint": fingerprint})
    return diffusion, ema


def main(argv=None):
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    toy = announce_toy_world(args.data) if rank == 0 else find_toy_root(args.data) is not None
    checkpoint = Path(args.out) / CHECKPOINT_NAME
    if args.resume is None and not args.overwrite and checkpoint.exists():
        raise Hw2Error(f"{checkpoint} already holds a trained model: continue it with --resume {checkpoint}, replace "
                       f"it with --overwrite, or pass another --out")
    resume_state = None
    if args.resume is not None:
        _, resume_state = load_model_checkpoint(args.resume, weights="model")
        config = P1Config.from_dict(resume_state["config"])
        settings = TrainSettings(**resume_state["train"])
        args.preset = resume_state.get("preset")  # None in checkpoints written before it was recorded
        if rank == 0:
            print(f"Resuming {args.resume} after epoch {resume_state['epoch']} with its saved config and settings.")
    else:
        name = args.preset = args.preset or ("toy" if toy else "full")
        overrides = {key: getattr(args, key) for key in ("schedule", "prediction", "dropout")
                     if getattr(args, key) is not None}
        config = preset(name, **overrides)
        values = dict(TRAIN_PRESETS[name], limit=args.limit, seed=args.seed)
        for key in ("epochs", "batch_size", "lr", "grid_every", "guidance"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        settings = TrainSettings(**values)
        if settings.epochs < 1 or settings.batch_size < 1 or settings.lr <= 0 or settings.grid_every < 0:
            raise Hw2Error("--epochs and --batch-size must be >= 1, --grid-every >= 0 and --lr > 0")
        if not 0 <= config.dropout < 1:
            raise Hw2Error(f"--dropout must be in [0, 1), got {config.dropout}")

    if world_size > 1:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(device)
    else:
        device = get_device(args.device)
    try:
        diffusion, _ = train(args, config, settings, device, rank, world_size, resume_state)
        if world_size > 1:
            print(f"rank {rank}: weights sha256 {weights_digest(diffusion.net)}")
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default=DEFAULT_DATA,
                        help="Folder holding mnistm/ and svhn/ (each with data/, train.csv).")
    parser.add_argument("--out", type=str, default=DEFAULT_OUT,
                        help=f"Folder for the checkpoint ({CHECKPOINT_NAME}) and the per-epoch sample grids.")
    parser.add_argument("--preset", type=str, default=None, choices=sorted(TRAIN_PRESETS),
                        help="Model and training preset; default: toy on a toy world, full otherwise.")
    parser.add_argument("--schedule", type=str, default=None, choices=["linear", "cosine"],
                        help="Noise schedule, replacing the preset's (linear = the course's DDPM betas 1e-4..0.02).")
    parser.add_argument("--prediction", type=str, default=None, choices=["eps", "v"],
                        help="What the network predicts, replacing the preset's choice.")
    parser.add_argument("--dropout", type=float, default=None,
                        help="Dropout probability in the residual blocks, replacing the preset's (toy 0, full 0.1).")
    parser.add_argument("--epochs", type=int, default=None, help="Number of epochs; default: the preset's.")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="Images per optimizer step and process; default: the preset's.")
    parser.add_argument("--lr", type=float, default=None, help="Peak AdamW learning rate; default: the preset's.")
    parser.add_argument("--grid-every", type=int, default=None,
                        help="Write a 10x10 sample grid every this many epochs and after the last one (0 = "
                             "never); default: the preset's.")
    parser.add_argument("--guidance", type=float, default=None,
                        help="Guidance weight w of the sample grids; default: the preset's.")
    parser.add_argument("--limit", type=int, default=0,
                        help="Use only the first N training images of each dataset (0 = all); for smoke tests.")
    parser.add_argument("--resume", type=str, default=None,
                        help="Checkpoint to continue from, with its saved config and settings (the other "
                             "training flags are then ignored).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Start a new run although --out already holds a checkpoint, which the new run's first "
                             "epoch then replaces; without it (or --resume) such a run is refused.")
    parser.add_argument("--stop-after", type=int, default=0,

                        help="Stop after this epoch although the learning-rate schedule spans --epochs (e.g. to fit "
                             "a job time limit); continue later with --resume. 0 = run to the end.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for initialisation, data order and noise.")
    parser.add_argument("--deterministic", action="store_true",
                        help="Use deterministic CUDA kernels (slower), so that a resumed GPU run matches an "
                             "uninterrupted one bit for bit; CPU runs are deterministic without it.")
    parser.add_argument("--device", type=str, default=None,
                        help="cpu, cuda, cuda:N or mps; default: the best available (torchrun picks per rank).")
    return parser


if __name__ == "__main__":
    run_cli(main)
