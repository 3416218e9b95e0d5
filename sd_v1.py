"""Stable Diffusion v1 loading, shared by textual inversion, Custom Diffusion, the report and the benchmarks.

    from sd_v1 import load_sd_pipeline
    pipe = load_sd_pipeline("CompVis/stable-diffusion-v1-4")        # a hub id
    pipe = load_sd_pipeline("models/sd-v1-4-diffusers")              # a diffusers folder
    pipe = load_sd_pipeline("stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt")  # the original file

A single file in the original CompVis layout (`.ckpt` or `.safetensors`) loads with no network and an empty
Hugging Face cache: SD v1's pipeline configs ship in `configs/sd_v1/`, and CLIP's tokenizer is rebuilt from the
BPE merges that open_clip ships. A `.ckpt` is a pickle: it is read by torch's weights-only unpickler, which here
also accepts numpy scalars and PyTorch Lightning's callback records (inert stand-ins) and refuses anything else.
Its architecture is checked against the configs, diffusers' own converter (`from_single_file`) turns it into a
pipeline, and that pipeline is written once, atomically, as a diffusers folder of `.safetensors` files: the cache
`<file>.hw2-diffusers/` beside the file when that folder is writable, else under ~/.cache/hw2/sd_v1 (or
$XDG_CACHE_HOME/hw2/sd_v1), every file fsynced before the folder is renamed into place. Its files and folders get
the umask's usual modes (0644 / 0755 under 022), so that another account, the grader's, loads it too. Later runs,
of any account, load the cache with `from_pretrained` (no unpickling, no conversion) while its stamp holds: the
file's path, size and modification time, the hash of the shipped configs and the diffusers version it was
converted with, and the size and hash of every file the cache holds. A cache that is out of date is converted
again; one that is damaged (a truncated or edited file) or fails to load is converted again after one warning line.
"""

import gzip
import hashlib
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import diffusers
import numpy as np
import open_clip
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from utils import Hw2Error, atomic_dir, find_toy_root

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
SD_V1_CONFIG = Path(__file__).resolve().parent / "configs" / "sd_v1"  # model_index.json + component configs
TOY_SD = Path("toy_models") / "tiny-sd"  # inside a toy hw2_data (see toy_data.build_tiny_sd)
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
CLIP_CONTEXT_LENGTH = 77
CACHE_SUFFIX = ".hw2-diffusers"  # the cache folder of a single file: model.ckpt -> model.ckpt.hw2-diffusers/
STAMP_FILE = "hw2_source.json"  # in the cache: what it was converted from and with, and what it holds
HASHED_FILE_SIZE = 16 * 2**20  # cache files up to this size (configs, tokenizer) are hashed; larger ones sized
# what a damaged cache raises in from_pretrained: a missing or truncated file (OSError), weights that do not fit the
# config (RuntimeError), an unreadable config or header (ValueError, KeyError, SafetensorError)
CACHE_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError)
# the original file's top-level prefixes: LatentDiffusion.model.diffusion_model, .first_stage_model (the VAE),
# .cond_stage_model.transformer (a transformers CLIPTextModel inside FrozenCLIPEmbedder)
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
# Lightning (1.x and 2.x) callback classes whose records old checkpoints keep under "callbacks"
LIGHTNING_CALLBACKS = [f"{package}.callbacks.{module}" for package in ("pytorch_lightning", "lightning.pytorch")
                       for module in ("model_checkpoint.ModelCheckpoint", "early_stopping.EarlyStopping",
                                      "lr_monitor.LearningRateMonitor")]


def default_model(anchor):
    """The toy SD folder when `anchor` lies in a toy world, else SD v1.4 from the hub."""
    toy_root = find_toy_root(anchor)
    return str(toy_root / TOY_SD) if toy_root is not None else DEFAULT_MODEL


