"""sd_v1: SD v1 single files in the original layout, offline, through a guarded unpickler and a safetensors cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

import sd_v1
from benchmarks.sd_v1_load_bench import architecture_summary, write_lightning_checkpoint
from utils import Hw2Error

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# SD v1's layout (4 levels: three with cross-attention, 2 resnets per level, 3 on the way up) at a tiny width
TINY_UNET = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=2, block_out_channels=(8, 8, 16, 16),
                 layers_per_block=2, norm_num_groups=4, up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
TINY_VAE = dict(block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=4,
                sample_size=64)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=49407)


def write_tiny_config(folder):
    """A diffusers pipeline folder of configs only, SD v1's files with tiny component sizes."""
    shutil.copytree(sd_v1.SD_V1_CONFIG, folder)
    for name, overrides in (("unet/config.json", TINY_UNET), ("vae/config.json", TINY_VAE),
                            ("text_encoder/config.json", TINY_TEXT)):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, **{k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in overrides.items()}}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny SD v1 pipeline, its config folder, and its weights in the original layout as a Lightning-era
    `model.ckpt` (a fresh copy per test: the loader writes its cache beside it)."""
    folder = tmp_path_factory.mktemp("tiny_sd_v1")
    config = write_tiny_config(folder / "config")
    pipe = sd_v1.random_pipeline(config, seed=3)
    state = sd_v1.original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
    save_file({key: value.contiguous() for key, value in state.items()}, folder / "original.safetensors")
    write_lightning_checkpoint(state, folder / "model.ckpt")
    return {"pipe": pipe, "config": config, "folder": folder}


def fresh_copy(tiny, tmp_path, name="model.ckpt"):
    """A copy of a fixture file in `tmp_path`: the loader writes its cache beside the file it loads."""
    shutil.copy2(tiny["folder"] / name, tmp_path / name)
    return tmp_path / name


def assert_same_weights(ours, theirs):
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys(), (name, sorted(set(a) ^ set(b))[:5])
        differ = [key for key in a if not torch.equal(a[key], b[key])]
        assert not differ, f"{name}: {len(differ)} tensors differ after the round trip, e.g. {differ[:3]}"


def test_our_original_layout_round_trips_bit_identically_through_diffusers_converter(tiny, tmp_path):
    # diffusers' own converter (from_single_file) reads what our writer wrote back into the same weights
    loaded = sd_v1.load_sd_pipeline(str(fresh_copy(tiny, tmp_path, "original.safetensors")), config=tiny["config"])
    assert_same_weights(tiny["pipe"], loaded)
    assert loaded.tokenizer("a <x> dog").input_ids[0] == 49406 and len(loaded.tokenizer) == 49408


@pytest.mark.slow
def test_lightning_ckpt_loads_offline_with_an_empty_hf_cache(tiny, tmp_path):
    """In a fresh interpreter with an empty HF_HOME (slow: the default suite loads the same model.ckpt in-process,
    offline, in the cache tests below)."""
    ckpt = fresh_copy(tiny, tmp_path)
    out = tmp_path / "loaded.safetensors"
    script = (f"import sd_v1, safetensors.torch as st; p = sd_v1.load_sd_pipeline({str(ckpt)!r}, "
              f"config={str(tiny['config'])!r}); st.save_file({{f'{{n}}.{{k}}': v.contiguous() for n in "
              f"('unet', 'vae', 'text_encoder') for k, v in getattr(p, n).state_dict().items()}}, {str(out)!r})")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Converted" in result.stdout
    loaded = load_file(out)
    for name in ("unet", "vae", "text_encoder"):
        for key, value in getattr(tiny["pipe"], name).state_dict().items():
            assert torch.equal(loaded[f"{name}.{key}"], value), f"{name}.{key}"
    assert not any((tmp_path / "empty_hf_home").rglob("*.json")), "something was fetched into the HF cache"


def test_the_cache_is_written_once_and_redone_when_the_source_changes(tiny, tmp_path, capsys):
    ckpt = fresh_copy(tiny, tmp_path)
    sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"])
    cache = tmp_path / ("model.ckpt" + sd_v1.CACHE_SUFFIX)
    assert "Converted" in capsys.readouterr().out and sd_v1.cache_is_valid(cache, ckpt, tiny["config"])
    assert sorted(p.name for p in cache.rglob("*.safetensors")) == ["diffusion_pytorch_model.safetensors",
                                                                    "diffusion_pytorch_model.safetensors",
                                                                    "model.safetensors"]
    written = (cache / sd_v1.STAMP_FILE).stat().st_mtime_ns
    cached = sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"])
    assert "Converted" not in capsys.readouterr().out and (cache / sd_v1.STAMP_FILE).stat().st_mtime_ns == written
    assert_same_weights(tiny["pipe"], cached)
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced source: the cache is redone
    assert not sd_v1.cache_is_valid(cache, ckpt, tiny["config"])
    sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"])
    assert "Converted" in capsys.readouterr().out and sd_v1.cache_is_valid(cache, ckpt, tiny["config"])


def converted_cache(tiny, tmp_path, capsys):
    """A fresh copy of the fixture's model.ckpt, converted once; returns (the file, its cache)."""
    ckpt = fresh_copy(tiny, tmp_path)
    sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"])
    assert "Converted" in capsys.readouterr().out
    return ckpt, tmp_path / ("model.ckpt" + sd_v1.CACHE_SUFFIX)


