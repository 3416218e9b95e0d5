"""What both P3 training scripts share: precision and memory settings, the diffusion loss, resume state, validation.

Textual inversion (p3_textual_inversion.py) and Custom Diffusion (p3_custom_diffusion.py) both
- pick mixed precision and gradient checkpointing for the device, fp16 with checkpointing on CUDA so that SD v1.4
  at 512 px trains on a 12-16 GB card (`add_precision_arguments`, `resolve_precision`),
- freeze Stable Diffusion and put it on the device in that precision (`prepare_for_training`),
- minimise the latent diffusion loss || eps - eps_theta(z_t, t, c) ||^2 (`denoising_loss`),
- keep every embedding row but the new tokens' bit-identical (`restore_frozen_rows`),
- save a few KB of optimizer state and the RNG state to resume (`slice_rows`, `expand_rows`, `rng_state`),
- and sample a few validation images of each concept as training goes (`validation_images`).
Neither script imports the other: what they share lives here and in p3_concepts.py.
"""

import argparse

import torch
import torch.nn.functional as F

from p3_concepts import sample_images
from utils import Hw2Error

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VALIDATION_PROMPT = {"object": "a photo of a {}", "style": "a painting in the style of {}"}
VALIDATION_IMAGES = 4
VALIDATION_STEPS = 25

# ------------------------------------------------------------------------------------------ precision, memory


def add_precision_arguments(parser):
    """--mixed-precision and --gradient-checkpointing, whose defaults depend on the device (`resolve_precision`)."""
    parser.add_argument("--mixed-precision", choices=list(DTYPES), default=None,
                        help="Run the frozen VAE and UNet in fp16 or bf16 under autocast; the text encoder, which "
                             "holds the trained embedding table, and every trained weight keep fp32 (no: all fp32; "
                             "default: fp16 with CUDA, no elsewhere).")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="Recompute UNet and text-encoder activations in backward: much less memory for about "
                             "a third more compute per step (default: on with CUDA, off elsewhere).")


def resolve_precision(args, device):
    """Fill in --mixed-precision and --gradient-checkpointing left unset: fp16 with checkpointing on CUDA (diffusers'
    examples on a 12-16 GB card), fp32 without elsewhere (CPU autocast is partial, and RAM is not the limit)."""
    cuda = device.type == "cuda"
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if cuda else "no"
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = cuda
    if args.mixed_precision == "fp16" and device.type == "cpu":
        print("note: fp16 autocast on CPU is slow and partial; bf16 is the CPU choice.")


def describe_precision(args):
    """The run header's words for the precision settings, e.g. 'fp16 with gradient checkpointing'."""
    precision = "fp32" if args.mixed_precision == "no" else args.mixed_precision
    return f"{precision} {'with' if args.gradient_checkpointing else 'without'} gradient checkpointing"


def prepare_for_training(pipe, device, mixed_precision, gradient_checkpointing):
    """Freeze VAE, UNet and text encoder and move them to `device`; only the input embedding table learns.

    The VAE and UNet (88% of SD v1's weights) run in the mixed-precision dtype. The text encoder stays fp32, as in
    diffusers' example: it holds the trainable table (small updates would vanish in fp16), and CPU autocast would
    feed its fp32 activations to half-precision LayerNorm weights.

    Returns (the embedding module, the autocast context, the GradScaler)."""
    weight_dtype = DTYPES[mixed_precision]
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.vae.to(device, weight_dtype).eval()
    pipe.unet.to(device, weight_dtype).train()  # train(): gradient checkpointing is active only in training mode
    pipe.text_encoder.to(device, torch.float32).train()
    embedding = pipe.text_encoder.get_input_embeddings()
    embedding.weight.requires_grad_(True)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.text_encoder.activation_checkpointing_enable()
    autocast = torch.autocast(torch.device(device).type, dtype=weight_dtype, enabled=mixed_precision != "no")
    # loss scaling only for fp16 (bf16 has fp32's range); utils.make_grad_scaler picks its own dtype, so not used
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=mixed_precision == "fp16")
    return embedding, autocast, scaler


