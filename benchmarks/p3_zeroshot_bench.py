"""Benchmark p3_clip_zeroshot: images/s of its whole classification loop over the bare image encoder's.

    python -m benchmarks.p3_zeroshot_bench --device cpu        # from the repository root

The loop is `p3_clip_zeroshot.classify` over its DataLoader: PNG decoding and preprocessing in worker processes,
the transfer, the image encoder, normalisation, logits against the [D, C] classifier, softmax and top-5. The bare
encoder runs `model.encode_image` on the very same batches, already decoded and in memory. A ratio near 1 means
decoding and I/O are hidden behind the encoder (target >= 0.9). The text side is built once per run; its time is
reported apart, with the ratio it would give end to end on the course's 2,500 images and 100 classes.

Models: the toy world's tiny CLIP (32 px; the encoder costs almost nothing, so its ratio measures the I/O path)
and a randomly initialised full-size ViT-B-32 (speed does not depend on the weights).
"""

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import open_clip
import torch

import p3_clip_models as models
import p3_clip_zeroshot as p3
from toy_data import build_clip_zeroshot, build_tiny_clip
from utils import autocast, get_device, run_cli, seed_everything

COURSE_IMAGES = 2500  # hw2_data/clip_zeroshot/val
COURSE_CLASSES = 100


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device):
    """(`function()`, the seconds it took), with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def bare_encoder(model, batches, device, use_autocast):
    """The image encoder alone on batches already in memory (the reference throughput), in the loop's precision."""
    with torch.inference_mode(), autocast(device, enabled=use_autocast):
        for pixels in batches:
            model.encode_image(pixels.to(device, non_blocking=True))


def bench_model(label, model, preprocess, tokenizer, paths, classnames, templates, repeats, args, device):
    """One result row: loop and bare images/s (medians over repeats), their ratio, the text side's cost, and how
    many images the last loop classified with finite probabilities."""
    model = model.to(device).eval()
    build = partial(p3.build_classifier, model, tokenizer, device=device, batch_size=args.batch_size,
                    use_autocast=args.autocast)
    build(classnames[:1], templates)  # warm-up
    classifier, text_seconds = timed(lambda: build(classnames, templates), device)
    scale = p3.logit_scale(model)
    loader = p3.make_loader(paths, preprocess, args.batch_size, args.workers, device)
    batches = list(loader)  # the same batches, decoded once, for the bare encoder
    bare_encoder(model, batches[:1], device, args.autocast)  # warm-up: first-call allocations and kernel selection
    loop, bare = [], []
    for _ in range(repeats):  # interleaved, so that a busy machine slows both alike
        (top_probs, _), seconds = timed(lambda: p3.classify(model, loader, classifier, device, p3.TOP_K, scale,
                                                            args.autocast), device)
        loop.append(len(paths) / seconds)
        bare.append(len(paths) / timed(lambda: bare_encoder(model, batches, device, args.autocast), device)[1])
    loop_ips, bare_ips = statistics.median(loop), statistics.median(bare)
    prompts_per_second = len(classnames) * len(templates) / text_seconds
    course_seconds = COURSE_IMAGES / loop_ips + COURSE_CLASSES * len(templates) / prompts_per_second
    return {"model": label, "images": len(paths), "loop": loop_ips, "bare": bare_ips, "ratio": loop_ips / bare_ips,
            "prompts_per_second": prompts_per_second,
            "course_ratio": COURSE_IMAGES / course_seconds / bare_ips,
            "classified": len(top_probs), "finite": bool(torch.isfinite(top_probs).all())}


def main(argv=None):
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)
    device = get_device(args.device)
    templates = p3.load_templates(args.prompts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_clip_zeroshot(root, args.seed)
        build_tiny_clip(root, args.seed)
        id2label = p3.read_id2label(root / "clip_zeroshot")
        paths, _ = p3.list_images(root / "clip_zeroshot", id2label)
        classnames = [p3.clean_class_name(name) for name in id2label.values()]

        config = root / models.TINY_CLIP_DIR / f"{models.TINY_CLIP_NAME}.json"
        name, pretrained, quick_gelu = models.resolve_model(str(config), None, root)
        model, preprocess, tokenizer = models.load_clip(name, pretrained, device, quick_gelu)
        rows.append(bench_model(f"tiny toy CLIP ({model.visual.image_size[0]} px)", model, preprocess, tokenizer,
                                paths, classnames, templates, args.repeats, args, device))

        with models.quiet_logging():  # open_clip warns that the weights are random: that is the point here
            model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
        rows.append(bench_model("ViT-B-32, random weights (224 px)", model, preprocess,
                                open_clip.get_tokenizer("ViT-B-32"), paths[:args.vit_images], classnames, templates,
                                args.vit_repeats, args, device))

    print(f"\nDevice: {device}, {p3.precision_name(device, args.autocast)}; batch size {args.batch_size}; "
          f"{args.workers} workers; {len(templates)} template(s); "
          f"median of {args.repeats} run(s) (ViT-B-32: {args.vit_repeats}).")
    print("| model | images | loop images/s | bare encoder images/s | ratio | text prompts/s "
          "| ratio end to end, 2,500 images x 100 classes (projected) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['images']} | {row['loop']:.1f} | {row['bare']:.1f} | {row['ratio']:.2f} "
              f"| {row['prompts_per_second']:.1f} | {row['course_ratio']:.2f} |")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=str, default=None,
                        help="Device to run on, e.g. cpu or cuda (default: the best available).")
    parser.add_argument("--batch-size", type=int, default=32, help="Images and prompts per batch (default: 32).")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader worker processes, as p3_clip_zeroshot.py's --workers (default: 2).")
    parser.add_argument("--prompts", type=str, default="ensemble",
                        help="Prompt templates, as p3_clip_zeroshot.py's --prompts (default: ensemble).")
    parser.add_argument("--autocast", action="store_true",
                        help="Encode under autocast, as p3_clip_zeroshot.py's --autocast (default: fp32).")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Timed runs per model; the median is reported (default: 3).")
    parser.add_argument("--vit-repeats", type=int, default=1,
                        help="Timed runs for ViT-B-32, fewer because it is slow on a CPU (default: 1).")
    parser.add_argument("--vit-images", type=int, default=64,
                        help="Images for ViT-B-32, kept small because it is slow on a CPU (default: 64).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the toy images and tiny model (default: 0).")
    return parser


if __name__ == "__main__":
    run_cli(main)
