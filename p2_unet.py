"""The course's face UNet (noise predictor eps_theta(x_t, t)), checkpoint-compatible with `hw2_data/face/UNet.pt`.

    python -c "from p2_unet import load_face_unet; print(load_face_unet('hw2_data/face/UNet.pt'))"

The layout, key names and forward pass are those of the course's checkpoint; tests/data/face_unet_keys.txt lists
its 427 entries with their shapes. The course file has base width 128 (channels 128/256/512, time embedding
128 -> 512); every width here is a multiple of `base`, so the toy world ships the same network at base 32.
`load_face_unet` reads the base width from the checkpoint's shapes and loads it with `strict=True`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils import Hw2Error, load_torch_file

GROUPS = 32  # GroupNorm groups everywhere in the course network
MAX_PERIOD = 10000.0  # sinusoidal time embedding, as in "Attention Is All You Need"
SHOWN_KEYS = 5  # how many offending keys an architecture error lists per kind


class SinusoidalEmbedding(nn.Module):
    """t -> cat(sin(t * inv_freq), cos(t * inv_freq)); t is the raw integer timestep (e.g. 981) as float."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", torch.exp(torch.arange(0, dim, 2).float() * (-math.log(MAX_PERIOD) / dim)))

    def forward(self, t):
        angles = t.float()[:, None] * self.inv_freq[None, :]  # N x dim/2
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """conv1(swish(norm1(x))) + time projection, then norm2 -> swish -> conv2, plus a (1x1 conv) skip.

    The time projection is added *before* norm2, as in the course code. The course's dropout sits before
    conv2; it has no weights and is the identity at inference, so it is left out.
    """

    def __init__(self, in_channels, out_channels, time_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels))
        self.norm2 = nn.GroupNorm(GROUPS, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, residual: x + out(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)  # each N x HW x C
        o = F.scaled_dot_product_attention(q, k, v)  # default scale is 1/sqrt(C), C the last dim
        return x + self.out(o.transpose(-1, -2).reshape(n, c, h, w))


class ResBlockWithAttention(nn.Module):
    """A ResBlock, then SelfAttention when the block has one (keys `<name>.resblocks.*`, `<name>.attention.*`)."""

    def __init__(self, in_channels, out_channels, time_dim, attention=False):
        super().__init__()
        self.resblocks = ResBlock(in_channels, out_channels, time_dim)
        self.attention = SelfAttention(out_channels) if attention else None

    def forward(self, x, temb):
        h = self.resblocks(x, temb)
        return self.attention(h) if self.attention is not None else h


def downsample(channels):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1))


def upsample(channels):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1))


