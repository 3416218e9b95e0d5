"""P1: train one digit- and dataset-conditional diffusion model on MNIST-M + SVHN.

    python p1_train.py                                     # hw2_data/digits -> checkpoints/p1/ddpm.safetensors
    python p1_train.py --resume checkpoints/p1/ddpm.safetensors
    torchrun --nproc_per_node=4 p1_train.py --preset full  # several GPUs (DistributedDataParallel)

Data: the union of `digits/mnistm` and `digits/svhn` (train.csv, header image_name,label), each sample an image
in [-1, 1], its digit and its dataset id (0 = mnistm, 1 = svhn). No flips: digits are not mirror-symmetric.
The whole training set is held in one uint8 tensor; batches are gathered from it (no DataLoader workers).

Each epoch ends with an atomic checkpoint (model, EMA, optimizer, LR schedule, grad scaler, epoch/step, RNG
states, config), so a kill loses at most the current epoch and `--resume` continues exactly: the data order
and the diffusion noise of an epoch are functions of (seed, epoch, rank) only. Samples come from the EMA weights.
The loss runs under bf16 autocast on CUDA (fp16 + loss scaling where bf16 is missing) and on CPUs with native bf16
(AVX512-BF16 or AMX), fp32 elsewhere.
"""

import argparse
import copy
import csv
import hashlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from p1_model import DATASETS, NUM_DIGITS, Diffusion, P1Config, diffusion_loss, final, preset
from utils import (
    Hw2Error,
    announce_toy_world,
    autocast,
    find_toy_root,
    get_device,
    load_checkpoint,
    load_rgb,
    make_grad_scaler,
    run_cli,
    save_checkpoint,
    save_grid,
    seed_everything,
)

DEFAULT_DATA = "hw2_data/digits"
DEFAULT_OUT = "checkpoints/p1"
CHECKPOINT_NAME = "ddpm.safetensors"
GRID_SAMPLER = dict(sampler="ddim", steps=10)  # quick look at progress; p1_inference.py samples properly


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


# Toy: 2 CPU cores with native bf16, ~600 images/s at batch 128: 80 epochs of 5,748 images = 3,520 steps in ~13
# minutes. Images seen mattered more than steps: 80 epochs at batch 128 (3,520 steps) scored 0.970 on MNIST-M
# against 0.943 for 64 epochs at batch 64 (5,696 steps), 0.91 for 54 and 0.81 for the old 36 (README, P1).
# Full: one modern GPU; the real sets (~135k images) for 60 epochs.
TRAIN_PRESETS = {
    "toy": dict(epochs=28, batch_size=128, lr=2e-3, warmup_steps=200, weight_decay=0.0, ema_decay=0.995,
                grad_clip=1.0, grid_every=6, guidance=5.0),
    "full": dict(epochs=60, batch_size=128, lr=4e-4, warmup_steps=1000, weight_decay=0.0, ema_decay=0.9995,
                 grad_clip=1.0, grid_every=1, guidance=2.0),
}

# ----------------------------------------------------------------------------------------------- data


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


def load_split(data_root, split="train", limit=0):
    """Images (uint8 [N, 3, 28, 28]), digits [N] and dataset ids [N] of both datasets' `split` CSVs.

    Images that are not 28x28 are resized (bicubic) so that every sample matches the network's input.
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise Hw2Error(f"data folder not found: {data_root} (pass --data hw2_data/digits, or run hw2_download.sh)")
    images, digits, dataset_ids = [], [], []
    for dataset_id, name in enumerate(DATASETS):
        rows = read_labels(data_root / name / f"{split}.csv")
        rows = rows[:limit] if limit > 0 else rows
        for file_name, digit in tqdm(rows, desc=f"loading {name} {split}", leave=False):
            path = data_root / name / "data" / file_name
            if not path.is_file():
                raise Hw2Error(f"{data_root / name / f'{split}.csv'} lists {file_name}, but {path} does not exist")
            image = load_rgb(path)
            if image.size != (28, 28):
                image = image.resize((28, 28), resample=3)  # 3 = bicubic
            images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
            digits.append(digit)
            dataset_ids.append(dataset_id)
    return torch.stack(images), torch.tensor(digits), torch.tensor(dataset_ids)


def to_model_range(images_uint8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float() / 127.5 - 1


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
    """ema <- decay * ema + (1 - decay) * model, for every parameter (buffers are copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


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


def rng_states():
    states = {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()), "python": random.getstate()}
    states["numpy"][1] = torch.from_numpy(states["numpy"][1].astype(np.int64))
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_model_checkpoint(path, weights="ema"):
    """Rebuild a Diffusion from one of our checkpoints alone; `weights` is "ema" or "model"."""
    state = load_checkpoint(path)
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


