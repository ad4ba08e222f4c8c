"""Convert the ProFusion authors' released PromptNet (drboog/ProFusion README, "Download a model pre-trained on
FFHQ": a ``StableDiffusionPromptNetPipeline.save_pretrained`` folder) to the pack's PromptNet file
(networks/promptnet_convert.py; methods.md §5.3, §5.8).

    .venv/bin/python scripts/convert_profusion.py --pipeline ~/Downloads/profusion_ffhq
    .venv/bin/python scripts/convert_profusion.py --pipeline ~/Downloads/profusion_ffhq --out my_promptnet --overwrite
    .venv/bin/python scripts/convert_profusion.py --pipeline ... --out /some/where/promptnet.safetensors --dtype fp32

Reads ``<pipeline>/promptnet/config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``, read with
``torch.load(weights_only=True)``); the other components (unet, vae, openclip, ...) are not needed: the pack uses
ComfyUI's SD-2-base checkpoint and OpenCLIP ViT-H/14 CLIP vision file. ``--out`` is a file name in ComfyUI's
``models/promptnet`` (of the ComfyUI tree named by COMFYUI_PATH, else the default host tree; ``--models-dir`` to
choose another models folder) or a path; the file is written atomically, fp16 unless ``--dtype fp32``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)

DEFAULT_NAME = "profusion_ffhq_sd2"
log = logging.getLogger("comfyui_personalize")


def output_path(out: str, promptnet_file) -> Path:
    """A plain name → ``models/promptnet/<name>.safetensors``; anything with a folder in it → that path."""
    if os.sep in out or "/" in out or Path(out).is_absolute():
        path = Path(out).expanduser()
        return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")
    return promptnet_file.target(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="the unpacked official pipeline folder (holding promptnet/)")
    p.add_argument("--out", default=DEFAULT_NAME, help="file name in models/promptnet, or a path (default: "
                                                       f"{DEFAULT_NAME})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="weights of the written file")
    p.add_argument("--models-dir", help="ComfyUI models folder for a plain --out name (default: the ComfyUI tree's "
                                        "models/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch
    from harness import host as H
    tree = H.resolve_host_path(None)
    work = Path(tempfile.mkdtemp(prefix="convert_profusion_"))
    h = H.boot(tree, models_dir=Path(args.models_dir) if args.models_dir else tree / "models",
               output_dir=work / "out", input_dir=work / "in", temp_dir=work / "temp")
    PersonalizeError = h.pack("core.host").PersonalizeError
    artifacts = h.pack("core.artifacts")
    promptnet = h.pack("networks.promptnet")
    convert = h.pack("networks.promptnet_convert")
    try:
        path = output_path(args.out, promptnet.PROMPTNET_FILE)
        artifacts.check_writable(path, args.overwrite)  # before the work
        net = convert.convert_folder(args.pipeline)
        dtype = torch.float16 if args.dtype == "fp16" else torch.float32
        net.save(path, overwrite=args.overwrite, dtype=dtype,
                 metadata={"source": "drboog/ProFusion released PromptNet, converted by scripts/convert_profusion.py"})
    except PersonalizeError as e:
        log.error("%s", e)
        return 2
    log.info("%s written to %s; load it with PromptNet Loader next to an SD-2-base checkpoint (512 px, ε) and the "
             "OpenCLIP ViT-H/14 CLIP vision model (clip_vision_h).", net.describe(), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
