"""P3: Custom Diffusion on Stable Diffusion v1.4 -- several new concepts in one model, trained jointly.

    # the input.json concepts and the extra cat photos, trained together into one folder
    python p3_custom_diffusion.py train --input-json hw2_data/textual_inversion/input.json \\
        --concept hw2_data/textual_inversion/cat "<cat1>" cat --out checkpoints/p3_cd
    # the grader's layout (25 images per prompt), or free prompts that mix the concepts
    python p3_custom_diffusion.py generate hw2_data/textual_inversion/input.json out/p3_cd MODEL \\
        --weights checkpoints/p3_cd
    python p3_custom_diffusion.py generate hw2_data/textual_inversion/input.json out/p3_cd_free MODEL \\
        --weights checkpoints/p3_cd --prompt "A <new1> next to a <cat1> in the style of <new2>." --num-images 4
    # the grader's CLIP scores against input.json's baselines
    python p3_custom_diffusion.py score hw2_data/textual_inversion/input.json out/p3_cd

Custom Diffusion (Kumari et al., CVPR 2023). Each cross-attention layer of the UNet reads the text features c
through keys K = W_k c and values V = W_v c; attention softmax(Q K^T / sqrt(d)) V mixes the values into the image
features Q = W_q f. Fine-tuning moves W_k and W_v far more than any other weight (their sec. 3.1), so only they are
trained, in every cross-attention layer, together with one new token per concept (initialised from a word for its
class); the rest of the UNet, the VAE and the text encoder stay frozen. The loss is the latent diffusion objective
|| eps - eps_theta(z_t, t, c(y)) ||^2 on the concepts' photos, plus, weighted by lambda, the same objective on
images of each concept's class captioned with the class word (prior preservation: the model keeps what "dog"
means while W_k, W_v change). Several concepts are trained jointly (their sec. 3.2): each batch mixes the
concepts' photos, each captioned with its own token. The paper's regularisation images are 200 real photos
retrieved by caption; here they are a folder you give (`--class-data-dir`) or images of the class prompt generated
by the base model before training.

MODEL (and `--model`) is a hub id, a diffusers folder, or one `.ckpt` / `.safetensors` file such as the course's
SD v1.4 `model.ckpt`. On a toy world (built by toy_data.py) every subcommand defaults to the tiny random models under
`hw2_data/toy_models/`. The weights are saved in diffusers' Custom Diffusion format (see custom_diffusion_io.py).
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

import p3_textual_inversion as ti
from custom_diffusion_io import (
    check_weights_folder,
    load_custom_diffusion,
    save_custom_diffusion,
    set_processors,
    trainable_processors,
)
from p3_concepts import (
    TEMPLATES,
    TOKEN_PATTERN,
    add_generation_arguments,
    add_placeholder_tokens,
    check_destination,
    check_generation_args,
    check_tokens,
    concept_image_paths,
    concept_property,
    denoising_loss,
    encode_latents,
    expand_rows,
    generate_folders,
    image_seed,
    load_concept_images,
    output_jobs,
    read_input_json,
    restore_frozen_rows,
    rng_state,
    sample_batch,
    sample_images,
    set_rng_state,
    set_scheduler,
    slice_rows,
)
from p3_score import add_score_command, run_score
from sd_v1 import DEFAULT_MODEL, default_model, load_sd_pipeline
from utils import (
    Hw2Error,
    announce_toy_world,
    atomic_write_text,
    get_device,
    load_checkpoint,
    run_cli,
    save_checkpoint,
    save_grid,
    save_png,
    seed_everything,
)

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "checkpoints" / "p3_cd"  # train --out, generate --weights
STATE_FILE = "train_state.safetensors"  # everything needed to resume training
ADAM_WEIGHT_DECAY = 1e-2  # diffusers' Custom Diffusion example
MAX_GRAD_NORM = 1.0  # diffusers' Custom Diffusion example
STEPS = {"one": 250, "several": 500}  # the paper's steps for one concept and for joint training
CLASS_IMAGE_STEPS = 25  # DPM-Solver++ steps per generated class image
CLASS_GUIDANCE = 7.5  # the pipeline's default, with which diffusers' example generates its class images
CLASS_SEED_INDEX = 2  # image_seed(seed, 2, k): class images draw other noise than generate's (0, ...) and (1, ...)


@dataclass(frozen=True)
class Concept:
    """One concept: its photos, its new token, the word that starts the token (and names its class), object/style."""
    folder: Path
    token: str
    init_text: str
    prop: str

    @property
    def class_prompt(self):
        """The caption of the concept's class images: the first template of its kind around the class word."""
        return TEMPLATES[self.prop][0].format(self.init_text)


