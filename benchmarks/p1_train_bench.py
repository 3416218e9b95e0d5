"""P1 training throughput, side by side (images/s): the former data path and EMA against p1_train.py's, and the
speed levers of the training step.

    python benchmarks/p1_train_bench.py --device cuda                 # on a GPU: the numbers that matter
    python benchmarks/p1_train_bench.py --preset toy --steps 5        # on a CPU: the EMA part only
    python benchmarks/p1_train_bench.py --preset toy --levers --steps 20    # the step's levers on this machine

before: each batch gathered on the CPU from the uint8 training images, mapped to [-1, 1] there and copied to the
        device from pageable memory; the EMA one lerp_ per parameter.
after:  p1_train.py's path: the uint8 images on the device once (p1_train.fits_on_device), each batch gathered
        there (p1_train.training_batch); the EMA one torch._foreach_lerp_ (p1_train.ema_update).
Both run p1_train.train_step in p1_train.py's autocast on the same random images, one warm-up step first. On a CPU
the data already lies where the batches are made, so only the EMA differs there.

--levers times p1_train.train_step as p1_train.py runs it ("default") against the same step with the model and the
images in channels_last memory format, with the network under torch.compile (its first call, which compiles, is
reported apart), and at half the batch size (twice the steps, so the same images); the variants alternate
(benchmarks/timing.interleaved_medians), each reports images/s and its ratio to the default.
"""

import argparse
import copy
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import p1_train  # noqa: E402
from benchmarks.timing import interleaved_medians, synchronize  # noqa: E402
from p1_data import to_model_range  # noqa: E402
from p1_model import Diffusion, preset  # noqa: E402
from utils import get_device  # noqa: E402


@torch.no_grad()
def per_parameter_ema(ema, model, decay):
    """The former EMA: one lerp_ kernel per parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def cpu_batch(data, order, step, batch_size, device):
    """The former gather: on the CPU, mapped to [-1, 1] there, then copied as float from pageable memory."""
    idx = order[step * batch_size:(step + 1) * batch_size]
    images, digits, dataset_ids = data
    return (to_model_range(images[idx]).to(device, non_blocking=True), digits[idx].to(device),
            dataset_ids[idx].to(device))


def images_per_second(config, settings, data, device, steps, after):
    """Images/s of `steps` optimizer steps (after one warm-up step) along the former path or p1_train.py's."""
    torch.manual_seed(0)
    diffusion = Diffusion(config).to(device).train()
    ema = copy.deepcopy(diffusion).requires_grad_(False)
    optimization = p1_train.build_optimization(diffusion, settings, steps + 1, device)
    data_device = device if after else torch.device("cpu")
    data = tuple(array.to(data_device) for array in data)
    order = torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(0)).to(data_device)
    gather = p1_train.training_batch if after else cpu_batch
    batches = len(order) // settings.batch_size
    with mock.patch.object(p1_train, "ema_update", p1_train.ema_update if after else per_parameter_ema):
        for step in range(steps + 1):
            if step == 1:
                synchronize(device)
                start = time.perf_counter()
            batch = gather(data, order, step % batches, settings.batch_size, device)
            loss = p1_train.train_step(diffusion.net, diffusion, ema, optimization, batch, settings)
        synchronize(device)
    return steps * settings.batch_size / (time.perf_counter() - start), float(loss)


def random_training_data(count, seed=0):
    """uint8 images [count, 3, 28, 28], digits and dataset ids, as p1_data.load_split returns them."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (count, 3, 28, 28), generator=generator, dtype=torch.uint8),
            torch.randint(0, 10, (count,), generator=generator), torch.randint(0, 2, (count,), generator=generator))


def compare(config, settings, device, steps, count):
    """{"before": (images/s, last loss), "after": (...)} on `count` random training images."""
    data = random_training_data(count)
    return {name: images_per_second(config, settings, data, device, steps, name == "after")
            for name in ("before", "after")}


LEVERS = {"default": {}, "channels_last": {"channels_last": True}, "torch.compile": {"compile": True},
          "half batch": {"batch_divisor": 2}}


def lever_run(config, settings, data, device, steps, channels_last=False, compile=False, batch_divisor=1):
    """A function that runs `steps` * `batch_divisor` steps of p1_train.train_step at batch_size / batch_divisor on
    a fresh model (the same images per call whatever the divisor)."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    diffusion = Diffusion(config).to(device, memory_format=memory_format).train()
    ema = copy.deepcopy(diffusion).requires_grad_(False)
    net = torch.compile(diffusion.net) if compile else diffusion.net
    optimization = p1_train.build_optimization(diffusion, settings, 10**6, device)
    batch_size = settings.batch_size // batch_divisor
    data = tuple(array.to(device) for array in data)
    order = torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(0)).to(device)
    batches = len(order) // batch_size

    def run():
        for step in range(steps * batch_divisor):
            x0, digits, dataset_ids = p1_train.training_batch(data, order, step % batches, batch_size, device)
            batch = (x0.contiguous(memory_format=memory_format), digits, dataset_ids)
            p1_train.train_step(net, diffusion, ema, optimization, batch, settings)
    return run


def compare_levers(config, settings, device, steps, count, repeats, names=tuple(LEVERS)):
    """{lever: (images/s, seconds of its first call)}: the LEVERS `names` ("default" first), interleaved, on `count`
    random images."""
    data = random_training_data(count)
    names = ["default", *(name for name in names if name != "default")]
    runs = [lever_run(config, settings, data, device, steps, **LEVERS[name]) for name in names]
    first_seconds = []
    seconds = interleaved_medians(runs, device, repeats, first_seconds)
    return {name: (steps * settings.batch_size / time_s, first_s)
            for name, time_s, first_s in zip(names, seconds, first_seconds)}


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = get_device(args.device)
    config = preset(args.preset)
    settings = p1_train.TrainSettings(**{**p1_train.TRAIN_PRESETS[args.preset], "batch_size": args.batch_size,
                                         "limit": 0, "seed": 0})
    if args.levers is not None:
        args.levers = args.levers or list(LEVERS)
        results = compare_levers(config, settings, device, args.steps, args.images, args.repeats, args.levers)
        print(f"P1 {args.preset} preset, batch {args.batch_size}, {args.steps} steps per call (the half batch: twice "
              f"as many), median of {args.repeats}, on {device} with {torch.get_num_threads()} threads:")
        for name, (rate, first_s) in results.items():
            ratio = rate / results["default"][0]
            print(f"  {name:<14} {rate:8.1f} images/s  {ratio:5.2f}x   first call {first_s:.1f} s")
        return results
    results = compare(config, settings, device, args.steps, args.images)
    print(f"P1 {args.preset} preset, batch {args.batch_size}, {args.steps} steps on {device}:")
    for name, (rate, loss) in results.items():
        print(f"  {name:<6} {rate:8.1f} images/s   last loss {loss:.4f}")
    print(f"  after / before: {results['after'][0] / results['before'][0]:.2f}x")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(p1_train.TRAIN_PRESETS), default="full",
                        help="Model preset (default: full).")
    parser.add_argument("--batch-size", type=int, default=128, help="Images per step (default: 128).")
    parser.add_argument("--steps", type=int, default=100, help="Timed optimizer steps per variant (default: 100).")
    parser.add_argument("--images", type=int, default=8192, help="Random training images (default: 8192).")
    parser.add_argument("--levers", nargs="*", choices=list(LEVERS), default=None,
                        help="Time these levers of the training step against the default instead (no names: all "
                             f"of {', '.join(LEVERS)}).")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved rounds of --levers (default: 3).")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps; default: the best.")
    return parser


if __name__ == "__main__":
    main()
