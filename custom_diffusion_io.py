"""Custom Diffusion's files in diffusers' own format: the cross-attention key/value weights and the new tokens.

    from diffusers import StableDiffusionPipeline
    from custom_diffusion_io import load_custom_diffusion
    pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
    load_custom_diffusion(pipe, "checkpoints/p3_cd")        # the folder `p3_custom_diffusion.py train` wrote

Such a folder holds
- `pytorch_custom_diffusion_weights.safetensors`: `<layer>.processor.to_k_custom_diffusion.weight` and
  `<layer>.processor.to_v_custom_diffusion.weight` for every cross-attention layer (`...attn2`), the keys that
  diffusers' `unet.save_attn_procs` writes;
- `<token>.safetensors` per new token, {token: [1, D]}, the file `pipe.load_textual_inversion` reads.

diffusers 0.42's `unet.load_attn_procs(folder, weight_name=...)` parses such a file but installs the processors only
when its private `_pipeline` argument is given: the documented call leaves the base model in place, silently. Given
`_pipeline`, it refuses the file, because the self-attention layers' entries (empty dicts, which safetensors cannot
store) are missing (diffusers issue #9320). `install_processors` therefore takes diffusers' own parsing and its
`CustomDiffusionAttnProcessor`, keeps the UNet's own processors for the self-attention layers, installs everything
and checks that it took.
"""

from pathlib import Path

import torch
from diffusers.loaders.unet import CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from p3_concepts import load_embeds, save_learned_embeds, token_file_path
from utils import Hw2Error, atomic_write_bytes

WEIGHTS_FILE = CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE  # pytorch_custom_diffusion_weights.safetensors
STATE_FILE = "train_state.safetensors"  # p3_custom_diffusion.py train: everything needed to resume
CUSTOM_KEY = "_custom_diffusion"  # in every trained parameter's name: to_k_custom_diffusion, to_v_custom_diffusion


def cross_attention_layers(unet):
    """{processor name: Attention module} of every cross-attention layer (attn2 of each transformer block)."""
    layers = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.removesuffix(".processor"))
        if attention.is_cross_attention:
            layers[name] = attention
    return layers


def trainable_processors(unet):
    """A Custom Diffusion processor per cross-attention layer whose trainable W_k, W_v start as fp32 copies of the
    layer's own to_k, to_v: installed, the model computes exactly what the base model does.

    Call it while the UNet is still fp32; copies of half-precision weights would start off the base model."""
    processors = {}
    for name, attention in cross_attention_layers(unet).items():
        processor = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False,
                                                    hidden_size=attention.to_k.out_features,
                                                    cross_attention_dim=attention.to_k.in_features)
        processor.load_state_dict({"to_k_custom_diffusion.weight": attention.to_k.weight,
                                   "to_v_custom_diffusion.weight": attention.to_v.weight})
        processors[name] = processor.to(attention.to_k.weight.device, torch.float32)
    return processors


def set_processors(unet, processors):
    """Install `processors` ({name: processor}) and keep every other layer's own processor."""
    unet.set_attn_processor({**unet.attn_processors, **processors})


def processor_state_dict(unet):
    """The trained weights under diffusers' keys (a processor is a submodule of its Attention layer), fp32."""
    return {key: value.detach().float().cpu().contiguous() for key, value in unet.state_dict().items()
            if CUSTOM_KEY in key}


def save_custom_diffusion(unet, tokens, rows, folder):
    """Write WEIGHTS_FILE and `<token>.safetensors` per token (rows[k] is tokens[k]'s [D] embedding), atomically."""
    folder = Path(folder)
    state = processor_state_dict(unet)
    atomic_write_bytes(folder / WEIGHTS_FILE, safetensors_save(state, metadata={"format": "pt"}))
    for token, row in zip(tokens, rows):
        save_learned_embeds(token_file_path(folder, token), token, row[None])


def install_processors(unet, state_dict, source):
    """Install the Custom Diffusion weights `state_dict` (diffusers' keys) in `unet`; return the processors.

    diffusers parses the file into a `CustomDiffusionAttnProcessor` per layer; every layer must be one of this
    UNet's cross-attention layers with matching shapes, and every cross-attention layer must be covered."""
    if not any(CUSTOM_KEY in key for key in state_dict):
        raise Hw2Error(f"{source} holds no Custom Diffusion weights (no key contains {CUSTOM_KEY!r})")
    try:
        processors = unet._process_custom_diffusion(state_dict)  # diffusers' own parsing and processor class
    except (KeyError, RuntimeError, ValueError, AttributeError) as err:
        raise Hw2Error(f"{source} is not in diffusers' Custom Diffusion format ({type(err).__name__}: "
                       f"{str(err).strip().splitlines()[0]})") from err
    layers = cross_attention_layers(unet)
    for name, processor in processors.items():
        if name not in layers:
            raise Hw2Error(f"{source} has weights for {name}, which is not a cross-attention layer of this UNet; "
                           f"was it trained on another model?")
        expected = (layers[name].to_k.out_features, layers[name].to_k.in_features)
        for kind in ("to_k", "to_v"):
            module = getattr(processor, f"{kind}_custom_diffusion", None)
            if module is None or tuple(module.weight.shape) != expected:
                shape = None if module is None else tuple(module.weight.shape)
                raise Hw2Error(f"{source}: {name}.{kind}_custom_diffusion is {shape}, this UNet needs {expected}; "
                               f"was it trained on another model?")
    missing = sorted(set(layers) - set(processors))
    if missing:
        raise Hw2Error(f"{source} covers {len(processors)} of the UNet's {len(layers)} cross-attention layers "
                       f"(no weights for {missing[0]}); was it trained on another model?")
    set_processors(unet, processors)
    unet.to(dtype=unet.dtype, device=unet.device)
    installed = unet.attn_processors
    if any(installed[name] is not processor for name, processor in processors.items()):
        raise Hw2Error(f"the Custom Diffusion processors of {source} were not installed in the UNet")
    return processors


def token_files(folder):
    """The token files of a Custom Diffusion folder (`new1.safetensors` holds {"<new1>": [1, D]}), sorted: every
    .safetensors file there but the weights and the training state."""
    return sorted(path for path in Path(folder).glob("*.safetensors") if path.name not in (WEIGHTS_FILE, STATE_FILE))


def check_weights_folder(folder):
    """The folder holds WEIGHTS_FILE and at least one token file; returns (weights path, token files)."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise Hw2Error(f"no {WEIGHTS_FILE} in {folder}; train with `p3_custom_diffusion.py train --out {folder}` "
                       f"or pass --weights with the folder it wrote")
    tokens = token_files(folder)
    if not tokens:
        raise Hw2Error(f"{folder} holds no token file (new1.safetensors for <new1>) beside {WEIGHTS_FILE}; pass "
                       f"the folder that `p3_custom_diffusion.py train` wrote")
    return folder / WEIGHTS_FILE, tokens


def load_custom_diffusion(pipe, folder):
    """Install a Custom Diffusion folder's weights in `pipe.unet` and add its tokens; returns the token files."""
    weights, tokens = check_weights_folder(folder)
    try:
        state_dict = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise Hw2Error(f"cannot read {weights} ({err}); is it a safetensors file?") from err
    install_processors(pipe.unet, state_dict, weights)
    load_embeds(pipe, tokens)
    return tokens
