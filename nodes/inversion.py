"""Image inversion node (HiFi Tuner's DDIM + null-text inversion; maths in methods/inversion.py)."""
from __future__ import annotations

from ..methods import inversion
from . import sockets as S

INVERSION = "INVERSION"  # methods.inversion.Inversion: trajectory, schedule, per-step null-text embeddings


class InvertImage:
    DESCRIPTION = ("Inverts a latent image into the noise that deterministic DDIM sampling turns back into it "
                   "(DDIM inversion), and optionally optimises one negative-prompt embedding per step so that the "
                   "image is also reconstructed with classifier-free guidance (null-text inversion). To "
                   "reconstruct or edit: SamplerCustom with add_noise off, this node's sampler, the same SIGMAS and "
                   "cfg, and its latent.")
    CATEGORY = S.CATEGORY + "/inversion"
    FUNCTION = "invert"
    RETURN_TYPES = ("LATENT", INVERSION, "SAMPLER")
    RETURN_NAMES = ("noise_latent", "inversion", "sampler")
    OUTPUT_TOOLTIPS = (
        "The inverted noise, in the form SamplerCustom with add_noise off starts from.",
        "The inversion trajectory and the per-step null-text embeddings (for nodes that build on the inversion).",
        "Deterministic DDIM sampler that replays the null-text embeddings as the negative prompt, step by step. "
        "Use it with the same SIGMAS and cfg; without null-text steps it is plain DDIM.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "positive": ("CONDITIONING", {"tooltip": "A caption of the image (the conditional prompt)."}),
                "negative": ("CONDITIONING", {"tooltip": "Usually the empty prompt: the null-text embedding "
                                                         "the optimisation starts from."}),
                "latent": ("LATENT", {"tooltip": "VAE Encode of the image to invert."}),
                "sigmas": ("SIGMAS", {"tooltip": "The sampling schedule (e.g. BasicScheduler, normal or "
                                                 "ddim_uniform), descending. Reconstruct with the same SIGMAS."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Guidance you will sample with; the null-text embeddings are "
                                             "optimised for it."}),
                "null_text_steps": ("INT", {"default": 10, "min": 0, "max": 1000,
                                            "tooltip": "Optimisation steps per sampling step (0 = plain DDIM "
                                                       "inversion, which reconstructs only at cfg 1)."}),
                "learning_rate": ("FLOAT", {"default": 1e-2, "min": 1e-6, "max": 1.0, "step": 1e-4,
                                            "round": False, "tooltip": "Adam learning rate of the null-text "
                                                                       "embeddings (decays to half over the steps)."}),
            },
            "optional": {
                "fixed_point_iterations": ("INT", {"default": 0, "min": 0, "max": 50,
                                                   "tooltip": "Refine every inversion step by fixed-point "
                                                              "iteration so that DDIM retraces it more exactly "
                                                              "(each costs one model evaluation per step)."}),
                "early_stop": ("FLOAT", {"default": 1e-5, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                         "tooltip": "Stop a step's optimisation below this loss (grows with the "
                                                    "step, as in null-text inversion)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def invert(self, model, positive, negative, latent, sigmas, cfg, null_text_steps, learning_rate,
               fixed_point_iterations=0, early_stop=1e-5, unique_id=None):
        inv = inversion.invert_image(model, positive, negative, latent, sigmas, cfg=cfg,
                                     null_text_steps=null_text_steps, learning_rate=learning_rate,
                                     fixed_point_iterations=fixed_point_iterations, early_stop=early_stop,
                                     node_id=unique_id)
        return (inversion.inverted_latent(model, inv, latent), inv, inversion.replay_sampler(inv))


NODE_CLASS_MAPPINGS = {"PersonalizeInvertImage": InvertImage}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeInvertImage": "Invert Image (DDIM / null-text)"}