# ------------------------------------------------------------------------------------------ class images


def generated_class_images(pipe, concept, folder, count, resolution, seed, autocast, model):
    """`count` images of the concept's class prompt by the (still unchanged) base model, cached in `folder`.

    Images already there are kept; image k always starts from the noise of image_seed(seed, 2, k), so an
    interrupted run completes the same set. Returns the folder."""
    folder = Path(folder)
    source = {"model": str(model), "prompt": concept.class_prompt, "count": count, "resolution": resolution,
              "seed": seed, "steps": CLASS_IMAGE_STEPS, "guidance": CLASS_GUIDANCE}
    manifest = folder / "source.json"
    if manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")) != source:
        raise Hw2Error(f"{folder} holds class images made with other settings (see {manifest}); delete that folder "
                       f"or pass another --out")
    atomic_write_text(manifest, json.dumps(source, indent=2))
    missing = [k for k in range(count) if not (folder / f"{k:04d}.png").is_file()]
    if missing:
        model_scheduler = pipe.scheduler
        set_scheduler(pipe, "dpm")
        progress = tqdm(total=len(missing), desc=f"class images {concept.class_prompt!r}", unit="img")
        for first in range(0, len(missing), 4):
            batch = missing[first:first + 4]
            with autocast:
                seeds = [image_seed(seed, CLASS_SEED_INDEX, k) for k in batch]
                images = sample_images(pipe, concept.class_prompt, seeds, CLASS_IMAGE_STEPS, CLASS_GUIDANCE, resolution)
            for k, image in zip(batch, images):
                save_png(image * 2 - 1, folder / f"{k:04d}.png")
            progress.update(len(batch))
        progress.close()
        pipe.scheduler = model_scheduler
    return folder


def class_folders(args, pipe, concepts, out_dir, resolution, autocast, model):
    """{token: folder of class images} for prior preservation: --class-data-dir, else generated; {} when off."""
    given = dict(args.class_data_dir or [])
    if not args.num_class_images and not given:
        return {}
    return {c.token: Path(given[c.token]) if c.token in given else
            generated_class_images(pipe, c, out_dir / "class_images" / c.token.strip("<>"), args.num_class_images,
                                   resolution, args.seed, autocast, model)
            for c in concepts}


# ---------------------------------------------------------------------------------------------- training


def joint_batch(concepts, photos, class_photos, tokenizer, resolution, batch_size):
    """`batch_size` views of random concepts' photos, each captioned with a template around its own token, then
    (with prior preservation) one class image of the same concept per view, captioned with its class prompt.

    Returns (pixels 2B or B x 3 x res x res, input_ids 2B or B x 77, B)."""
    picks = torch.randint(len(concepts), (batch_size,)).tolist()
    parts = [sample_batch(photos[k], tokenizer, TEMPLATES[concepts[k].prop], concepts[k].token, resolution,
                          concepts[k].prop, 1) for k in picks]
    if class_photos:
        parts += [sample_batch(class_photos[k], tokenizer, ["{}"], concepts[k].class_prompt, resolution,
                               concepts[k].prop, 1) for k in picks]
    return torch.cat([p for p, _ in parts]), torch.cat([ids for _, ids in parts]), batch_size


