"""Reference training steps written the way diffusers' official example scripts write them.

* Textual Inversion: ``examples/textual_inversion/textual_inversion.py`` - the whole token-embedding matrix of
  transformers' ``CLIPTextModel`` is the optimised parameter (the rest of the text encoder and the UNet are
  frozen); after every optimizer step the rows of all other tokens are copied back from a saved copy
  (``index_no_updates``), so effectively one row trains. AdamW(weight_decay=1e-2), constant LR scheduler.
* DreamBooth-LoRA: ``examples/dreambooth/train_dreambooth_lora.py`` - ``unet.add_adapter(LoraConfig(r, lora_alpha=r,
  init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))``
  (PEFT), frozen text encoder with a pre-computed prompt embedding (``--pre_compute_text_embeddings``),
  ``clip_grad_norm_(max_grad_norm=1.0)`` every step, AdamW, constant LR scheduler.

Both use ``DDPMScheduler.add_noise`` + an ε-MSE loss on ``UNet2DConditionModel(...).sample``.
What is *not* in the step, on either side: the VAE encode (the scripts encode every step; the pack caches
latents once, so the benchmark gives both sides cached latents) and tokenisation (data loading).

The diffusers/transformers models are built with exactly the fixture's shapes and loaded with the fixture's
weights through diffusers' own LDM->diffusers converter (``convert_ldm_unet_checkpoint``,
``convert_ldm_clip_checkpoint``), so both sides run the same network on the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, steps_offset=1, prediction_type="epsilon")
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def diffusers_unet_config(unet_config: dict) -> dict:
    """The ``UNet2DConditionModel`` config equivalent to an LDM ``UNetModel`` config (what
    ``create_unet_diffusers_config_from_ldm`` derives from an original yaml), for SD1-style UNets."""
    levels = len(unet_config["channel_mult"])
    nrb = unet_config["num_res_blocks"]
    nrb = nrb if isinstance(nrb, int) else nrb[0]
    assert all(n == nrb for n in (unet_config["num_res_blocks"] if not isinstance(unet_config["num_res_blocks"], int)
                                  else [nrb])), "per-level res block counts are not supported by diffusers"
    td = unet_config["transformer_depth"]
    td_in = [td[i * nrb] for i in range(levels)]  # depth of the first res block of each level
    td_out = unet_config["transformer_depth_output"]
    td_up = [td_out[i * (nrb + 1)] for i in range(levels)]  # output side, levels from the bottom
    assert unet_config.get("num_heads", -1) > 0, "SD1-style fixed head count expected"
    return {
        "sample_size": 64,
        "in_channels": unet_config["in_channels"],
        "out_channels": unet_config["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in td_in],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in td_up],
        "block_out_channels": [unet_config["model_channels"] * m for m in unet_config["channel_mult"]],
        "layers_per_block": nrb,
        "cross_attention_dim": unet_config["context_dim"],
        "attention_head_dim": unet_config["num_heads"],  # diffusers' historical name: heads for SD1
        "use_linear_projection": unet_config["use_linear_in_transformer"],
        "transformer_layers_per_block": max(td_in) if max(td_in) else 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def clip_l_config():
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, projection_dim=768, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=1)


def build_reference_models(checkpoint_path, unet_config: dict):
    """(unet, text_encoder) in float32 with the checkpoint's weights, converted by diffusers' converters."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    ckpt = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(checkpoint_path)).items()}
    cfg = diffusers_unet_config(unet_config)
    unet = UNet2DConditionModel(**cfg)
    missing, unexpected = unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, cfg), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"UNet conversion: missing {missing[:5]} unexpected {unexpected[:5]}")
    te = CLIPTextModel(clip_l_config())
    te_sd = convert_ldm_clip_checkpoint(ckpt)  # "text_model.*" keys (transformers 4 layout)
    if not hasattr(te, "text_model"):  # transformers 5 flattened CLIPTextModel: no text_model submodule
        te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    missing, unexpected = te.load_state_dict(te_sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"CLIP conversion: missing {missing[:5]} unexpected {unexpected[:5]}")
    del ckpt
    return unet.float(), te.float()


def text_model(text_encoder):
    """``text_encoder.text_model`` in transformers 4, the model itself in transformers 5."""
    return getattr(text_encoder, "text_model", text_encoder)


def make_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(**SD15_SCHEDULER)


