"""Test helper: an independent, plain-torch re-implementation of the ProFusion authors' PromptNet forward
(drboog/ProFusion ``diffusers/src/diffusers/models/promptnet.py``, ``PromptNetModel``, on the diffusers ~0.14 blocks
of that fork), with the official module names, so that its ``state_dict()`` has the official tensor names and shapes.
Written from the official code's structure (not copied), for the converter's tests (networks/promptnet_convert.py):
nothing here imports ComfyUI or the pack.

Blocks (diffusers names): ``ResnetBlock2D`` (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut),
``Transformer2DModel`` (norm, proj_in, transformer_blocks[BasicTransformerBlock: norm1, attn1, norm2, attn2, norm3,
ff = GEGLU feed-forward], proj_out), ``Downsample2D`` (conv, stride 2), ``CrossAttnDownBlock2D`` / ``DownBlock2D``,
``UNetMidBlock2DCrossAttn``; the ProFusion parts ``promptnet_cond_embedding``, ``vision_embedding``, the prompt
projections, ``region_prompt_output`` and the (unused) residual projections.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32


def tiny_config(**changes) -> dict:
    """A tiny SD2-shaped official config (4 levels, heads of width 64, linear projections), as ``config.json``
    holds it (the keys the released file has; the rest take the official defaults)."""
    config = {
        "_class_name": "PromptNetModel", "_diffusers_version": "0.15.0.dev0",
        "in_channels": 4, "out_channels": 4, "region_kernel_size": 8, "region_proj_channel": 16,
        "prompt_channel": 24, "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
        "block_out_channels": [64, 128, 128, 128], "res_block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-05, "cross_attention_dim": 32, "attention_head_dim": [1, 2, 2, 2],
        "dual_cross_attention": False, "use_linear_projection": True, "class_embed_type": None,
        "num_class_embeds": None, "upcast_attention": False, "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional", "timestep_post_act": None, "time_cond_proj_dim": None,
        "conv_in_kernel": 3, "projection_class_embeddings_input_dim": None, "use_clip_vision_embeds": True,
        "use_res": True, "with_noise": True, "sample_size": 64,
    }
    config.update(changes)
    return config


# -- diffusers blocks ---------------------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos | sin] of t·10000^(−i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.linear_1 = nn.Linear(cin, cout)
        self.linear_2 = nn.Linear(cout, cout)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(GROUPS, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class CrossAttention(nn.Module):
    def __init__(self, dim, heads, context=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context or dim, dim, bias=False)
        self.to_v = nn.Linear(context or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, dim = q.shape
        d = dim // self.heads

        def split(y):
            return y.reshape(b, -1, self.heads, d).permute(0, 2, 1, 3)  # [b, heads, tokens, d]
        weights = (split(q) @ split(k).transpose(-1, -2) * d ** -0.5).softmax(dim=-1)
        out = (weights @ split(v)).permute(0, 2, 1, 3).reshape(b, n, dim)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, channels, heads, context, linear):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.linear:
            y = self.proj_in(y.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            y = self.proj_in(y).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            y = self.proj_out(y.reshape(b, h, w, c).permute(0, 3, 1, 2))
        return y + x


class Downsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D`` (without)."""

    def __init__(self, cin, cout, temb, layers, heads, context, linear, attention, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, temb) for i in range(layers))
        if attention:
            self.attentions = nn.ModuleList(Transformer2DModel(cout, heads, context, linear) for _ in range(layers))
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, x, temb, context):
        states = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            states += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states += (x,)
        return x, states


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, channels, temb, heads, context, linear):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, context, linear)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb), ResnetBlock2D(channels, channels, temb)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class PromptEmbedding(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv_out = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.conv_in(x)))


