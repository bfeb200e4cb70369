# `make demo`: set up the runtime (no torch) and generate with the embedded default model.
# `make test`: set up the test extra (and Chromium for the page's browser test) and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test default-model
.SECONDARY:

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-runtime: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

# The CLIP BPE vocabulary for locally built models ships in open_clip_torch; --no-deps because
# its dependencies pull a torchvision that breaks beside the CPU torch.
$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps open_clip_torch
	touch $@

# The page's browser test drives Debian's Chromium (tests/test_page.py).
$(VENV)/.installed-browser: | $(VENV)/bin/python
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }
	touch $@

demo: $(VENV)/.installed-runtime
	$(VENV)/bin/sdonnx generate "a red circle on a white background" --seed 0 --out outputs

test: $(VENV)/.installed-test $(VENV)/.installed-browser
	SDONNX_REQUIRE_BROWSER=1 $(PY) -m pytest

# How models/default was made (about 420 minutes on 2 cores). At 64 pixels: train the
# autoencoder, then the UNet and text encoder (stage 1); fine-tune the VAE decoder longer, in
# three runs (stages 2-4); continue the UNet and text encoder with Min-SNR weighting (stage 5).
# Then at 128 pixels (progressive resolution; the encoder, so the latent space, stays fixed), two
# runs side by side on one core each: the decoder (stage 6) and the UNet and text encoder
# (stage 7); take stage 7's UNet with stage 6's autoencoder; export with sdonnx.
# Stages 1-3 ran with a constant learning rate, the others with a cosine decay. Last, two
# fine-tunes where a fraction of the captions describe another scene, so that classifier-free
# guidance has work to do, as in SD (stage 9: 40% for 3,600 batches, 66 minutes; then 20% for
# 3,000 batches, 96 minutes on one core), each from a bank of 16,384 encoded scenes.
STAGES = models/stage1 models/stage1.vae models/stage2 models/stage3 models/stage4 models/stage5 models/stage6 models/stage7 models/stage8 models/stage9
default-model: $(VENV)/.installed-test
	rm -rf $(STAGES) models/default-diffusers models/default
	$(PY) models/train.py models/stage1 --image-size 64 --vae-minutes 12 --decoder-minutes 0 --unet-minutes 48 --lr-schedule constant --min-snr 0
	$(PY) models/train.py models/stage2 --image-size 64 --decoder-only models/stage1 --decoder-minutes 14 --lr-schedule constant
	$(PY) models/train.py models/stage3 --image-size 64 --decoder-only models/stage2 --decoder-minutes 12 --seed 1 --lr-schedule constant
	$(PY) models/train.py models/stage4 --image-size 64 --decoder-only models/stage3 --decoder-minutes 25 --seed 2
	$(PY) models/train.py models/stage5 --image-size 64 --unet-from models/stage4 --unet-minutes 55 --lr 4e-4 --min-snr 5 --seed 4
	$(PY) models/train.py models/stage6 --image-size 128 --decoder-only models/stage5 --decoder-minutes 50 --lr 5e-4 --seed 5 --threads 1 & \
	  decoder=$$!; \
	  $(PY) models/train.py models/stage7 --image-size 128 --unet-from models/stage5 --unet-minutes 90 --lr 3e-4 --min-snr 5 --seed 6 --threads 1 \
	  && wait $$decoder
	$(PY) models/train.py models/stage8 --image-size 128 --unet-from models/stage7 --vae-from models/stage6 --unet-minutes 0
	$(PY) models/train.py models/stage9 --image-size 128 --unet-from models/stage8 --unet-steps 3600 --latent-bank 16384 --lr 3e-4 --min-snr 5 --unrelated 0.4 --seed 20
	$(PY) models/train.py models/default-diffusers --image-size 128 --unet-from models/stage9 --unet-steps 3000 --latent-bank 16384 --lr 2e-4 --min-snr 5 --unrelated 0.2 --seed 21 --threads 1
	rm -rf $(STAGES)
	$(VENV)/bin/sdonnx export models/default-diffusers models/default --default-guidance 5
