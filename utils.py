"""Shared plumbing for the hw2 scripts: device, mixed precision, seeding, per-image noise, safe I/O, toy-world
detection.

Everything here is small and independent of any one problem. Errors meant for the user are raised as
`Hw2Error`; `run_cli` turns them into one line on stderr and exit status 1.
"""

import contextlib
import functools
import json
import os
import random
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torchvision.utils import make_grid

TOY_MARKER = "TOY"  # file at the root of a toy hw2_data tree (written by toy_data.py)
_METADATA_KEY = "hw2"  # safetensors header entry that holds our JSON metadata
PROC_STATUS = "/proc/self/status"  # where Linux shows a process's umask without changing it


class Hw2Error(Exception):
    """A problem the user can fix (bad path, bad file, bad flag): reported as one line, no traceback."""


def run_cli(main, argv=None):
    """Run `main(argv)`; report an `Hw2Error` as a single `error: ...` line and exit with status 1."""
    try:
        return main(argv)
    except Hw2Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------- device


def get_device(name=None):
    """The device asked for, or the best available one: cuda, then mps, then cpu."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise Hw2Error(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Hw2Error(f"device {name!r} was asked for but CUDA is not available here: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise Hw2Error(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise Hw2Error(f"device {name!r} was asked for but MPS is not available here: use --device cpu")
    return device


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cuda_has_native_bf16():
    """Whether the current GPU computes bf16 in hardware (compute capability 8.0 on, Ampere and later).

    torch.cuda.is_bf16_supported() counts emulation by default and says True on a T4, V100 or RTX 20xx, where
    cuDNN has no bf16 convolutions: emulated, they are slow or fail."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def amp_dtype(device, cpu_bf16=False):
    """The autocast dtype for `device`: bf16 on a GPU with native bf16, else fp16 (with a GradScaler: see
    `make_grad_scaler`); on a CPU with native bf16 and `cpu_bf16`, bf16; None (no autocast) elsewhere."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    if kind == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device, enabled=True, cpu_bf16=False):
    """Mixed-precision context for `device` (see `amp_dtype`); a no-op where that is None or when disabled."""
    dtype = amp_dtype(device, cpu_bf16)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_grad_scaler(device, enabled=True):
    """A GradScaler that is active only where autocast runs in fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler("cuda", enabled=enabled and amp_dtype(device) == torch.float16)