def reload_reports(tiny, ckpt, capsys):
    """Load `ckpt` again; (the pipeline, the warning lines printed, whether it was converted again)."""
    loaded = sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"])
    out = capsys.readouterr().out.splitlines()
    return loaded, [line for line in out if line.startswith("warning:")], any("Converted" in line for line in out)


def test_a_damaged_cache_is_converted_again_after_one_warning(tiny, tmp_path, capsys):
    ckpt, cache = converted_cache(tiny, tmp_path, capsys)
    weights = cache / "unet" / "diffusion_pytorch_model.safetensors"
    scheduler = cache / "scheduler" / "scheduler_config.json"
    beta_end = json.loads(scheduler.read_text())["beta_end"]
    damages = {  # an interrupted copy, and an edit that would load without an error but sample otherwise
        "truncated weights": lambda: weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2]),
        "changed config": lambda: scheduler.write_text(scheduler.read_text().replace(str(beta_end), "0.02")),
        "missing weights": lambda: (cache / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
    }
    for name, damage in damages.items():
        damage()
        loaded, warnings, converted = reload_reports(tiny, ckpt, capsys)
        assert len(warnings) == 1 and "is damaged" in warnings[0] and converted, (name, warnings)
        assert_same_weights(tiny["pipe"], loaded)
        assert loaded.scheduler.config.beta_end == beta_end, name
        assert sd_v1.cache_is_valid(cache, ckpt, tiny["config"]), f"{name}: the cache was not repaired"


def test_a_cache_that_fails_to_load_is_converted_again(tiny, tmp_path, capsys, monkeypatch):
    """Damage the stamp cannot see (large weights are sized, not hashed): the load fails, one warning, converted."""
    monkeypatch.setattr(sd_v1, "HASHED_FILE_SIZE", 0, raising=False)
    ckpt, cache = converted_cache(tiny, tmp_path, capsys)
    weights = cache / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"not a json head!"  # safetensors: an 8-byte header length, then the JSON header
    weights.write_bytes(bytes(data))
    assert sd_v1.cache_is_valid(cache, ckpt, tiny["config"])  # same sizes: the stamp holds
    loaded, warnings, converted = reload_reports(tiny, ckpt, capsys)
    assert len(warnings) == 1 and "fails to load" in warnings[0] and converted, warnings
    assert_same_weights(tiny["pipe"], loaded)


