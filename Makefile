# launchkit: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp names the requirements' content: make reinstalls when the pins change, not when a checkout touches the file.
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
DATA ?=
CONFIG ?= accelerate_configs/cpu.yaml
OUT ?= runs
ARGS ?=
LAUNCH = $(VENV)/bin/accelerate launch --config_file $(CONFIG)

.PHONY: install demo demo-data test train-audio train-detection bench lint clean

install: $(STAMP)

# Installs only when the pins changed; with .venv in place and every pin satisfied, pip needs no index.
$(STAMP):
	test -x $(PY) || ($(PYTHON) -m venv $(VENV) && $(PY) -m pip install --quiet --upgrade pip)
	$(PY) -m pip install -r requirements.txt
	rm -f $(VENV)/.installed* && touch $(STAMP)

demo-data: $(STAMP)
	$(PY) scripts/make_demo_audio.py --output demo_data/speech_commands --layout speech_commands
	$(PY) scripts/make_demo_detection.py --output-dir demo_data/shapes

demo: demo-data
	$(LAUNCH) scripts/train_audio.py --data demo_data/speech_commands --output-dir $(OUT)/demo_audio --overwrite --epochs 4 --batch-size 32 --nominal-batch-size 32
	$(LAUNCH) scripts/train_detection.py --data demo_data/shapes/data.yaml --output-dir $(OUT)/demo_detection --overwrite --epochs 8
	@echo "audio metrics:";     $(PY) -c "import json;m=json.load(open('$(OUT)/demo_audio/metrics.json'));print({k:m[s][k] for s in ('test',) for k in ('accuracy','macro_f1')})"
	@echo "detection metrics:"; $(PY) -c "import json;m=json.load(open('$(OUT)/demo_detection/metrics.json'));s=m.get('test',m['val']);print({k:round(s[k],4) for k in ('map','map50')})"

test: $(STAMP)
	$(PY) -m pytest tests -q -n 2 --dist loadfile --timeout 600 --durations=15

train-audio: $(STAMP)
	@test -n "$(DATA)" || (echo "usage: make train-audio DATA=path/or/hub-id [CONFIG=accelerate_configs/X.yaml] [OUT=runs] [ARGS='--epochs 30']"; exit 2)
	$(LAUNCH) scripts/train_audio.py --data $(DATA) --output-dir $(OUT)/audio $(ARGS)

train-detection: $(STAMP)
	@test -n "$(DATA)" || (echo "usage: make train-detection DATA=data.yaml|instances.json|hub-id [CONFIG=...] [OUT=runs] [ARGS='--epochs 100']"; exit 2)
	$(LAUNCH) scripts/train_detection.py --data $(DATA) --output-dir $(OUT)/detection $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py --output benchmarks/RESULTS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check scripts shared tests benchmarks
	$(VENV)/bin/ruff format --check scripts shared tests benchmarks
	$(PY) -m pytest tests/test_budgets.py -q

clean:
	rm -rf demo_data runs