# ------------------------------------------------------------------------------------------------------ loss


def encode_latents(vae, pixels):
    """z_0 ~ the VAE posterior of images in [-1, 1], times the VAE's scaling factor (0.18215 for SD v1)."""
    with torch.no_grad():
        return vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor


def diffusion_target(noise_scheduler, z_0, eps, t):
    """What the UNet predicts under the model's own parameterisation: eps, v = sqrt(a) eps - sqrt(1-a) z_0, or z_0."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(z_0, eps, t)
    if kind == "sample":
        return z_0
    raise Hw2Error(f"the model's scheduler has prediction_type {kind!r}; P3 training handles "
                   f"epsilon, v_prediction and sample")


def denoising_loss(unet, text_encoder, noise_scheduler, z_0, input_ids, eps, t, per_sample=False):
    """The latent diffusion objective (textual inversion's eq. 2): MSE between the UNet's prediction at z_t and
    its target. z_0: B x 4 x h x w VAE latents (already x scaling_factor); eps: noise like z_0; t: B timesteps.
    `per_sample`: the B per-sample means instead of their mean (for losses that weigh parts of a batch apart).
    """
    z_t = noise_scheduler.add_noise(z_0, eps, t)  # q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I)
    c = text_encoder(input_ids)[0]  # B x 77 x D, the conditioning c_theta(y)
    prediction = unet(z_t.to(unet.dtype), t, c.to(unet.dtype)).sample
    target = diffusion_target(noise_scheduler, z_0, eps, t)
    if per_sample:
        return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    return F.mse_loss(prediction.float(), target.float())


def restore_frozen_rows(weight, original, trainable_ids):
    """Copy every row but `trainable_ids` back from `original`, so the rest of the vocabulary stays bit-identical.

    AdamW's weight decay and the gradients of the template words would otherwise move them.
    """
    frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    frozen[trainable_ids] = False
    with torch.no_grad():
        weight[frozen] = original[frozen]


# ---------------------------------------------------------------------------------------------- resume state


def slice_rows(state, ids, num_rows):
    """Keep only rows `ids` of every [num_rows, ...] tensor in a nested optimizer state (the others are reset each
    step anyway, and AdamW is elementwise): the saved state is a few KB instead of two copies of the vocabulary."""
    if isinstance(state, torch.Tensor):
        return state[ids] if state.dim() > 0 and state.shape[0] == num_rows else state
    if isinstance(state, dict):
        return {key: slice_rows(value, ids, num_rows) for key, value in state.items()}
    if isinstance(state, list):
        return [slice_rows(value, ids, num_rows) for value in state]
    return state


def expand_rows(state, ids, like):
    """Inverse of `slice_rows`: put the kept rows back into zero tensors shaped like the parameter `like`."""
    if isinstance(state, torch.Tensor):
        if state.dim() == like.dim() and state.shape[1:] == like.shape[1:] and state.shape[0] == len(ids):
            full = torch.zeros_like(like, dtype=state.dtype)
            full[ids] = state.to(like.device)
            return full
        return state
    if isinstance(state, dict):
        return {key: expand_rows(value, ids, like) for key, value in state.items()}
    if isinstance(state, list):
        return [expand_rows(value, ids, like) for value in state]
    return state


def rng_state(device):
    """torch's RNG state (CPU, and the CUDA device's), saved with a resume state."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------------ validation


def validation_images(pipe, prompt, resolution, autocast, seed):
    """A few images of the concept with the weights as they are now (fixed seeds: comparable across steps)."""
    with autocast:
        return sample_images(pipe, prompt, [seed + i for i in range(VALIDATION_IMAGES)], VALIDATION_STEPS, 7.5,
                             resolution)


def validation_prompt(token, prop):
    """The validation prompt of a concept: "a photo of a <token>" (objects), "a painting in the style of <token>"."""
    return VALIDATION_PROMPT[prop].format(token)
