"""p3_clip_models: every way to name CLIP weights, offline with tiny stand-ins, built with the activation the weights
were trained with (checked against open_clip models built explicitly with QuickGELU or GELU)."""

import json
import shutil
import warnings

import huggingface_hub
import open_clip
import pytest
import torch
from safetensors.torch import load_file

import p3_clip_models as models
import p3_clip_zeroshot as p3
from toy_data import TINY_CLIP_CONFIG

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# OpenAI's layout at a tiny size: open_clip's OpenAI loader infers 1 head per 64 channels
OPENAI_LIKE = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8, head_width=64),
                   text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))


@pytest.fixture(scope="module")
def toy_clip(toy_world):
    """The toy world's tiny CLIP: its registered name, config JSON and weights."""
    config = toy_world / models.TINY_CLIP_DIR / f"{models.TINY_CLIP_NAME}.json"
    name, weights, _ = models.resolve_model(str(config), None, toy_world)
    return name, config, weights


def reference(config, weights, quick_gelu):
    """An open_clip CLIP built explicitly with or without QuickGELU, holding `weights`."""
    model = open_clip.CLIP(**config, quick_gelu=quick_gelu).eval()
    model.load_state_dict(load_file(weights) if str(weights).endswith(".safetensors") else weights)
    return model


def image_features(model):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.encode_image(pixels)


def assert_built_as(model, config, weights, quick_gelu):
    """`model` computes what the explicit reference with that activation computes, and not the other one."""
    ours = image_features(model)
    same = image_features(reference(config, weights, quick_gelu))
    other = image_features(reference(config, weights, not quick_gelu))
    assert torch.allclose(ours, same, atol=1e-6), (ours - same).abs().max()
    assert not torch.allclose(ours, other, atol=1e-4), "GELU and QuickGELU give the same features here"
    assert models.activation(model) == ("QuickGELU" if quick_gelu else "GELU")


def test_a_tags_activation_comes_from_open_clips_pretrained_config():
    # OpenAI trained CLIP with QuickGELU; LAION's ViT-B-32 with GELU (open_clip's pretrained.py records both)
    assert models.resolve_model("ViT-B-32", "openai", ".")[2] is True
    assert models.resolve_model("ViT-B-32", "laion2b_s34b_b79k", ".")[2] is False
    assert models.resolve_model("ViT-B-32-quickgelu", "metaclip_400m", ".")[2] is True


def test_a_tag_builds_the_quickgelu_model_its_weights_need(toy_clip, monkeypatch):
    name, _, weights = toy_clip
    # a stand-in tag for the tiny model, recorded as open_clip records "openai": a local file, trained with QuickGELU
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {"openai": {"file": weights, "quick_gelu": True}})
    resolved = models.resolve_model(name, "openai", ".")
    assert resolved == (name, "openai", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # open_clip's QuickGELU-mismatch warning must not fire
        model, _, _ = models.load_clip(*resolved[:2], "cpu", resolved[2])
    assert_built_as(model, TINY_CLIP_CONFIG, weights, quick_gelu=True)


def test_a_weights_file_takes_quick_gelu_from_the_flag_or_the_name(toy_clip, tmp_path):
    name, config, weights = toy_clip
    assert models.resolve_model(str(config), None, ".")[2] is False
    model, _, _ = models.load_clip(name, weights, "cpu", False)
    assert_built_as(model, TINY_CLIP_CONFIG, weights, quick_gelu=False)
    resolved = models.resolve_model(str(config), None, ".", quick_gelu=True)
    assert_built_as(models.load_clip(*resolved[:2], "cpu", resolved[2])[0], TINY_CLIP_CONFIG, weights, True)
    renamed = tmp_path / f"{models.TINY_CLIP_NAME}-quickgelu.json"
    shutil.copy(config, renamed)
    shutil.copy(weights, renamed.with_suffix(".safetensors"))
    resolved = models.resolve_model(str(renamed), None, ".")
    assert resolved[2] is True
    assert_built_as(models.load_clip(*resolved[:2], "cpu", resolved[2])[0], TINY_CLIP_CONFIG, weights, True)


def write_open_clip_repo(folder, weights, quick_gelu):
    """A model folder as open_clip publishes them: open_clip_config.json and open_clip_model.safetensors."""
    folder.mkdir(parents=True)
    config = {"model_cfg": {**TINY_CLIP_CONFIG, "quick_gelu": quick_gelu}, "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copy(weights, folder / "open_clip_model.safetensors")


def test_local_dir_and_hf_hub_models_load_with_their_own_config(toy_clip, tmp_path, monkeypatch):
    _, _, weights = toy_clip
    write_open_clip_repo(tmp_path / "local", weights, quick_gelu=True)
    assert models.resolve_model(f"local-dir:{tmp_path / 'local'}", None, ".") == (
        f"local-dir:{tmp_path / 'local'}", None, False)
    model, preprocess, tokenizer = models.load_clip(f"local-dir:{tmp_path / 'local'}", None, "cpu")
    assert_built_as(model, TINY_CLIP_CONFIG, weights, quick_gelu=True)
    assert tokenizer(["a cat"]).shape == (1, 77)

    # an offline Hugging Face cache holding one open_clip repo, as hf_hub_download leaves it
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--toy--tiny-clip"
    write_open_clip_repo(repo / "snapshots" / commit, weights, quick_gelu=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, _, _ = models.load_clip("hf-hub:toy/tiny-clip", None, "cpu")
    assert_built_as(model, TINY_CLIP_CONFIG, weights, quick_gelu=False)
    with pytest.raises(models.Hw2Error, match="carries its own weights"):
        models.resolve_model("hf-hub:toy/tiny-clip", "openai", ".")


def test_openais_torchscript_file_loads_through_open_clips_openai_loader(tmp_path):
    torch.manual_seed(0)
    source = open_clip.CLIP(**OPENAI_LIKE, quick_gelu=True).eval()
    with torch.no_grad():  # OpenAI's weights are fp16 values, and open_clip's OpenAI loader rounds through fp16
        for tensor in source.state_dict().values():
            tensor.copy_(tensor.half())
    # OpenAI's files keep the attention mask outside the state dict: hold it as a plain attribute, then script
    object.__setattr__(source, "attn_mask", source._buffers.pop("attn_mask"))
    path = tmp_path / "ViT-B-32.pt"  # the name the `clip` package caches it under
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are TorchScript
        torch.jit.save(torch.jit.script(source), path)
        assert models.is_torchscript(path) and not models.is_torchscript(__file__)
        name, pretrained, _ = models.resolve_model("ViT-B-32", str(path), ".")
        model, preprocess, _ = models.load_clip(name, pretrained, "cpu")
    assert_built_as(model, OPENAI_LIKE, source.state_dict(), quick_gelu=True)
    assert preprocess.transforms[0].size == 32


def test_the_run_header_names_the_weights_and_activation(toy_world, tmp_path, capsys):
    p3.main(["--data", str(toy_world / "clip_zeroshot"), "--out", str(tmp_path), "--workers", "0", "--quick-gelu",
             "--device", "cpu"])
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Model "))
    weights = toy_world / models.TINY_CLIP_DIR / f"{models.TINY_CLIP_NAME}.safetensors"
    assert f"weights {weights}, QuickGELU activation" in header, header
    assert json.loads((tmp_path / "metrics.json").read_text())["activation"] == "QuickGELU"