def test_another_diffusers_version_or_shipped_config_invalidates_the_cache(tiny, tmp_path, capsys, monkeypatch):
    config = Path(shutil.copytree(tiny["config"], tmp_path / "config"))
    tiny = {**tiny, "config": config}
    ckpt, cache = converted_cache(tiny, tmp_path, capsys)
    monkeypatch.setattr(sd_v1.diffusers, "__version__", "0.0.1")  # the converter the cache came from is gone
    _, warnings, converted = reload_reports(tiny, ckpt, capsys)
    assert converted and not warnings, "a cache from another diffusers version was used"
    assert sd_v1.cache_status(cache, ckpt, config) == ("valid", "")
    scheduler = config / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"beta_end": 0.012', '"beta_end": 0.02'))
    assert sd_v1.cache_status(cache, ckpt, config) == ("stale", "config_sha256")
    loaded, warnings, converted = reload_reports(tiny, ckpt, capsys)
    assert converted and not warnings and loaded.scheduler.config.beta_end == 0.02
    monkeypatch.undo()
    assert sd_v1.cache_status(cache, ckpt, config) == ("stale", "diffusers")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="maps file descriptors to paths through /proc")
def test_every_cache_file_is_fsynced_before_the_cache_is_renamed_into_place(tiny, tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def spy_replace(source, target, *args, **kwargs):
        events.append(("replace", os.path.realpath(source), os.path.realpath(target)))
        replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    ckpt = fresh_copy(tiny, tmp_path)
    sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"])
    cache = Path(os.path.realpath(tmp_path / ("model.ckpt" + sd_v1.CACHE_SUFFIX)))
    rename = next(i for i, event in enumerate(events) if event[0] == "replace" and event[2] == str(cache))
    temporary = Path(events[rename][1])
    synced = {event[1] for event in events[:rename] if event[0] == "fsync"}
    expected = {str(temporary / path.relative_to(cache)) for path in cache.rglob("*")} | {str(temporary)}
    assert expected <= synced, f"not fsynced before the rename: {sorted(expected - synced)[:3]}"
    assert ("fsync", str(cache.parent)) in events[rename:], "the rename itself was not fsynced"


def test_the_cache_is_readable_by_other_accounts_and_used_by_them(tiny, tmp_path, umask, monkeypatch, capsys):
    """Every file and folder of the cache has the mode open() / mkdir() give under the umask (0644 / 0755 under
    022: the grader's account can read it); an account that cannot write beside the checkpoint loads that cache
    instead of converting the file again into its own ~/.cache."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    file_mode, dir_mode = (tmp_path / "plain.txt").stat().st_mode, (tmp_path / "plain_dir").stat().st_mode
    ckpt = fresh_copy(tiny, tmp_path)
    sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"])
    cache = tmp_path / ("model.ckpt" + sd_v1.CACHE_SUFFIX)
    assert "Converted" in capsys.readouterr().out
    made = [cache, *cache.rglob("*")]
    wrong = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode) for p in made
             if p.stat().st_mode != (dir_mode if p.is_dir() else file_mode)}
    assert len(made) > 10 and not wrong, f"expected {oct(file_mode)} / {oct(dir_mode)}, got {wrong}"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other_account_cache"))
    monkeypatch.setattr(sd_v1.os, "access", lambda path, mode: Path(path) != ckpt.parent)
    assert sd_v1.cache_dir(ckpt) != cache  # this account would write its own copy elsewhere...
    assert_same_weights(tiny["pipe"], sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"]))
    assert "Converted" not in capsys.readouterr().out  # ...but reads the one already there
    assert not (tmp_path / "other_account_cache").exists()


def test_a_damaged_cache_this_account_cannot_replace_is_passed_over_once(tiny, tmp_path, monkeypatch, capsys):
    """The grader's account finds a damaged cache beside the student's checkpoint and cannot write there: it warns,
    converts once into its own cache, and the next run loads that copy instead of converting on every run."""
    ckpt, cache = converted_cache(tiny, tmp_path, capsys)
    weights = cache / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other_account_cache"))
    monkeypatch.setattr(sd_v1.os, "access", lambda path, mode: Path(path) != ckpt.parent)
    loaded, warnings, converted = reload_reports(tiny, ckpt, capsys)
    assert converted and len(warnings) == 1 and "not using it" in warnings[0], warnings
    assert_same_weights(tiny["pipe"], loaded)
    loaded, warnings, converted = reload_reports(tiny, ckpt, capsys)
    assert not converted and len(warnings) == 1, "the account's own valid cache was not used"
    assert_same_weights(tiny["pipe"], loaded)


def test_a_cache_that_cannot_be_written_still_loads_the_model(tiny, tmp_path, monkeypatch, capsys):
    """A full disk on the grading machine costs the next run a conversion, never this run's images."""
    ckpt = fresh_copy(tiny, tmp_path)

    def full_disk(pipe_self, folder, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sd_v1.StableDiffusionPipeline, "save_pretrained", full_disk)
    loaded = sd_v1.load_sd_pipeline(str(ckpt), config=tiny["config"])
    assert "could not write the cache" in capsys.readouterr().out
    assert_same_weights(tiny["pipe"], loaded)
    assert not (tmp_path / ("model.ckpt" + sd_v1.CACHE_SUFFIX)).exists(), "a half-written cache was left behind"


def test_the_cache_goes_to_the_user_cache_when_the_folder_is_read_only(tmp_path, monkeypatch):
    source = tmp_path / "ro" / "model.ckpt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(sd_v1.os, "access", lambda path, mode: Path(path) != source.parent)
    path = sd_v1.cache_dir(source)
    assert path.parent == tmp_path / "xdg" / "hw2" / "sd_v1" and path.name.startswith("model.ckpt.")
    assert sd_v1.cache_dir(tmp_path / "other" / "model.ckpt") != path  # two sources never share a cache


def test_a_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    torch.save({"state_dict": {"x": torch.zeros(1)}, "callbacks": Payload()}, tmp_path / "model.ckpt")
    with pytest.raises(Hw2Error, match=r"holds the class or function exec, which is refused"):
        sd_v1.load_sd_pipeline(str(tmp_path / "model.ckpt"))
    assert not marker.exists(), "the pickle ran code"
    assert not list(tmp_path.glob("*" + sd_v1.CACHE_SUFFIX + "*")), "a cache was written for a refused file"


def test_an_unknown_class_is_refused_with_its_name(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": UNet2DConditionModel}, tmp_path / "model.ckpt")
    with pytest.raises(Hw2Error, match=r"diffusers\.\S*UNet2DConditionModel, which is refused"):
        sd_v1.load_sd_pipeline(str(tmp_path / "model.ckpt"))


def test_a_wrong_architecture_names_the_first_mismatching_keys(tiny, tmp_path):
    with pytest.raises(Hw2Error, match=r"not a Stable Diffusion v1 .*\.input_blocks\.0\.0\.weight \[8, 4, 3, 3\] "
                                       r"\(expected \[320, 4, 3, 3\]\)"):
        sd_v1.load_sd_pipeline(str(fresh_copy(tiny, tmp_path, "original.safetensors")))  # SD v1.4's configs
    with pytest.raises(Hw2Error, match="does not exist"):
        sd_v1.load_sd_pipeline(str(tmp_path / "missing" / "model.ckpt"))


def test_the_shipped_config_is_sd_v14s_architecture():
    """Built on the meta device (no memory): SD v1.4's key names, shapes and sizes, as the original file has them."""
    shapes = sd_v1.expected_shapes(sd_v1.SD_V1_CONFIG)
    summary = architecture_summary({key: torch.empty(shape, device="meta") for key, shape in shapes.items()})
    assert summary == {"unet": 686, "vae": 248, "text_encoder": 197, "unet_params": 859_520_964}, summary
    known = {  # key names and shapes of the original sd-v1-4.ckpt (LatentDiffusion: UNetModel, AutoencoderKL, CLIP)
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    }
    assert {key: shapes.get(key) for key in known} == known
    text = json.loads((sd_v1.SD_V1_CONFIG / "text_encoder" / "config.json").read_text())
    assert (text["hidden_act"], text["hidden_size"], text["num_hidden_layers"]) == ("quick_gelu", 768, 12)
    unet = json.loads((sd_v1.SD_V1_CONFIG / "unet" / "config.json").read_text())
    assert (unet["cross_attention_dim"], unet["attention_head_dim"]) == (768, 8)
    scheduler = json.loads((sd_v1.SD_V1_CONFIG / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == ("scaled_linear", 0.00085,
                                                                                           0.012)