def train(args, config, settings, device, rank, world_size, resume_state=None):
    images, digits, dataset_ids = load_split(args.data, "train", settings.limit)
    steps_per_epoch = len(epoch_order(settings.seed, 0, len(images), rank, world_size)) // settings.batch_size
    if steps_per_epoch == 0:
        raise Hw2Error(f"--batch-size {settings.batch_size} is larger than this process's share of the "
                       f"{len(images)} training images: lower --batch-size")
    total_steps = settings.epochs * steps_per_epoch

    seed_everything(settings.seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    diffusion = Diffusion(config).to(device)
    ema = copy.deepcopy(diffusion).requires_grad_(False)
    seed_everything(settings.seed + rank)  # but a different dropout stream per rank
    net = DistributedDataParallel(diffusion.net) if world_size > 1 else diffusion.net
    optimizer = torch.optim.AdamW(diffusion.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup_steps, total_steps))
    scaler = make_grad_scaler(device)
    start_epoch, step = 0, 0
    if resume_state is not None:
        diffusion.net.load_state_dict(resume_state["model"])
        ema.net.load_state_dict(resume_state["ema"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["lr_scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        start_epoch, step = resume_state["epoch"], resume_state["step"]
        if rank == 0:
            set_rng_states(resume_state["rng"])
    out = Path(args.out)
    if rank == 0:
        print(f"P1 training: {len(images)} images, {sum(p.numel() for p in diffusion.parameters()) / 1e6:.2f} M "
              f"parameters, {world_size} process(es) on {device}, epochs {start_epoch + 1}..{settings.epochs}, "
              f"{steps_per_epoch} steps/epoch, checkpoint {out / CHECKPOINT_NAME}")

    for epoch in range(start_epoch, min(settings.epochs, args.stop_after or settings.epochs)):
        order = epoch_order(settings.seed, epoch, len(images), rank, world_size)
        # the diffusion noise of this epoch depends on (seed, epoch, rank) only, so a resumed run redraws it exactly
        noise_gen = torch.Generator(device).manual_seed((settings.seed * 1_000_003 + epoch) * 64 + rank)
        diffusion.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{settings.epochs}", disable=rank != 0)
        start = time.perf_counter()
        for i in bar:
            idx = order[i * settings.batch_size:(i + 1) * settings.batch_size]
            x0 = to_model_range(images[idx]).to(device, non_blocking=True)
            # bf16 autocast on CUDA, and on CPUs with native bf16 (toy preset: 1.5x the fp32 images/s)
            with autocast(device, cpu_bf16=True):
                loss = diffusion_loss(net, x0, digits[idx].to(device), dataset_ids[idx].to(device), config,
                                      diffusion.alpha_bar, noise_gen)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema_update(ema, diffusion, settings.ema_decay)
            step += 1
            rate = (i + 1) * settings.batch_size * world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

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
                "step": step, "rng": rng_states()})
    return diffusion, ema


def main(argv=None):
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    toy = announce_toy_world(args.data) if rank == 0 else find_toy_root(args.data) is not None
    resume_state = None
    if args.resume is not None:
        _, resume_state = load_model_checkpoint(args.resume, weights="model")
        config = P1Config.from_dict(resume_state["config"])
        settings = TrainSettings(**resume_state["train"])
        if rank == 0:
            print(f"Resuming {args.resume} after epoch {resume_state['epoch']} with its saved config and settings.")
    else:
        name = args.preset or ("toy" if toy else "full")
        overrides = {k: v for k, v in (("schedule", args.schedule), ("prediction", args.prediction)) if v}
        config = preset(name, **overrides)
        values = dict(TRAIN_PRESETS[name], limit=args.limit, seed=args.seed)
        for key in ("epochs", "batch_size", "lr", "grid_every", "guidance"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        settings = TrainSettings(**values)
        if settings.epochs < 1 or settings.batch_size < 1 or settings.lr <= 0 or settings.grid_every < 0:
            raise Hw2Error("--epochs and --batch-size must be >= 1, --grid-every >= 0 and --lr > 0")

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
    parser.add_argument("--stop-after", type=int, default=0,
                        help="Stop after this epoch although the learning-rate schedule spans --epochs (e.g. to fit "
                             "a job time limit); continue later with --resume. 0 = run to the end.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for initialisation, data order and noise.")
    parser.add_argument("--device", type=str, default=None,
                        help="cpu, cuda, cuda:N or mps; default: the best available (torchrun picks per rank).")
    return parser


if __name__ == "__main__":
    run_cli(main)