def train_step(pipe, noise_scheduler, next_batch, grad_accum, optimizer, scaler, autocast, original, new_ids,
               prior_loss_weight):
    """One optimizer step over `grad_accum` micro-batches: instance loss + lambda * prior loss, gradients of the
    frozen embedding rows zeroed (as diffusers' example does) before clipping, frozen rows restored after the step.

    Noise and timesteps come from torch's global RNG (saved with the resume state). Returns the last loss."""
    device = pipe.unet.device
    for _ in range(grad_accum):
        pixels, input_ids, num_instance = next_batch()
        z_0 = encode_latents(pipe.vae, pixels.to(device))
        eps = torch.randn_like(z_0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z_0.shape[0],), device=device)
        with autocast:
            errors = denoising_loss(pipe.unet, pipe.text_encoder, noise_scheduler, z_0, input_ids.to(device), eps, t,
                                    per_sample=True)
        loss = errors[:num_instance].mean()
        if len(errors) > num_instance:
            loss = loss + prior_loss_weight * errors[num_instance:].mean()
        scaler.scale(loss / grad_accum).backward()
    embedding = pipe.text_encoder.get_input_embeddings().weight
    frozen = torch.ones(embedding.shape[0], dtype=torch.bool, device=embedding.device)
    frozen[new_ids] = False
    embedding.grad[frozen] = 0
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], MAX_GRAD_NORM)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    restore_frozen_rows(embedding, original, new_ids)
    return loss.item()


def run_config(args, concepts, class_dirs, model):
    """The settings a resumed run must share with the saved one (steps may grow, the rest may not change)."""
    return {"concepts": [[c.token, c.init_text, c.prop] for c in concepts], "model": str(model),
            "class_data": {token: str(folder) for token, folder in sorted(class_dirs.items())},
            "num_class_images": args.num_class_images, "prior_loss_weight": args.prior_loss_weight, "lr": args.lr,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "resolution": args.resolution,
            "seed": args.seed, "mixed_precision": args.mixed_precision}


def read_state(path, config):
    """The saved resume state, or None; refuses a state saved with other settings."""
    if not path.exists():
        return None
    state = load_checkpoint(path)
    changed = [key for key, value in config.items() if state["config"].get(key) != value]
    if changed:
        raise Hw2Error(f"{path} is from a run with other settings ({', '.join(changed)}); pass another --out or "
                       f"delete that folder to start over")
    return state