def clip_bpe_tokenizer(folder):
    """CLIP's tokenizer (the one SD v1 uses), rebuilt offline from the BPE merges that open_clip ships.

    The vocabulary is open_clip's own construction: the 256 byte symbols, the same with `</w>`, the first
    48,894 merges joined, then the two special tokens (49,408 entries). `vocab.json` and `merges.txt` are
    written to `folder`. The ids equal open_clip's, except that padding is `<|endoftext|>` (open_clip pads with 0).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: idx for idx, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # without model_max_length, transformers 5 overflows on padding="max_length"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=CLIP_CONTEXT_LENGTH)


# ------------------------------------------------------------------------ diffusers -> original (CompVis) names

RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION_NAMES = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def unet_prefixes(config):
    """(diffusers prefix, original prefix, is a resnet) for every block of a UNet2DConditionModel config.

    The original UNet numbers its blocks in one sequence: input_blocks 0 is conv_in, then per down level
    `layers_per_block` (resnet, attention) pairs and a downsampler; output_blocks hold `layers_per_block + 1`
    pairs per up level, the upsampler after the last one.
    """
    per_level = config["layers_per_block"] + 1
    levels = len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0.", False), ("time_embedding.linear_2.", "time_embed.2.", False),
             ("conv_in.", "input_blocks.0.0.", False), ("conv_norm_out.", "out.0.", False),
             ("conv_out.", "out.2.", False), ("mid_block.resnets.0.", "middle_block.0.", True),
             ("mid_block.attentions.0.", "middle_block.1.", False), ("mid_block.resnets.1.", "middle_block.2.", True)]
    for i in range(levels):
        for j in range(per_level - 1):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per_level * i + j + 1}.0.", True),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per_level * i + j + 1}.1.", False)]
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per_level * (i + 1)}.0.op.", False))
        for j in range(per_level):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per_level * i + j}.0.", True),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per_level * i + j}.1.", False)]
        if i < levels - 1:
            slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per_level * i + per_level - 1}.{slot}.",
                          False))
    return pairs


def vae_prefixes(config):
    """(diffusers prefix, original prefix, is a resnet) for the VAE; the original numbers decoder levels upwards."""
    levels = len(config["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out.", False), ("decoder.conv_norm_out.", "decoder.norm_out.",
                                                                      False)]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", True) for k in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", False))
    for i in range(levels):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", True)
                  for j in range(config["layers_per_block"])]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.", True)
                  for j in range(config["layers_per_block"] + 1)]
        pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", False),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.", False)]
    return pairs


def rename(key, prefixes, resnet_names):
    """`key` under the original prefix of the first matching diffusers prefix; resnet inner names renamed too."""
    for ours, theirs, is_resnet in prefixes:
        if key.startswith(ours):
            rest = key[len(ours):]
            for new, old in resnet_names if is_resnet else []:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
            return theirs + rest
    return key


def original_state_dict(unet, vae, text_encoder):
    """The three models' weights under the original single-file (CompVis) key names and shapes.

    The inverse of diffusers' own converters (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
    convert_ldm_clip_checkpoint): the VAE's attention projections become 1x1 convolutions, and the text encoder
    keeps transformers' `text_model.` prefix and its position_ids buffer, as the original files have them.
    """
    state = {}
    unet_map = unet_prefixes(unet.config)
    for key, value in unet.state_dict().items():
        state[UNET_PREFIX + rename(key, unet_map, RESNET_NAMES)] = value
    vae_map = vae_prefixes(vae.config)
    resnet_names = [("conv_shortcut", "nin_shortcut")]
    for key, value in vae.state_dict().items():
        name = rename(key, vae_map, resnet_names)
        if ".mid.attn_1." in name:
            head, tail = name.split(".mid.attn_1.")
            for new, old in VAE_ATTENTION_NAMES:
                tail = old + tail[len(new):] if tail.startswith(new + ".") else tail
            name = f"{head}.mid.attn_1.{tail}"
            value = value[..., None, None] if name.endswith("weight") and value.dim() == 2 else value
        state[VAE_PREFIX + name] = value
    text_state = {**text_encoder.state_dict(), "embeddings.position_ids": text_encoder.embeddings.position_ids}
    for key, value in text_state.items():
        state[TEXT_PREFIX + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    return state


def expected_shapes(config_dir):
    """{original key: shape} of the SD v1 pipeline described by `config_dir`, built on the meta device (no memory)."""
    config_dir = Path(config_dir)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    return {key: tuple(value.shape) for key, value in original_state_dict(unet, vae, text_encoder).items()}


def check_architecture(shapes, expected, source):
    """Refuse a file whose SD v1 keys are missing or shaped otherwise; name the first mismatching keys."""
    wrong = [f"{key} {list(shapes[key])} (expected {list(shape)})" for key, shape in expected.items()
             if key in shapes and tuple(shapes[key]) != shape]
    missing = [key for key in expected if key not in shapes]
    if wrong or missing:
        first = (wrong + [f"{key} missing" for key in missing])[:3]
        raise Hw2Error(f"{source} is not a Stable Diffusion v1 checkpoint of the expected architecture: "
                       f"{len(wrong)} key(s) of another shape and {len(missing)} missing, first {'; '.join(first)}")


# ---------------------------------------------------------------------------------------- reading .ckpt safely


class LightningRecord:
    """An inert stand-in for a Lightning callback class named in an old checkpoint: it only holds what the
    pickle sets on it, and no Lightning code is imported or run."""


def lightning_stand_ins():
    """(stand-in class, dotted name) pairs for torch's safe_globals, one distinct class per name."""
    return [(type(name.rsplit(".", 1)[1], (LightningRecord,), {"__module__": name.rsplit(".", 1)[0]}), name)
            for name in LIGHTNING_CALLBACKS]


