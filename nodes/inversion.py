"""Image inversion node (HiFi Tuner's DDIM + null-text inversion; maths in methods/inversion.py)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..methods import inversion
from . import sockets as S


class InvertImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeInvertImage",
            display_name="Invert Image (DDIM / null-text)",
            category=S.CATEGORY + "/inversion",
            description=("Inverts a latent image into the noise that deterministic DDIM sampling turns back into it "
                         "(DDIM inversion), and optionally optimises one negative-prompt embedding per step so that "
                         "the image is also reconstructed with classifier-free guidance (null-text inversion). To "
                         "reconstruct or edit: SamplerCustom with add_noise off, this node's sampler, the same SIGMAS "
                         "and cfg, and its latent."),
            search_aliases=["ddim inversion", "null-text inversion", "image to noise", "reconstruct"],
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="A caption of the image (the conditional prompt)."),
                io.Conditioning.Input("negative", tooltip="Usually the empty prompt: the null-text embedding the "
                                                          "optimisation starts from."),
                io.Latent.Input("latent", tooltip="VAE Encode of the image to invert."),
                io.Sigmas.Input("sigmas", tooltip="The sampling schedule (e.g. BasicScheduler, normal or "
                                                  "ddim_uniform), descending. Reconstruct with the same SIGMAS."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance you will sample with; the null-text embeddings are optimised for it."),
                io.Int.Input("null_text_steps", default=10, min=0, max=1000,
                             tooltip="Optimisation steps per sampling step (0 = plain DDIM inversion, which "
                                     "reconstructs only at cfg 1)."),
                io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=1.0, step=1e-4, round=False,
                               tooltip="Adam learning rate of the null-text embeddings (decays to half over the "
                                       "steps)."),
                io.Int.Input("fixed_point_iterations", default=0, min=0, max=50, optional=True,
                             tooltip="Refine every inversion step by fixed-point iteration so that DDIM retraces it "
                                     "more exactly (each costs one model evaluation per step)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=False, optional=True,
                               tooltip="Stop a step's optimisation below this loss (grows with the step, as in "
                                       "null-text inversion)."),
            ],
            outputs=[
                io.Latent.Output(display_name="noise_latent",
                                 tooltip="The inverted noise, in the form SamplerCustom with add_noise off starts "
                                         "from."),
                S.Inversion.Output(display_name="inversion",
                                   tooltip="The inversion trajectory and the per-step null-text embeddings (for "
                                           "nodes that build on the inversion)."),
                io.Sampler.Output(display_name="sampler",
                                  tooltip="Deterministic DDIM sampler that replays the null-text embeddings as the "
                                          "negative prompt, step by step. Use it with the same SIGMAS and cfg; "
                                          "without null-text steps it is plain DDIM."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, sigmas, cfg, null_text_steps, learning_rate,
                fixed_point_iterations=0, early_stop=1e-5) -> io.NodeOutput:
        inv = inversion.invert_image(model, positive, negative, latent, sigmas, cfg=cfg,
                                     null_text_steps=null_text_steps, learning_rate=learning_rate,
                                     fixed_point_iterations=fixed_point_iterations, early_stop=early_stop,
                                     node_id=S.node_id(cls))
        return io.NodeOutput(inversion.inverted_latent(model, inv, latent), inv, inversion.replay_sampler(inv))


NODES = [InvertImage]
