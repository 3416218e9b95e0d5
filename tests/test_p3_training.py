"""What the P3 training scripts share (p3_training.py): the defaults each picks for the device, lazy class images,
and the rule that neither method script imports the other."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import p3_concepts as concepts
import p3_custom_diffusion as cd
import p3_score
import p3_textual_inversion as ti
import sd_v1

REPO = Path(__file__).resolve().parents[1]
# diffusers' examples/textual_inversion README, "Training" on a GPU: --train_batch_size=1
# --gradient_accumulation_steps=4 --mixed_precision=fp16 (with --gradient_checkpointing to save memory)
DIFFUSERS_TI_GPU = {"mixed_precision": "fp16", "gradient_checkpointing": True, "batch_size": 1, "grad_accum": 4}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ti_dir(toy_world):
    return toy_world / "textual_inversion"


@pytest.fixture(scope="module")
def toy_pipe(toy_world):
    return sd_v1.load_sd_pipeline(str(toy_world / sd_v1.TOY_SD))


def resolved_settings(module, entry, argv, device, monkeypatch):
    """The args `module`'s train reaches `entry` (its training function, not run) with, on a faked `device`."""
    seen = []
    monkeypatch.setattr(module, "get_device", lambda name=None: torch.device(device))
    monkeypatch.setattr(module, entry, lambda args, *rest: seen.append(args))
    module.main(argv)
    return seen[0]


def memory_settings(args, names=("mixed_precision", "gradient_checkpointing", "batch_size", "grad_accum")):
    return {name: getattr(args, name) for name in names}


def test_textual_inversion_fits_a_small_gpu_by_default_and_cpu_defaults_stay(ti_dir, toy_pipe, monkeypatch):
    concept = ["train", str(ti_dir / "0"), "--token", "<new1>", "--init-token", "rocket"]
    monkeypatch.setattr(ti, "load_sd_pipeline", lambda *args, **kwargs: toy_pipe)
    cuda = resolved_settings(ti, "train_concept", concept, "cuda", monkeypatch)
    assert memory_settings(cuda) == DIFFUSERS_TI_GPU
    cpu = resolved_settings(ti, "train_concept", concept, "cpu", monkeypatch)
    assert memory_settings(cpu) == {"mixed_precision": "no", "gradient_checkpointing": False, "batch_size": 4,
                                    "grad_accum": 1}
    for args in (cuda, cpu):  # the same images per optimizer step on both
        assert args.batch_size * args.grad_accum == 4
    # a flag given wins; an unset --grad-accum keeps 4 images per step where it can
    given = resolved_settings(ti, "train_concept", [*concept, "--batch-size", "2", "--mixed-precision", "bf16",
                                                    "--no-gradient-checkpointing"], "cuda", monkeypatch)
    assert memory_settings(given) == {"mixed_precision": "bf16", "gradient_checkpointing": False, "batch_size": 2,
                                      "grad_accum": 2}
    big = resolved_settings(ti, "train_concept", [*concept, "--batch-size", "8"], "cpu", monkeypatch)
    assert (big.batch_size, big.grad_accum) == (8, 1)


def test_custom_diffusion_trains_in_fp16_with_checkpointing_on_cuda(ti_dir, monkeypatch):
    concept = ["train", "--concept", str(ti_dir / "cat"), "<cat1>", "cat"]
    names = ("mixed_precision", "gradient_checkpointing", "batch_size", "grad_accum")
    cuda = resolved_settings(cd, "train_concepts", concept, "cuda", monkeypatch)
    assert memory_settings(cuda, names) == {"mixed_precision": "fp16", "gradient_checkpointing": True,
                                            "batch_size": 2, "grad_accum": 1}
    cpu = resolved_settings(cd, "train_concepts", concept, "cpu", monkeypatch)
    assert memory_settings(cpu, names) == {"mixed_precision": "no", "gradient_checkpointing": False,
                                           "batch_size": 2, "grad_accum": 1}


