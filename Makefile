# Two entry points: `make demo` (set up, then generate an image) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_SOURCE := models/tiny
DEMO_MODEL := models/tiny-onnx

.PHONY: demo test
.SECONDARY:

# The CLIP BPE vocabulary for locally built test models ships in open_clip_torch; --no-deps
# because its dependencies pull a torchvision that breaks beside the CPU torch.
$(VENV)/.installed-%: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$*]'
	$(PIP) install -q --no-deps open_clip_torch
	touch $@

$(DEMO_MODEL)/sdonnx.json: $(VENV)/.installed-export
	rm -rf $(DEMO_SOURCE)
	$(PY) -m sdonnx.export.synthetic $(DEMO_SOURCE)
	$(VENV)/bin/sdonnx export $(DEMO_SOURCE) $(DEMO_MODEL) --force

demo: $(DEMO_MODEL)/sdonnx.json
	$(VENV)/bin/sdonnx generate "a red circle on a white background" --model $(DEMO_MODEL) \
		--size 64x64 --steps 20 --seed 0 --out outputs

test: $(VENV)/.installed-test
	$(PY) -m pytest