def safe_globals():
    """What the weights-only unpickler may build beyond tensors and plain containers: numpy scalars and dtypes
    (numpy 1 pickles name numpy.core, numpy 2 numpy._core) and the Lightning stand-ins."""
    scalar = np._core.multiarray.scalar
    dtype_classes = sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=str)  # a dtype's own state
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            (np.dtype, "numpy.dtype"), *dtype_classes, *lightning_stand_ins()]


def read_pickled_tensors(path):
    """The tensors of a `.ckpt`'s state_dict, read by torch's weights-only unpickler: nothing in it is executed."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            # a zip checkpoint (torch >= 1.6) is memory-mapped: reading its shapes does not read its 4 GB
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        what = (f"the class or function {found.group(1)}" if found else
                f"an object the safe unpickler cannot build ({reason.group(1) if reason else type(err).__name__})")
        raise Hw2Error(f"{path} holds {what}, which is refused: only tensors, containers, numbers, numpy scalars "
                       f"and Lightning callback records are read from a .ckpt (nothing in it is run)") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise Hw2Error(f"cannot read {path} as a PyTorch checkpoint ({str(err).strip().splitlines()[0]})") from err
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise Hw2Error(f"{path} holds a {type(checkpoint).__name__}, not a state_dict of tensors")
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def original_shapes(path):
    """{key: shape} of an original-layout single file; a .ckpt is read through the guarded unpickler."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as handle:
                return {key: handle.get_slice(key).get_shape() for key in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise Hw2Error(f"cannot read {path} as safetensors ({err})") from err
    return {key: tuple(value.shape) for key, value in read_pickled_tensors(path).items()}


# ------------------------------------------------------------------------------------------- the diffusers cache


def user_cache_dir(source):
    """The diffusers copy of `source` in this account's cache (~/.cache/hw2/sd_v1, or $XDG_CACHE_HOME/hw2/sd_v1)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hw2" / "sd_v1"
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return root / f"{source.name}.{digest}{CACHE_SUFFIX}"


def cache_dir(source):
    """Where a new diffusers copy of `source` is written: beside it when its folder is writable, else in the
    account's own cache."""
    if os.access(source.parent, os.W_OK):
        return source.with_name(source.name + CACHE_SUFFIX)
    return user_cache_dir(source)


def cache_candidates(source):
    """Where a diffusers copy of `source` may already be, in the order they are tried: beside it first, even where
    this account cannot write there (another account, the student's for the grader, may have converted the file),
    then this account's own cache."""
    return [source.with_name(source.name + CACHE_SUFFIX), user_cache_dir(source)]


def tree_digest(folder):
    """sha256 of every file under `folder`, with its relative path, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def source_stamp(source, config):
    """What must not change for a cache of `source` to stay valid: the file's path, size and modification time, the
    configs it was converted with (their hash) and the diffusers version that converted it."""
    stat = source.stat()
    return {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "config_sha256": tree_digest(config), "diffusers": diffusers.__version__}


def cache_contents(cache):
    """{relative path: [size, sha256 or None]} of every file in the cache but the stamp; only files up to
    HASHED_FILE_SIZE (configs, tokenizer) are hashed, the weights are sized (truncation), not read."""
    contents = {}
    for path in sorted(p for p in Path(cache).rglob("*") if p.is_file() and p.name != STAMP_FILE):
        size = path.stat().st_size
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if size <= HASHED_FILE_SIZE else None
        contents[path.relative_to(cache).as_posix()] = [size, digest]
    return contents


def cache_status(cache, source, config):
    """('valid' | 'missing' | 'stale' | 'damaged', detail) of the cache of `source` converted with `config`:
    stale when the file, the configs or diffusers changed since; damaged when its files differ from the stamp's."""
    try:
        stamp = json.loads((cache / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return ("damaged", f"its {STAMP_FILE} cannot be read") if cache.exists() else ("missing", "")
    expected = source_stamp(source, config)
    changed = [key for key, value in expected.items() if not isinstance(stamp, dict) or stamp.get(key) != value]
    if changed:
        return "stale", ", ".join(changed)
    contents = cache_contents(cache)
    written = stamp.get("files", {})
    differ = sorted(set(contents) ^ set(written) | {name for name in contents if contents[name] != written.get(name)})
    if differ:
        return "damaged", f"{differ[0]} differs from what was written" + (f" (and {len(differ) - 1} more)"
                                                                           if len(differ) > 1 else "")
    return "valid", ""


def cache_is_valid(cache, source, config=SD_V1_CONFIG):
    return cache_status(cache, source, config)[0] == "valid"


def fsync_path(path):
    """fsync a file's data, or a folder's entries (a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """fsync every file and folder under `folder`, deepest first, then `folder` itself."""
    for path in sorted(Path(folder).rglob("*"), key=lambda p: len(p.parts), reverse=True) + [Path(folder)]:
        fsync_path(path)


def convert_single_file(path, config):
    """diffusers' own converter (from_single_file) on an original-layout file, written once as a diffusers folder
    of .safetensors files (the cache) and returned, in float32. The architecture is checked before any of it."""
    check_architecture(original_shapes(path), expected_shapes(config), path)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_bpe_tokenizer(tmp)
    # diffusers reads a .ckpt with torch.load(weights_only=True): the same allowlist applies
    with torch.serialization.safe_globals(safe_globals()):
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), tokenizer=tokenizer,
                                                        safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False, local_files_only=True)
    cache = cache_dir(path)
    try:
        with atomic_dir(cache) as tmp:
            pipe.save_pretrained(tmp)
            stamp = {**source_stamp(path, config), "files": cache_contents(tmp)}
            (tmp / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
            fsync_tree(tmp)  # before the rename: a power cut must not leave a complete-looking cache of empty files
        fsync_path(cache.parent)  # the rename itself
    except OSError as err:
        # the pipeline is already in memory: a full disk or a read-only cache folder only costs the next run time
        print(f"warning: could not write the cache {cache} of {path} ({err.strerror or err}; it needs as much free "
              f"space as the weights); the next run converts the file again")
        return pipe
    print(f"Converted {path} once to {cache}; later runs load that copy while {path.name} is unchanged.")
    return pipe


# ----------------------------------------------------------------------------------------------------- loading


def random_pipeline(config=SD_V1_CONFIG, seed=0):
    """The pipeline that `config` describes, with random weights (speed and memory do not depend on them)."""
    config = Path(config)
    with torch.random.fork_rng(devices=[]):  # the models initialise from the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    scheduler_config = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_bpe_tokenizer(tmp)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_single_file(path, config, kwargs):
    """The pipeline of an original-layout file: from the first valid cache that loads (cache_candidates), else
    converted (again).

    A damaged cache, or one that fails to load, costs one warning line and a conversion, never the run."""
    for cache in cache_candidates(path):
        status, detail = cache_status(cache, path, config)
        if status == "valid":
            try:
                return StableDiffusionPipeline.from_pretrained(cache, **kwargs)
            except CACHE_LOAD_ERRORS as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                status, detail = "damaged", f"it fails to load: {reason}"
        if status == "damaged":
            # a damaged cache this account cannot replace is passed over, so it is not converted on every run
            action = f"converting {path.name} again" if cache == cache_dir(path) else "not using it"
            print(f"warning: the cache {cache} of {path.name} is damaged ({detail}); {action}")
            if cache == cache_dir(path):
                break
    return convert_single_file(path, config).to(dtype=kwargs["dtype"])


def load_sd_pipeline(model, dtype=torch.float32, config=SD_V1_CONFIG):
    """A StableDiffusionPipeline from a hub id, a diffusers folder, or a single original-layout file.

    `config` is the diffusers pipeline folder (configs only) that describes a single file's architecture.
    """
    path = Path(model).expanduser()
    kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if path.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
        elif path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
            pipe = load_single_file(path, config, kwargs)
        elif path.exists() or path.suffix in (*SINGLE_FILE_SUFFIXES, ".pt") or str(model).startswith((".", "/", "~")):
            raise Hw2Error(f"model {model} does not exist or is not a diffusers folder / .ckpt / .safetensors "
                           f"file; pass the SD v1.4 checkpoint path or a hub id such as {DEFAULT_MODEL}")
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("offline, pass a local diffusers folder or the .ckpt file" if not path.exists() else
                "pass a Stable Diffusion v1 diffusers folder, .ckpt or .safetensors file")
        raise Hw2Error(f"cannot load Stable Diffusion from {model} ({reason}); {hint}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe
