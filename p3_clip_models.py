"""open_clip models for P3 zero-shot, built with the activation their weights were trained with.

    from p3_clip_models import load_clip, resolve_model
    name, pretrained, quick_gelu = resolve_model("ViT-B-32", "openai", data_folder)   # QuickGELU, as OpenAI trained
    model, preprocess, tokenizer = load_clip(name, pretrained, "cpu", quick_gelu)

--model takes an open_clip model name, the path of an open_clip config JSON, `hf-hub:ORG/REPO` or
`local-dir:FOLDER`; --pretrained a pretrained tag of the model or a weights file, OpenAI's own TorchScript
`ViT-B-32.pt` (as the `clip` package caches it) included. Everything loads through open_clip's own loaders.
"""

import contextlib
import difflib
import json
import logging
import zipfile
from pathlib import Path

import open_clip
from open_clip.transformer import QuickGELU

from utils import Hw2Error, find_toy_root

TINY_CLIP_DIR = Path("toy_models") / "open_clip"  # a toy world's tiny CLIP (toy_data.build_tiny_clip): config JSON
TINY_CLIP_NAME = "toy-tiny-clip"  # and .safetensors weights, both named after the model
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip model names that carry their own config and weights


@contextlib.contextmanager
def quiet_logging():
    """open_clip logs its errors on the root logger before raising them; we report the raised error once."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def register_config(path):
    """Add an open_clip model config JSON to open_clip's registry; its model name is the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise Hw2Error(f"model config {path} not found: pass --model NAME (e.g. {DEFAULT_MODEL}) "
                       f"or the path of an open_clip config JSON")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise Hw2Error(f"model config {path} is not valid JSON ({err})") from err
    if not (isinstance(config, dict) and all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg"))):
        raise Hw2Error(f"{path} is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg")
    open_clip.add_model_config(path)
    return path.stem


def is_torchscript(path):
    """Whether `path` is a TorchScript archive, the format of OpenAI's own CLIP files (ViT-B-32.pt)."""
    with contextlib.suppress(OSError, zipfile.BadZipFile), zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())
    return False


def resolve_model(model, pretrained, data, quick_gelu=False):
    """(open_clip model name, pretrained tag or weights file or None, QuickGELU?) from the flags.

    The default model is ViT-B-32 with OpenAI's weights, or the toy world's tiny CLIP when --data is in one. A
    config JSON is registered with open_clip; its default weights are the `.safetensors` file beside it.
    `hf-hub:org/repo` and `local-dir:FOLDER` carry their own config and weights. The activation is the one the
    weights were trained with: open_clip's pretrained config of (model, tag) says it for a tag (OpenAI's CLIP used
    QuickGELU, which `create_model` would only warn about); for a file, `--quick-gelu` or a `-quickgelu` name does.
    """
    if model is None:
        toy_root = find_toy_root(data)
        model = str(toy_root / TINY_CLIP_DIR / f"{TINY_CLIP_NAME}.json") if toy_root else DEFAULT_MODEL
    if model.startswith(SCHEMAS):
        if pretrained is not None:
            raise Hw2Error(f"--model {model} carries its own weights: drop --pretrained {pretrained}")
        return model, None, quick_gelu
    if model.endswith(".json"):
        name = register_config(model)
        weights = Path(model).with_suffix(".safetensors")
        if pretrained is None and not weights.is_file():
            raise Hw2Error(f"no weights {weights} beside --model {model}: pass --pretrained PATH")
        pretrained = pretrained or str(weights)
    else:
        name = model
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
            hint = f"close names: {', '.join(close)}" if close else "open_clip.list_models() lists them"
            raise Hw2Error(f"unknown --model {name!r} ({hint}); a path to an open_clip config JSON, hf-hub:ORG/REPO "
                           f"or local-dir:FOLDER also works")
        pretrained = pretrained or DEFAULT_PRETRAINED
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags and not Path(pretrained).is_file():
        known = f"its tags: {', '.join(tags)}" if tags else f"{name} has no published tags"
        raise Hw2Error(f"--pretrained {pretrained!r} is neither a weights file nor a pretrained tag of {name} "
                       f"({known})")
    tag_quick_gelu = pretrained in tags and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False)
    return name, pretrained, bool(quick_gelu or tag_quick_gelu or name.endswith("-quickgelu"))


def load_clip(name, pretrained, device, quick_gelu=False):
    """open_clip model (eval mode), its own evaluation preprocessing and its tokenizer.

    An OpenAI TorchScript file goes through open_clip's OpenAI loader (always QuickGELU); everything else through
    `create_model_and_transforms`, with QuickGELU forced when `quick_gelu`."""
    try:
        with quiet_logging():
            if pretrained is not None and is_torchscript(pretrained):
                model = open_clip.load_openai_model(pretrained, precision="fp32", device=device)
                preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                                       mean=model.visual.image_mean, std=model.visual.image_std)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
            tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # download, unpickling, shape or key mismatch: open_clip raises many kinds
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("; tags and hf-hub: models are downloaded from the Hugging Face hub on first use (internet needed "
                "once), or pass --pretrained PATH to a local weights file") if not pretrained or not Path(
            pretrained).is_file() else ""
        raise Hw2Error(f"cannot load {name} with weights {pretrained or 'of its own'}: {reason}{hint}") from err
    return model.eval(), preprocess, tokenizer


def activation(model):
    """The MLP activation the built model uses: QuickGELU (x * sigmoid(1.702 x)) or GELU."""
    return "QuickGELU" if any(isinstance(m, QuickGELU) for m in model.modules()) else "GELU"