def test_class_images_are_read_from_disk_only_when_drawn(ti_dir, monkeypatch):
    reads = []
    real = concepts.load_rgb
    monkeypatch.setattr(concepts, "load_rgb", lambda path: reads.append(Path(path).name) or real(path))
    lazy = concepts.LazyImages(ti_dir / "cat", 32)
    assert reads == [], "building the set read images"
    held = [name for name, value in vars(lazy).items() if isinstance(value, torch.Tensor) or
            isinstance(value, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in value)]
    assert not held, f"the set holds pixel tensors before any is drawn: {held}"
    eager = concepts.load_concept_images(ti_dir / "cat", 32)  # what training on preloaded photos would see
    reads.clear()
    assert len(lazy) == len(eager) > 1 and torch.equal(lazy[1], eager[1])
    assert reads == [concepts.list_images(ti_dir / "cat")[1].name]


def test_custom_diffusion_generates_class_images_in_its_training_precision_and_reads_one_per_draw(ti_dir, tmp_path,
                                                                                                 monkeypatch):
    """On CUDA the training precision is fp16 (the test above); bf16 is the same code path with the CPU's half
    type. A step at batch 1 draws one class image: only that one may be read."""
    dtypes, reads = [], []
    sample = cd.sample_images
    monkeypatch.setattr(cd, "sample_images", lambda pipe, *a, **k: dtypes.append(pipe.unet.dtype) or
                        sample(pipe, *a, **k))
    real = concepts.load_rgb
    monkeypatch.setattr(concepts, "load_rgb", lambda path: reads.append(Path(path)) or real(path))
    out = tmp_path / "cd"
    cd.main(["train", "--concept", str(ti_dir / "cat"), "<cat1>", "cat", "--num-class-images", "3", "--steps", "1",
             "--batch-size", "1", "--mixed-precision", "bf16", "--device", "cpu", "--out", str(out)])
    class_folder = out / "class_images" / "cat1"
    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes
    assert json.loads((class_folder / "source.json").read_text())["dtype"] == "bfloat16"
    drawn = [path for path in reads if path.parent == class_folder]
    assert len(drawn) == 1, f"{len(drawn)} class images read for one drawn: {[p.name for p in drawn]}"


def test_neither_method_script_imports_the_other():
    scripts = {"p3_textual_inversion", "p3_custom_diffusion"}
    for script in scripts:
        tree = ast.parse((REPO / f"{script}.py").read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & (scripts - {script}), f"{script}.py imports {sorted(imported & scripts)}"
        assert {"p3_concepts", "p3_training"} <= imported, f"{script}.py no longer uses the shared modules"


def test_a_webp_file_is_not_one_of_the_graders_images(ti_dir, tmp_path):
    """The course grader's load_images_from_folder lists .png .jpg .jpeg .bmp .gif (any case): a .webp beside the
    25 images of a prompt folder is not counted by it, so `score` must not count it either."""
    data = json.loads((ti_dir / "input.json").read_text())
    for concept, entry in data.items():
        for p in range(len(entry["prompt"])):
            folder = tmp_path / concept / str(p)
            folder.mkdir(parents=True)
            for i in range(concepts.GRADER_IMAGES):
                shutil.copy(ti_dir / concept / "00.jpg", folder / f"source{concept}_prompt{p}_{i}.png")
            shutil.copy(ti_dir / concept / "00.jpg", folder / "preview.webp")
    (tmp_path / "0" / "0" / "source0_prompt0_3.png").rename(tmp_path / "0" / "0" / "source0_prompt0_3.PNG")
    p3_score.check_folders(data, ti_dir, tmp_path)  # 25 images each: no error
    names = [path.name for path in concepts.list_images(tmp_path / "0" / "0")]
    assert len(names) == concepts.GRADER_IMAGES and "preview.webp" not in names and "source0_prompt0_3.PNG" in names