class FaceUNet(nn.Module):
    """eps_theta(x_t, t) for 3xHxW images, H and W divisible by 32 (five 2x downsamplings).

    Attribute names and their order are the checkpoint's (down1..down18, mid1, mid2, up1..up23, out), so
    `state_dict()` lists exactly the keys of the course file, in its order.
    """

    def __init__(self, base=128):
        super().__init__()
        if base <= 0 or base % GROUPS:
            raise ValueError(f"base width must be a positive multiple of {GROUPS} (GroupNorm groups), got {base}")
        self.base = base
        c1, c2, c4 = base, 2 * base, 4 * base
        time_dim = 4 * base
        self.time = nn.Sequential(SinusoidalEmbedding(base), nn.Linear(base, time_dim), nn.SiLU(),
                                  nn.Linear(time_dim, time_dim))

        def res(in_channels, out_channels, attention=False):
            return ResBlockWithAttention(in_channels, out_channels, time_dim, attention)

        # down path: every output goes on the skip stack (18 entries)
        self.down1 = nn.Conv2d(3, c1, 3, padding=1)
        self.down2, self.down3 = res(c1, c1), res(c1, c1)
        self.down4 = downsample(c1)
        self.down5, self.down6 = res(c1, c1), res(c1, c1)
        self.down7 = downsample(c1)
        self.down8, self.down9 = res(c1, c2), res(c2, c2)
        self.down10 = downsample(c2)
        self.down11, self.down12 = res(c2, c2), res(c2, c2)
        self.down13 = downsample(c2)
        self.down14, self.down15 = res(c2, c4, True), res(c4, c4, True)
        self.down16 = downsample(c4)
        self.down17, self.down18 = res(c4, c4), res(c4, c4)
        self.mid1, self.mid2 = res(c4, c4, True), res(c4, c4)
        # up path: every res block takes cat([h, skip]); the in-widths below are h + skip
        self.up1, self.up2, self.up3 = res(c4 + c4, c4), res(c4 + c4, c4), res(c4 + c4, c4)
        self.up4 = upsample(c4)
        self.up5, self.up6, self.up7 = res(c4 + c4, c4, True), res(c4 + c4, c4, True), res(c4 + c2, c4, True)
        self.up8 = upsample(c4)
        self.up9, self.up10, self.up11 = res(c4 + c2, c2), res(c2 + c2, c2), res(c2 + c2, c2)
        self.up12 = upsample(c2)
        self.up13, self.up14, self.up15 = res(c2 + c2, c2), res(c2 + c2, c2), res(c2 + c1, c2)
        self.up16 = upsample(c2)
        self.up17, self.up18, self.up19 = res(c2 + c1, c1), res(c1 + c1, c1), res(c1 + c1, c1)
        self.up20 = upsample(c1)
        self.up21, self.up22, self.up23 = res(c1 + c1, c1), res(c1 + c1, c1), res(c1 + c1, c1)
        self.out = nn.Sequential(nn.GroupNorm(GROUPS, c1), nn.SiLU(), nn.Conv2d(c1, 3, 3, padding=1))

    def forward(self, x, t):
        """x: N x 3 x H x W noisy images x_t; t: N timesteps (raw integers as float). Returns eps, N x 3 x H x W."""
        temb = self.time(t)
        h = self.down1(x)
        stack = [h]
        for i in range(2, 19):
            block = getattr(self, f"down{i}")
            h = block(h, temb) if isinstance(block, ResBlockWithAttention) else block(h)
            stack.append(h)
        h = self.mid2(self.mid1(h, temb), temb)
        for i in range(1, 24):
            block = getattr(self, f"up{i}")
            if isinstance(block, ResBlockWithAttention):
                h = block(torch.cat([h, stack.pop()], dim=1), temb)
            else:
                h = block(h)
        return self.out(h)


# ------------------------------------------------------------------------------------------- loading


def architecture_mismatch(model_shapes, checkpoint_shapes):
    """Describe how two {key: shape} maps differ ('' when they agree): first missing, unexpected, mis-shaped keys."""
    missing = [k for k in model_shapes if k not in checkpoint_shapes]
    unexpected = [k for k in checkpoint_shapes if k not in model_shapes]
    misshaped = [f"{k} {tuple(checkpoint_shapes[k])} (expected {tuple(model_shapes[k])})" for k in model_shapes
                 if k in checkpoint_shapes and tuple(checkpoint_shapes[k]) != tuple(model_shapes[k])]
    parts = []
    for name, keys in [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]:
        if keys:
            more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            parts.append(f"{len(keys)} {name} ({', '.join(keys[:SHOWN_KEYS])}{more})")
    return "; ".join(parts)


def face_unet_from_state_dict(state, source="state_dict"):
    """A FaceUNet (eval mode, float32, CPU) holding `state`; the base width is read from `down1.weight`.

    Anything that is not exactly the course architecture is an `Hw2Error` naming the offending keys.
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Hw2Error(f"{source} is not a state_dict of tensors (got {type(state).__name__}); "
                       f"pass the course's face UNet.pt")
    first_conv = state.get("down1.weight")
    if first_conv is None or first_conv.ndim != 4 or first_conv.shape[0] % GROUPS:
        raise Hw2Error(f"{source} is not a course face UNet: its 'down1.weight' "
                       f"{'is missing' if first_conv is None else f'has shape {tuple(first_conv.shape)}'} "
                       f"(expected (base, 3, 3, 3) with base a multiple of {GROUPS}); pass the course's face UNet.pt")
    with torch.device("meta"):  # no memory and no random init: every tensor comes from the checkpoint
        model = FaceUNet(base=first_conv.shape[0])
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problem = architecture_mismatch(expected, {k: v.shape for k, v in state.items()})
    if problem:
        raise Hw2Error(f"{source} does not match the course face UNet (base {model.base}): {problem}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def load_face_unet(path, device="cpu"):
    """Load a course-format `UNet.pt` (a plain state_dict) onto `device`, in eval mode."""
    return face_unet_from_state_dict(load_torch_file(path), source=str(path)).to(device)