def train_concepts(args, concepts, model, device):
    """Train all `concepts` jointly; write the weights, the token files and the resume state to args.out.

    Returns the pipeline with the trained processors installed and the new tokens (tests compare it with diffusers)."""
    out_dir = Path(args.out)
    steps = args.steps or STEPS["one" if len(concepts) == 1 else "several"]
    pipe = load_sd_pipeline(model)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's own training noise schedule
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    config = run_config(args, concepts, dict(args.class_data_dir or []), model)
    state = read_state(out_dir / STATE_FILE, config)
    photos = [load_concept_images(c.folder, resolution) for c in concepts]
    new_ids = [add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, c.token, 1, c.init_text)[0]
               for c in concepts]
    processors = trainable_processors(pipe.unet)  # from the fp32 weights, before the UNet is cast
    embedding, autocast, scaler = ti.prepare_for_training(pipe, device, args.mixed_precision,
                                                          args.gradient_checkpointing)
    class_dirs = class_folders(args, pipe, concepts, out_dir, resolution, autocast, model)  # with the base UNet
    class_photos = [load_concept_images(class_dirs[c.token], resolution) for c in concepts] if class_dirs else []
    set_processors(pipe.unet, {name: p.to(device).requires_grad_(True) for name, p in processors.items()})
    original = embedding.weight.detach().clone()
    kv_params = [p for processor in processors.values() for p in processor.parameters()]
    # the paper's rate is per image (8e-5 for 8 images): scaled by the images per step, class images included,
    # as diffusers' example does with --scale_lr
    images_per_step = args.batch_size * args.grad_accum * (2 if class_photos else 1)
    optimizer = torch.optim.AdamW([embedding.weight, *kv_params], lr=args.lr * images_per_step,
                                  weight_decay=ADAM_WEIGHT_DECAY)
    tokens = [c.token for c in concepts]
    vocab = embedding.weight.shape[0]

    start = 0
    seed_everything(args.seed)
    if state is not None:
        start = state["step"]
        with torch.no_grad():
            embedding.weight[new_ids] = state["embeds"].to(device)
        for name, processor in processors.items():
            processor.load_state_dict({key.removeprefix(f"{name}."): value for key, value in state["kv"].items()
                                       if key.startswith(f"{name}.")})
        saved = state["optimizer"]
        saved["state"][0] = expand_rows(saved["state"][0], new_ids, embedding.weight)  # param 0: the embeddings
        optimizer.load_state_dict(saved)
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        if start >= steps:
            print(f"{', '.join(tokens)} already trained to {start} steps in {out_dir}; raise --steps to train further.")
            return pipe
        print(f"Resuming {', '.join(tokens)} from step {start} ({out_dir / STATE_FILE}).")

    def save(step):
        # the outputs first, then the state that says they are complete: an interrupted save is redone on resume
        save_custom_diffusion(pipe.unet, tokens, embedding.weight[new_ids], out_dir)
        optimizer_state = optimizer.state_dict()
        optimizer_state["state"][0] = slice_rows(optimizer_state["state"][0], new_ids, vocab)
        save_checkpoint(out_dir / STATE_FILE, {
            "step": step, "config": config, "embeds": embedding.weight[new_ids], "kv": processor_weights(processors),
            "optimizer": optimizer_state, "scaler": scaler.state_dict(), "rng": rng_state(device)})

    def next_batch():
        return joint_batch(concepts, photos, class_photos, pipe.tokenizer, resolution, args.batch_size)

    progress = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {' '.join(tokens)}")
    for step in progress:
        if args.validate_every and step % args.validate_every == 0:
            rows = [ti.validation_images(pipe, ti.VALIDATION_PROMPT[c.prop].format(c.token), resolution, autocast,
                                         args.seed) for c in concepts]
            save_grid(torch.cat(rows) * 2 - 1, out_dir / "validation" / f"step{step:06d}.png",
                      nrow=ti.VALIDATION_IMAGES)
        loss = train_step(pipe, noise_scheduler, next_batch, args.grad_accum, optimizer, scaler, autocast, original,
                          new_ids, args.prior_loss_weight)
        progress.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            save(step + 1)
    print(f"Wrote {out_dir} ({', '.join(tokens)}; {sum(p.numel() for p in kv_params):,} key/value weights in "
          f"{len(processors)} cross-attention layers; {steps} steps).")
    return pipe


def processor_weights(processors):
    """{`<layer>.processor.<param>`: tensor} of the trainable processors (the keys of the weights file)."""
    return {f"{name}.{key}": value for name, processor in processors.items()
            for key, value in processor.state_dict().items()}