# -- the official PromptNetModel -----------------------------------------------------------------------------------
class OfficialPromptNet(nn.Module):
    """``PromptNetModel`` for a config dict (``config.json``); ``vision_width`` is the ``vision_embedding`` input
    (1280 in the official code with ``use_clip_vision_embeds``; smaller for tiny tests)."""

    def __init__(self, config: dict, vision_width: int = 1280):
        super().__init__()
        c = config
        channels = list(c["block_out_channels"])
        res_channels = list(c.get("res_block_out_channels", channels))
        levels = len(channels)
        heads = c["attention_head_dim"]
        heads = [heads] * levels if isinstance(heads, int) else list(heads)
        temb = channels[0] * 4
        context, linear, layers = c["cross_attention_dim"], c["use_linear_projection"], c["layers_per_block"]
        proj, region = c["region_proj_channel"], c["region_kernel_size"]
        self.base = channels[0]
        self.conv_in = nn.Conv2d(c["in_channels"], channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.promptnet_cond_embedding = PromptEmbedding(c["in_channels"], channels[0])
        self.vision_embedding = nn.Linear(vision_width, context)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.down_prompt_projections = nn.ModuleList()
        self.residual_projections = nn.ModuleList()
        self.residual_projections_2 = nn.ModuleList()
        downsize = max(2 ** (levels - 1), 8)
        self.first_prompt_projection = nn.Conv2d(channels[0], proj, downsize, stride=downsize)

        def residual(cin, cout):
            self.residual_projections.append(nn.Conv2d(cin, cout, 1))
            self.residual_projections_2.append(nn.Conv2d(cout, cout, 1, bias=False))
        residual(channels[0], res_channels[0])
        cin = channels[0]
        for i, kind in enumerate(c["down_block_types"]):
            last = i == levels - 1
            self.down_blocks.append(DownBlock(cin, channels[i], temb, layers, heads[i], context, linear,
                                              kind == "CrossAttnDownBlock2D", not last))
            cin = channels[i]
            if not last:
                downsize //= 2
            self.down_prompt_projections.append(nn.Conv2d(channels[i], proj, downsize, stride=downsize))
            for _ in range(layers + (0 if last else 1)):
                residual(channels[i], res_channels[i])
        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb, heads[-1], context, linear)
        self.mid_prompt_projection = nn.Conv2d(channels[-1], proj, downsize, stride=downsize)
        self.mid_residual_projection = nn.Conv2d(channels[-1], res_channels[-1], 1)
        self.mid_residual_projection_2 = nn.Conv2d(res_channels[-1], res_channels[-1], 1, bias=False)
        self.region_prompt_output = nn.Conv2d((levels + 2) * proj, c["prompt_channel"], region, stride=region)

    def forward(self, sample, timestep, encoder_hidden_states, promptnet_cond):
        """``(prompt [B, n, prompt_channel], down residuals, mid residual)`` as the official forward returns them
        with ``return_dict=False``."""
        t = timestep.reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(timestep_features(t, self.base))
        x = self.conv_in(sample) + self.promptnet_cond_embedding(promptnet_cond)
        context = self.vision_embedding(encoder_hidden_states)
        states = (x,)
        feats = [self.first_prompt_projection(x)]
        for block, projection in zip(self.down_blocks, self.down_prompt_projections):
            x, more = block(x, emb, context)
            feats.append(projection(x))
            states += more
        x = self.mid_block(x, emb, context)
        feats.append(self.mid_prompt_projection(x))
        down = tuple(p2(F.silu(p1(s))) for s, p1, p2 in zip(states, self.residual_projections,
                                                             self.residual_projections_2))
        mid = self.mid_residual_projection_2(F.silu(self.mid_residual_projection(x)))
        region = self.region_prompt_output(torch.cat(feats, dim=1))
        prompt = region.reshape(region.shape[0], region.shape[1], -1).permute(0, 2, 1)
        return prompt, down, mid


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every tensor drawn from ``seed`` (norm scales near 1, biases small, weights ~ 1/√fan_in), so a tensor put in
    the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, (nn.GroupNorm, nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if norm and name == "weight":
                    p.copy_(1 + 0.2 * noise)
                elif name == "bias":
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / math.sqrt(p[0].numel()))
    return model


def make_official_folder(tmp, config: dict | None = None, *, vision_width: int = 48, seed: int = 0,
                         fmt: str = "safetensors", model: OfficialPromptNet | None = None) -> tuple[Path, OfficialPromptNet]:
    """``tmp/pipeline`` laid out as ``StableDiffusionPromptNetPipeline.save_pretrained`` writes it, with the
    PromptNet only (``promptnet/config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``); returns the
    folder and the official model whose weights it holds."""
    config = config or tiny_config()
    model = model or randomise(OfficialPromptNet(config, vision_width), seed)
    folder = Path(tmp) / "pipeline"
    sub = folder / "promptnet"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(sub / "diffusion_pytorch_model.safetensors"))
    elif fmt == "bin":
        torch.save(state, str(sub / "diffusion_pytorch_model.bin"))
    else:
        raise ValueError(fmt)
    for other in ("unet", "vae", "scheduler", "tokenizer", "openclip"):
        (folder / other).mkdir(exist_ok=True)
    return folder, model
