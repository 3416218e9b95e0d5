"""The face UNet: exact course key list, block semantics from the spec, strict loading and its error messages."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from p2_unet import FaceUNet, ResBlock, SelfAttention, face_unet_from_state_dict, load_face_unet
from utils import Hw2Error

KEY_LIST = Path(__file__).parent / "data" / "face_unet_keys.txt"  # the course checkpoint's entries and shapes


def meta_model(base):
    with torch.device("meta"):
        return FaceUNet(base=base)


def test_state_dict_is_the_course_key_list_line_by_line():
    expected = KEY_LIST.read_text().splitlines()
    ours = [f"{key} {tuple(value.shape)}" for key, value in meta_model(128).state_dict().items()]
    first_difference = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
    assert first_difference is None, f"line {first_difference + 1}: ours {ours[first_difference]!r}, " \
                                     f"course {expected[first_difference]!r}"
    assert len(ours) == len(expected) == 427
    parameters = sum(p.numel() for p in meta_model(128).parameters())
    assert round(parameters / 1e6, 1) == 113.7, parameters


def test_a_smaller_base_keeps_every_key_and_scales_the_widths():
    course, toy = meta_model(128).state_dict(), meta_model(32).state_dict()
    assert list(toy) == list(course)
    assert toy["up7.resblocks.conv1.weight"].shape == (128, 192, 3, 3)  # course: (512, 768, 3, 3)
    assert toy["time.1.weight"].shape == (128, 32)  # course: (512, 128)
    with pytest.raises(ValueError, match="multiple of 32"):
        FaceUNet(base=48)


def test_time_embedding_is_the_spec_sinusoid_sin_first():
    embed = FaceUNet(base=32).time[0]
    # the spec's formula for the course's base 128, evaluated at base 32
    expected_inv_freq = torch.exp(torch.arange(0, 32, 2).float() * (-math.log(10000) / 32))
    torch.testing.assert_close(embed.inv_freq, expected_inv_freq)
    t = torch.tensor([981.0, 1.0])
    out = embed(t)
    torch.testing.assert_close(out[:, :16], torch.sin(t[:, None] * expected_inv_freq))
    torch.testing.assert_close(out[:, 16:], torch.cos(t[:, None] * expected_inv_freq))


def test_resblock_adds_the_time_projection_before_norm2():
    torch.manual_seed(0)
    block = ResBlock(32, 64, time_dim=16).eval()
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    h = block.conv1(F.silu(F.group_norm(x, 32, block.norm1.weight, block.norm1.bias)))
    h = h + F.linear(F.silu(temb), block.time[1].weight, block.time[1].bias)[:, :, None, None]
    h = block.conv2(F.silu(F.group_norm(h, 32, block.norm2.weight, block.norm2.bias)))
    torch.testing.assert_close(block(x, temb), h + block.skip(x))
    assert isinstance(ResBlock(32, 32, 16).skip, torch.nn.Identity)  # no weights when widths agree


def test_attention_is_single_head_softmax_over_all_positions():
    torch.manual_seed(0)
    attention = SelfAttention(32).eval()
    x = torch.randn(2, 32, 4, 4)
    q, k, v = attention.qkv(attention.norm(x)).flatten(2).chunk(3, dim=1)  # each N x C x HW
    weights = torch.softmax(torch.einsum("nci,ncj->nij", q, k) / math.sqrt(32), dim=-1)  # over keys j
    o = torch.einsum("nij,ncj->nci", weights, v).reshape(2, 32, 4, 4)
    torch.testing.assert_close(attention(x), x + attention.out(o), atol=1e-5, rtol=1e-5)


def test_forward_keeps_the_input_shape_and_each_image_is_its_own():
    """Each image's output depends on its own x and t only (fails on a norm or a concatenation across the batch, or
    on the time embedding not reaching the blocks), and the last layer is the spec's GroupNorm, SiLU, 3x3 conv."""
    torch.manual_seed(0)
    model = FaceUNet(base=32).eval()
    x, t = torch.randn(2, 3, 32, 64), torch.tensor([981.0, 1.0])
    with torch.no_grad():
        eps = model(x, t)
        alone = [model(x[i:i + 1], t[i:i + 1]) for i in range(2)]
        swapped_t = model(x, t.flip(0))
        h = torch.randn(2, 32, 32, 64)
        out = model.out[2](F.silu(F.group_norm(h, 32, model.out[0].weight, model.out[0].bias)))
        torch.testing.assert_close(model.out(h), out)
    assert eps.shape == (2, 3, 32, 64) and eps.abs().max() > 0
    torch.testing.assert_close(torch.cat(alone), eps, atol=1e-5, rtol=1e-5)
    assert (swapped_t - eps).abs().amax(dim=(1, 2, 3)).min() > 1e-3, "the output does not depend on t"


def test_loading_reads_the_base_width_and_is_exact(tmp_path):
    torch.manual_seed(0)
    model = FaceUNet(base=32).eval()
    torch.save(model.state_dict(), tmp_path / "UNet.pt")
    loaded = load_face_unet(tmp_path / "UNet.pt")
    assert loaded.base == 32 and not loaded.training
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([501.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), atol=0, rtol=0)


def test_another_architecture_is_refused_naming_the_keys():
    state = {k: torch.zeros(v.shape) for k, v in meta_model(32).state_dict().items()}
    del state["mid1.attention.qkv.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["up7.resblocks.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    with pytest.raises(Hw2Error) as err:
        face_unet_from_state_dict(state, "other.pt")
    message = str(err.value)
    for text in ["other.pt", "1 missing (mid1.attention.qkv.weight)", "1 unexpected (extra.weight)",
                 "up7.resblocks.conv1.weight (128, 64, 3, 3) (expected (128, 192, 3, 3))"]:
        assert text in message, message


@pytest.mark.parametrize("state, reason", [
    ({"conv.weight": torch.zeros(8, 3, 3, 3)}, "'down1.weight' is missing"),
    ({"down1.weight": torch.zeros(20, 3, 3, 3)}, "has shape (20, 3, 3, 3)"),
    (torch.zeros(3), "not a state_dict"),
])
def test_files_that_are_not_face_unets_are_refused(state, reason):
    with pytest.raises(Hw2Error, match=reason.replace("(", r"\(").replace(")", r"\)")):
        face_unet_from_state_dict(state, "x.pt")