def seed_everything(seed, deterministic=False):
    """Seed python, numpy and torch (all devices); `deterministic` also forces deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def image_generators(seed, count, device):
    """One torch.Generator per image, seeded from (seed, image index): samples do not depend on the batch size."""
    states = [np.random.SeedSequence([seed, index]).generate_state(1)[0] for index in range(count)]
    return [torch.Generator(device=device).manual_seed(int(state)) for state in states]


def standard_normal(shape, generator, device, dtype=torch.float32):
    """N(0, I) noise of `shape` on `device`.

    `generator` is None, one torch.Generator, or a list with one generator per batch row; with a list each
    row depends only on its own generator, so a sample does not change with the batch it is in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [standard_normal((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(rows) if rows else torch.empty(shape, device=device, dtype=dtype)
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


# ---------------------------------------------------------------------------------------- atomic writes


def current_umask():
    """This process's umask. Linux shows it in /proc/self/status; elsewhere os.umask can only read it by setting
    it, which changes it for every thread for a moment, so that is done once and remembered."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path(PROC_STATUS).read_text().splitlines()
        return int(next(line.split()[1] for line in lines if line.startswith("Umask:")), 8)
    return _umask_read_once()


@functools.cache
def _umask_read_once():
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; on success it is fsynced and renamed over `path`, else removed.

    Readers therefore see either the old file or the complete new one, never a half-written file. The file gets
    the permissions that open() gives a new file under the umask (0644 under the usual 022).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise Hw2Error(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes owner-only files; give those open() gives
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def give_usual_modes(folder):
    """Set `folder` and everything in it to the modes mkdir() and open() give under the umask; an executable file
    stays executable, a folder keeps a setgid bit inherited from its parent, and symbolic links are left alone."""
    umask = current_umask()
    for root, _, files in os.walk(folder):  # visits real folders only: a link to a folder is listed, not entered
        os.chmod(root, (0o777 & ~umask) | (os.lstat(root).st_mode & stat.S_ISGID))
        for name in files:
            file = os.path.join(root, name)
            mode = os.lstat(file).st_mode
            if stat.S_ISREG(mode):
                os.chmod(file, (0o777 if mode & stat.S_IXUSR else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temp folder beside `path`; on success it replaces `path` (an earlier one is removed), else it goes.

    The caller decides whether an existing `path` may be replaced before entering. The folder and everything in
    it get the permissions that mkdir() and open() give under the umask (0755 / 0644 under the usual 022), so that
    another account, the grader's, can read them: mkdtemp makes an owner-only folder, and some writers (safetensors'
    save_file, hence diffusers' save_pretrained) make owner-only files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial."))
    try:
        yield tmp
        give_usual_modes(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_writable_dir(folder, what):
    """Create `folder` if needed and check that files can be written in it, before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise Hw2Error(f"cannot write to {what} {folder}: {err.strerror or err}; pass a writable folder") from err
    return folder


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------ checkpoints


def _flatten(obj, prefix, tensors):
    """Move every tensor of a nested dict/list into `tensors` (keyed by its path); return the JSON skeleton."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared memory
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint dict keys must be str or int, got {list(obj)[:3]}")
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint")


def _unflatten(node, tensors):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
        if "__list__" in node:
            return [_unflatten(v, tensors) for v in node["__list__"]]
    return node


def save_checkpoint(path, state, metadata=None):
    """Atomically write `state` (nested dicts/lists of tensors, numbers, strings) as one safetensors file.

    Tensors go in the safetensors body; the structure and every other value go in its JSON header metadata,
    so nothing is pickled and the file can be inspected with any safetensors reader. `metadata` ({str: str})
    adds header entries of its own, which such readers show as they are.
    """
    tensors = {}
    skeleton = _flatten(state, "state", tensors)
    data = safetensors_save(tensors, metadata={**(metadata or {}), _METADATA_KEY: json.dumps(skeleton)})
    atomic_write_bytes(path, data)


def load_checkpoint(path):
    """Read a checkpoint written by `save_checkpoint`; any problem is an `Hw2Error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise Hw2Error(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            skeleton = json.loads((handle.metadata() or {})[_METADATA_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return _unflatten(skeleton, tensors)
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        reason = "no hw2 metadata in its header" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise Hw2Error(f"checkpoint {path} is not a valid hw2 checkpoint ({reason})") from err


def load_torch_file(path):
    """Load a course `.pt` file (tensors / state_dicts only). Pickled code is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise Hw2Error(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in str(err):
            reason = "it holds pickled objects other than tensors, which are refused for safety"
        raise Hw2Error(f"cannot load {path}: {reason}") from err


# --------------------------------------------------------------------------------------------- images


def to_uint8(x):
    """Map a CxHxW (or NxCxHxW) tensor in [-1, 1] to uint8 HxWxC (or NxHxWxC).

    Values are clamped to [-1, 1], mapped to [0, 255] and rounded half up, floor((x + 1) / 2 * 255 + 0.5),
    which is the rounding torchvision's `save_image` uses.
    """
    x = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    x = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def save_pil(image, path):
    """Atomically write a PIL image as PNG."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_png(x, path):
    """Atomically write a CxHxW tensor in [-1, 1] as an RGB (or grey, for C = 1) PNG."""
    array = to_uint8(x)
    save_pil(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array), path)


def save_grid(images, path, nrow, padding=2, pad_value=1.0):
    """Atomically write NxCxHxW images in [-1, 1] as one PNG grid, `nrow` images per row (torchvision's make_grid)."""
    grid = make_grid((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=padding,
                     pad_value=pad_value)
    save_png(grid * 2 - 1, path)


def labelled_grid(tiles, row_labels, col_labels, pad=4):
    """One RGB PIL image of uint8 HxWx3 `tiles` (a list of rows), row labels on the left, column labels on top."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # the margins depend only on their own labels, so the figure's size does not change with the column text
    text_width = max(probe.textbbox((0, 0), label, font=font)[2] for label in row_labels)
    text_height = max(probe.textbbox((0, 0), label, font=font)[3] for label in [*row_labels, *col_labels])
    tile_h, tile_w = tiles[0][0].shape[:2]
    left, top = text_width + 2 * pad if text_width else pad, text_height + 2 * pad
    canvas = Image.new("RGB", (left + len(col_labels) * (tile_w + pad), top + len(row_labels) * (tile_h + pad)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(col_labels):
        draw.text((left + col * (tile_w + pad), pad), label, fill="black", font=font)
    for row, (label, row_tiles) in enumerate(zip(row_labels, tiles)):
        y = top + row * (tile_h + pad)
        draw.text((pad, y + tile_h // 2 - text_height // 2), label, fill="black", font=font)
        for col, tile in enumerate(row_tiles):
            canvas.paste(Image.fromarray(tile), (left + col * (tile_w + pad), y))
    return canvas


def load_rgb(path):
    """Open an image file as RGB; an unreadable or corrupt file is an `Hw2Error` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise Hw2Error(f"cannot read image {path}: {err}") from err


# ------------------------------------------------------------------------------------------ toy world


def find_toy_root(path):
    """The toy `hw2_data` root that contains `path` (a folder holding the TOY marker), or None."""
    path = Path(path).resolve()
    for folder in [path, *path.parents]:
        if (folder / TOY_MARKER).is_file():
            return folder
    return None


def announce_toy_world(path):
    """Print the one-line notice every script gives on a toy world; return whether `path` is in one."""
    root = find_toy_root(path)
    if root is not None:
        print(f"Toy world: {root} was built offline by toy_data.py; numbers here check the code, not the method.")
    return root is not None