def parse_concepts(args):
    """The concepts to train: every entry of --input-json, then each --concept; all checked before any work."""
    concepts = []
    if args.input_json is not None:
        entries = read_input_json(args.input_json, ("token_name", "src_image", "prompt"))
        concepts += [Concept(Path(args.input_json).parent / name, entry["token_name"], entry["src_image"],
                             concept_property(entry)) for name, entry in entries.items()]
    styles = set(args.style or [])
    for folder, token, init_text in args.concept or []:
        if not TOKEN_PATTERN.fullmatch(token):
            raise Hw2Error(f"--concept {folder} {token!r} {init_text!r}: the token must be a word in angle brackets, "
                           f"such as \"<cat1>\"")
        concepts.append(Concept(Path(folder), token, init_text, "style" if token in styles else "object"))
    if not concepts:
        raise Hw2Error("train needs --input-json FILE and/or --concept DIR TOKEN INIT_WORD (repeatable)")
    tokens = [c.token for c in concepts]
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise Hw2Error(f"token {repeated[0]} is given to more than one concept; each concept needs its own token")
    for token in tokens:
        if any(separator in token for separator in "/\\"):
            raise Hw2Error(f"token {token!r} names files (<token>.safetensors): it cannot hold / or \\")
    given = {t for t, _ in args.class_data_dir or []}
    for flag, named in (("--style", styles), ("--class-data-dir", given)):
        unknown = sorted(named - set(tokens))
        if unknown:
            raise Hw2Error(f"{flag} {unknown[0]}: no concept has that token (tokens: {', '.join(tokens)})")
    without = [t for t in tokens if t not in given]
    if given and without and not args.num_class_images:
        raise Hw2Error(f"--num-class-images 0 with --class-data-dir for some concepts: give one for "
                       f"{', '.join(without)} too, or class images to generate for it")
    for concept in concepts:
        concept_image_paths(concept.folder)
    for _, folder in args.class_data_dir or []:
        concept_image_paths(folder)
    return concepts


def run_train(args):
    for flag, value in (("--steps", args.steps or 1), ("--batch-size", args.batch_size),
                        ("--grad-accum", args.grad_accum), ("--save-every", args.save_every)):
        if value < 1:
            raise Hw2Error(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--num-class-images", args.num_class_images), ("--prior-loss-weight", args.prior_loss_weight),
                        ("--validate-every", args.validate_every)):
        if value < 0:
            raise Hw2Error(f"{flag} must be at least 0, got {value}")
    concepts = parse_concepts(args)
    announce_toy_world(concepts[0].folder)
    model = args.model or default_model(concepts[0].folder)
    device = get_device(args.device)
    if args.mixed_precision == "fp16" and device.type == "cpu":
        print("note: fp16 autocast on CPU is slow and partial; bf16 is the CPU choice.")
    for concept in concepts:
        print(f"Concept {concept.folder}: {concept.token} ({concept.prop}), initialised from {concept.init_text!r}; "
              f"class prompt {concept.class_prompt!r}.")
    return train_concepts(args, concepts, model, device)


# -------------------------------------------------------------------------------------------- generation


def run_generate(args):
    announce_toy_world(args.input_json)
    data = read_input_json(args.input_json, ("token_name", "prompt"))
    check_generation_args(args)
    out_dir = Path(args.out_dir)
    jobs = output_jobs(data, out_dir, args.prompt)
    for folder, stem, _, _ in jobs:
        check_destination(folder, stem)
    weights = Path(args.weights or DEFAULT_WEIGHTS_DIR)
    check_weights_folder(weights)  # before the (slow) model load
    device = get_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # fp16 halves SD's time and memory on a GPU
    model = args.model or default_model(args.input_json)
    pipe = load_sd_pipeline(model, dtype)
    set_scheduler(pipe, args.scheduler)
    files = load_custom_diffusion(pipe, weights)
    check_tokens(pipe, [prompt for _, _, prompt, _ in jobs], "--prompt" if args.prompt else args.input_json,
                 fix=f"train a concept with that token into {weights}, or pass --weights with the folder that has it")
    pipe.to(device)
    print(f"Model {model}; Custom Diffusion weights {weights} (tokens {', '.join(p.stem for p in files)}); "
          f"{args.scheduler} scheduler, {args.steps} steps.")
    start = time.perf_counter()
    count = generate_folders(pipe, jobs, args)
    seconds = time.perf_counter() - start
    print(f"Wrote {count} images to {out_dir} in {seconds:.1f} s ({count / seconds:.2f} images/s on {device}).")


# --------------------------------------------------------------------------------------------------- CLI