class ReferenceTI:
    """One Textual Inversion optimisation step as in diffusers' textual_inversion.py.

    ``mode="script"``: exactly the script's scheme (whole embedding matrix in AdamW, dense gradient, other rows
    restored after each step). ``mode="row"``: a leaner variant of the same step with the same models - the
    embedding matrix frozen and only the placeholder's vector trainable (a forward hook on the token embedding
    swaps it in), so the comparison isolates the network's cost from the script's optimizer overhead.
    """

    def __init__(self, unet, text_encoder, input_ids: torch.Tensor, placeholder_id: int, init_id: int,
                 latents: torch.Tensor, lr: float = 5e-3, seed: int = 0, mode: str = "script"):
        from diffusers.optimization import get_scheduler
        if mode not in ("script", "row"):
            raise ValueError(mode)
        self.mode = mode
        self.unet, self.te = unet, text_encoder
        self.input_ids = input_ids  # [1, 77], as the dataset yields it
        self.latents = latents       # cached VAE latents * scaling_factor (model space)
        self.noise_scheduler = make_scheduler()
        self.unet.requires_grad_(False)
        # "Freeze all parameters except for the token embeddings in text encoder"
        text_model(self.te).encoder.requires_grad_(False)
        text_model(self.te).final_layer_norm.requires_grad_(False)
        text_model(self.te).embeddings.position_embedding.requires_grad_(False)
        self.unet.train()
        self.te.train()
        # "Initialise the newly added placeholder token with the embeddings of the initializer token"
        with torch.no_grad():
            emb = self.te.get_input_embeddings().weight
            emb[placeholder_id] = emb[init_id].clone()
        self.placeholder_id = placeholder_id
        if mode == "script":
            self.orig_embeds_params = self.te.get_input_embeddings().weight.data.clone()
            self.index_no_updates = torch.ones((self.orig_embeds_params.shape[0],), dtype=torch.bool)
            self.index_no_updates[placeholder_id] = False
            params = self.te.get_input_embeddings().parameters()
        else:
            emb_layer = self.te.get_input_embeddings()
            emb_layer.requires_grad_(False)
            self.vector = torch.nn.Parameter(emb_layer.weight[placeholder_id].detach().clone())

            def swap_in(_module, args, out, _vec=self.vector, _pid=placeholder_id):
                return torch.where((args[0] == _pid).unsqueeze(-1), _vec.to(out.dtype), out)

            emb_layer.register_forward_hook(swap_in)
            params = [self.vector]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self):
        noise = torch.randn(self.latents.shape, generator=self.generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (self.latents.shape[0],),
                                  generator=self.generator).long()
        return timesteps, noise

    def loss(self, timesteps, noise):
        noisy_latents = self.noise_scheduler.add_noise(self.latents, noise, timesteps)
        encoder_hidden_states = self.te(self.input_ids)[0].to(dtype=torch.float32)
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states).sample
        target = noise  # prediction_type == "epsilon"
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")

    def step(self):
        timesteps, noise = self.sample()
        loss = self.loss(timesteps, noise)
        loss.backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if self.mode == "script":
            # "Let's make sure we don't update any embedding weights besides the newly added token"
            with torch.no_grad():
                self.te.get_input_embeddings().weight[self.index_no_updates] = \
                    self.orig_embeds_params[self.index_no_updates]
        return loss.detach().item()

    def trained_vector(self) -> torch.Tensor:
        if self.mode == "row":
            return self.vector.detach()
        return self.te.get_input_embeddings().weight[self.placeholder_id].detach()


class ReferenceLoRA:
    """One DreamBooth-LoRA optimisation step as in diffusers' train_dreambooth_lora.py (UNet LoRA only)."""

    def __init__(self, unet, encoder_hidden_states: torch.Tensor, latents: torch.Tensor, rank: int = 4,
                 lr: float = 1e-4, max_grad_norm: float = 1.0, seed: int = 0):
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        self.unet = unet
        self.unet.requires_grad_(False)
        unet_lora_config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                      target_modules=LORA_TARGETS)
        self.unet.add_adapter(unet_lora_config)
        self.unet.train()
        self.encoder_hidden_states = encoder_hidden_states  # pre-computed prompt embedding [1, 77, 768]
        self.latents = latents
        self.noise_scheduler = make_scheduler()
        self.params_to_optimize = list(filter(lambda p: p.requires_grad, self.unet.parameters()))
        self.optimizer = torch.optim.AdamW(self.params_to_optimize, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2,
                                           eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.max_grad_norm = max_grad_norm
        self.generator = torch.Generator().manual_seed(seed)

    def lora_modules(self) -> dict:
        """{module path without the PEFT wrapper: (lora_A Linear, lora_B Linear)}"""
        out = {}
        for name, mod in self.unet.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                out[name] = (mod.lora_A["default"], mod.lora_B["default"])
        return out

    def sample(self):
        noise = torch.randn(self.latents.shape, generator=self.generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (self.latents.shape[0],),
                                  generator=self.generator).long()
        return timesteps, noise

    def loss(self, timesteps, noise):
        noisy_model_input = self.noise_scheduler.add_noise(self.latents, noise, timesteps)
        model_pred = self.unet(noisy_model_input, timesteps, self.encoder_hidden_states, return_dict=False)[0]
        target = noise
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")

    def step(self):
        timesteps, noise = self.sample()
        loss = self.loss(timesteps, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params_to_optimize, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        return loss.detach().item()
