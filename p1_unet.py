"""P1's network: a U-Net conditioned on (timestep, digit, dataset), for 3x28x28 images (no diffusion math here).

Built by p1_model.Diffusion from a P1Config; the label ids it embeds (digit 0-9, dataset 0-1, each with a learned
null id for classifier-free guidance) are defined here and used through p1_model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_DIGITS = 10
NUM_DATASETS = 2


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual path; the conditioning embedding sets a per-channel
    scale and shift after the second norm (FiLM / adaptive GroupNorm, as in improved-diffusion)."""

    def __init__(self, in_ch, out_ch, embed_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(embed_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual path."""

    def __init__(self, channels, heads, groups):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # softmax(q^T k / sqrt(d)) written out: at 49 positions F.scaled_dot_product_attention slowed CPU bf16 training.
        # q and k are each scaled by d^-1/4 before the product, as improved-diffusion's QKVAttention does: q^T k
        # itself can exceed fp16's largest value, 65504, where q^T k / sqrt(d) does not.

        scale = (c // self.heads) ** -0.25
        weights = ((q * scale).transpose(-1, -2) @ (k * scale)).softmax(dim=-1)  # [B, heads, HW, HW]
        out = v @ weights.transpose(-1, -2)  # [B, heads, head_dim, HW]
        return x + self.proj(out.reshape(b, c, h, w))


class ConditionalUNet(nn.Module):
    """U-Net eps/v-predictor for 3x28x28 images conditioned on (timestep, digit 0-9 or null, dataset 0-1 or null).

    The time embedding (sinusoidal + MLP) and the learned digit and dataset embeddings are summed into one
    vector that every residual block receives. Down path: per level `blocks_per_level` residual blocks, then a
    stride-2 conv; the input conv's, every block's and every stride-2 conv's output are kept as skips; the lowest
    level adds self-attention after each block; the middle is block-attention-block. The up path has
    `blocks_per_level + 1` blocks per level, each concatenating one skip, so every skip is used once (the layout
    of DDPM's and improved-diffusion's U-Net).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        c, e, g = config.channels * config.unshuffle**2, config.embed_dim, config.groups
        widths, last = config.widths, len(config.widths) - 1
        self.time_mlp = nn.Sequential(nn.Linear(widths[0], e), nn.SiLU(), nn.Linear(e, e))
        self.digit_emb = nn.Embedding(NUM_DIGITS + 1, e)
        self.dataset_emb = nn.Embedding(NUM_DATASETS + 1, e)
        self.conv_in = nn.Conv2d(c, widths[0], 3, padding=1)

        def level_blocks(chans_in, width, level):
            blocks = nn.ModuleList()
            for ch in chans_in:
                blocks.append(ResBlock(ch, width, e, g, config.dropout))
                blocks.append(SelfAttention(width, config.attention_heads, g) if level == last else nn.Identity())
            return blocks

        self.down, self.downsample, skip_widths, ch = nn.ModuleList(), nn.ModuleList(), [widths[0]], widths[0]
        for level, width in enumerate(widths):
            self.down.append(level_blocks([ch] + [width] * (config.blocks_per_level - 1), width, level))
            skip_widths += [width] * config.blocks_per_level
            ch = width
            if level < last:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_widths.append(ch)
        self.mid1 = ResBlock(ch, ch, e, g, config.dropout)
        self.mid_attn = SelfAttention(ch, config.attention_heads, g)
        self.mid2 = ResBlock(ch, ch, e, g, config.dropout)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            chans_in = []
            for _ in range(config.blocks_per_level + 1):
                chans_in.append(ch + skip_widths.pop())
                ch = width
            self.up.append(level_blocks(chans_in, width, level))
            self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                               nn.Conv2d(ch, widths[level - 1], 3, padding=1))
                                 if level > 0 else nn.Identity())
            ch = widths[level - 1] if level > 0 else ch
        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predict 0 at first: the loss starts at the target's variance
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, digit, dataset):
        """x: [B, 3, 28, 28], t: [B] array indices, digit: [B] in 0..10, dataset: [B] in 0..2 -> [B, 3, 28, 28]."""
        emb = (self.time_mlp(timestep_embedding(t, self.config.widths[0])) + self.digit_emb(digit)
               + self.dataset_emb(dataset))
        h = self.conv_in(F.pixel_unshuffle(x, self.config.unshuffle))  # [B, 3 r^2, 28/r, 28/r]
        skips = [h]
        for level, blocks in enumerate(self.down):
            for block, attn in zip(blocks[::2], blocks[1::2]):
                h = attn(block(h, emb))
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, up in zip(self.up, self.upsample):
            for block, attn in zip(blocks[::2], blocks[1::2]):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            h = up(h)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.config.unshuffle)