def main(argv=None):
    args = build_parser().parse_args(argv)
    diffusers_logging.set_verbosity_error()  # hide load-time chatter (e.g. "install accelerate"); errors still show
    return {"train": run_train, "generate": run_generate, "score": run_score}[args.command](args)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Learn new tokens and cross-attention keys/values, jointly.")
    train.add_argument("--input-json", default=None,
                       help="Train every concept of this input.json (its photos are in the sub-folders beside "
                            "it; each token starts from its src_image word).")
    train.add_argument("--concept", nargs=3, action="append", default=None,
                       metavar=("DIR", "TOKEN", "INIT_WORD"),
                       help="A concept to train as well: its photo folder, its new token (e.g. \"<cat1>\") and "
                            "the word for its class (e.g. cat); repeatable.")
    train.add_argument("--style", action="append", default=None, metavar="TOKEN",
                       help="Treat the --concept with this token as a style (style templates, no flips); "
                            "input.json concepts are styles when their prompts say \"style of <token>\".")
    train.add_argument("--model", default=None,
                       help=f"Hub id, diffusers folder or .ckpt/.safetensors file (default: {DEFAULT_MODEL}, "
                            f"or the tiny toy model on a toy world).")
    train.add_argument("--steps", type=int, default=None,
                       help=f"Optimizer steps (default: {STEPS['one']} for one concept, {STEPS['several']} for "
                            f"several, as in the paper).")
    train.add_argument("--lr", type=float, default=1e-5,
                       help="AdamW learning rate per image; a step uses lr x its images (concept and class images).")
    train.add_argument("--batch-size", type=int, default=2,
                       help="Concept images per forward pass (with prior preservation, as many class images "
                            "are added).")
    train.add_argument("--grad-accum", type=int, default=1, help="Forward passes accumulated per optimizer step.")
    train.add_argument("--resolution", type=int, default=None,
                       help="Training image size in pixels (default: the model's own, 512 for SD v1.4).")
    train.add_argument("--num-class-images", type=int, default=200,
                       help="Class images per concept for prior preservation, generated by the base model into "
                            "OUT/class_images/ unless --class-data-dir gives them (0: no prior preservation).")
    train.add_argument("--class-data-dir", nargs=2, action="append", default=None, metavar=("TOKEN", "DIR"),
                       help="A folder of class images (e.g. real photos of dogs) for the concept of TOKEN; "
                            "repeatable. Such folders are used even with --num-class-images 0.")
    train.add_argument("--prior-loss-weight", type=float, default=1.0,
                       help="Weight lambda of the class images' loss.")
    train.add_argument("--mixed-precision", choices=list(ti.DTYPES), default="no",
                       help="Run the frozen VAE/UNet in fp16 or bf16 under autocast (no: fp32); the trained "
                            "weights stay fp32.")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="Recompute UNet and text-encoder activations in backward to save memory.")
    train.add_argument("--validate-every", type=int, default=0,
                       help="Save a grid of sample images per concept every N steps under OUT/validation "
                            "(0: never).")
    train.add_argument("--save-every", type=int, default=100,
                       help="Write the weights and the resume state every N steps.")
    train.add_argument("--seed", type=int, default=0,
                       help="Seed for crops, templates, noise, timesteps and class images.")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available).")
    train.add_argument("--out", default=str(DEFAULT_WEIGHTS_DIR),
                       help="Output folder (the weights, one <token>.safetensors per token, the resume state; "
                            "default: checkpoints/p3_cd in this repository); a run there is resumed.")

    generate = commands.add_parser("generate", help="Generate the grader's image folders (or free prompts).")
    generate.add_argument("input_json", help="The course's input.json (concepts, tokens, prompts).")
    generate.add_argument("out_dir", help="Output folder: OUT_DIR/{concept}/{prompt}/source{c}_prompt{p}_{i}.png.")
    generate.add_argument("model", nargs="?", default=None,
                          help="SD v1.4 .ckpt/.safetensors file, diffusers folder or hub id (default: the toy model "
                               f"on a toy world, else {DEFAULT_MODEL}).")
    generate.add_argument("--weights", default=None,
                          help="Folder written by train (default: checkpoints/p3_cd in this repository).")
    add_generation_arguments(generate)
    add_score_command(commands)
    return parser


if __name__ == "__main__":
    run_cli(main)
