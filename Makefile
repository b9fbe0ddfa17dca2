# nnoculation-edge: two commands on a fresh machine, `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs, Debian's dataset package included.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: all install dataset camera-deps ops-deps docs lint protos test test-fast demo demo-repair bench clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch/torchvision come from the local wheel cache where the machine has one (see README).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[edge,trainer,ray,pyav,dev]"
	touch $(STAMP)

install: $(STAMP)

# Camera tests and benches: GStreamer's RTSP server (with python3-gi, run by the system python3) and Debian's
# ffmpeg (H.264 files for bench/bench_cameras.py). Installed like the dataset: by apt as root, else a hint.
CAMERA_DEBS := gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-ugly python3-gi ffmpeg

camera-deps:
	@if dpkg -s $(CAMERA_DEBS) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CAMERA_DEBS); \
	else echo "Camera test packages are missing. Run: sudo apt-get update && sudo apt-get install -y $(CAMERA_DEBS)"; exit 1; fi

# The operator's kit: promtool (Debian's prometheus package) checks the alert rules and runs their unit tests;
# systemd-analyze (Debian's systemd) verifies the units in ops/systemd.
ops-deps:
	@if command -v promtool >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus systemd; \
	else echo "promtool or systemd-analyze is missing. Run: sudo apt-get update && sudo apt-get install -y prometheus systemd"; exit 1; fi

dataset:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing. Run: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; exit 1; fi

protos: $(STAMP)
	PYTHON=$(BIN)/python protos/generate.sh

lint: $(STAMP) ops-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict --follow-imports=silent docs/generate.py ops/grafana/dashboard.py
	PYTHON=$(BIN)/python protos/generate.sh --check
	$(BIN)/python docs/generate.py --check
	@mkdir -p runs && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir runs/site 2> runs/mkdocs.log \
		|| { grep -v '^INFO' runs/mkdocs.log; echo 'docs: mkdocs build --strict failed (a broken link or anchor above)'; exit 1; }
	cd ops/prometheus && promtool check config prometheus.yml && promtool test rules alerts_test.yml

# docs/reference/cli.md and the Grafana dashboard, generated again (after changing a flag or a panel)
docs: $(STAMP)
	$(BIN)/python docs/generate.py

test: $(STAMP) dataset camera-deps lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP) dataset camera-deps ops-deps
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The whole loop of DESIGN.md, quick profile (about 10-15 minutes on 2 cores): a checker4 BadNet, the
# pre-deployment treatment (bundle v1), `nnoc-trainer serve`, two `nnoc-edge run` agents replaying a stream
# with 10% poisoned inputs, the quarantine starting a repair, v2 pushed to the agents, and CA/ASR measured
# through the agents' inference endpoints. Report: $(DEMO_DIR)/report.json and a table on the terminal.
demo: $(STAMP) dataset
	$(BIN)/nnoc-trainer demo --profile quick --out $(DEMO_DIR)

# The post-deployment stage as offline batch jobs on the demo's bundle: a simulated stream of 1,000 inputs
# with 10% poisoned, the quarantine, the repair (quick profile) and bundle v2. Run after `make demo`.
demo-repair: $(STAMP) dataset
	@test -f $(DEMO_DIR)/predeploy/bundle/manifest.pb || { echo "run 'make demo' first"; exit 1; }
	$(BIN)/nnoc-trainer stream --bundle $(DEMO_DIR)/predeploy/bundle --trigger checker4 --target 0 \
		--cpd 0.1 --n 1000 --seed 0 --out $(DEMO_DIR)/quarantine
	$(BIN)/nnoc-trainer repair --dataset fashion-mnist --bundle $(DEMO_DIR)/predeploy/bundle --quarantine $(DEMO_DIR)/quarantine \
		--out $(DEMO_DIR)/repair --profile quick --eval-trigger checker4 --target 0
	$(BIN)/nnoc-edge verify --bundle $(DEMO_DIR)/repair/bundle
	@echo "Repaired model (ASR over the BadNet's eligible inputs):"; $(BIN)/nnoc-trainer evaluate --quiet \
		--model $(DEMO_DIR)/repair/bundle/primary.onnx --reference $(DEMO_DIR)/predeploy/bundle/primary.onnx \
		--trigger checker4 --target 0
	@echo "Unlearned quarantined inputs: $(DEMO_DIR)/repair/samples.png, bundle v2: $(DEMO_DIR)/repair/bundle"

bench: $(STAMP) dataset camera-deps
	$(BIN)/python -m bench.bench_predeploy
	$(BIN)/python -m bench.bench_repair --trigger checker4 --variants purified raw clean-ft bd-base clean-ft-bd --extra --profile quick
	$(BIN)/python -m bench.bench_repair --trigger square:4 --cpds 0.1 --extra --profile quick
	$(BIN)/python -m bench.bench_edge
	$(BIN)/python -m bench.bench_service
	$(BIN)/python -m bench.bench_reliability
	$(BIN)/python -m bench.bench_attacks --before 540fa5f
	$(BIN)/python -m bench.bench_demo
	$(BIN)/python -m bench.bench_foreign
	$(BIN)/python -m bench.bench_cyclegan_sizes
	$(BIN)/python -m bench.bench_detect
	$(BIN)/python -m bench.bench_cameras
	$(BIN)/python -m bench.bench_fleet
	$(BIN)/python -m bench.bench_ray
	$(BIN)/python -m bench.bench_field --seeds 0 1
	$(BIN)/python -m bench.bench_weak --trigger checker4
	$(BIN)/python -m bench.bench_rounds
	$(BIN)/python -m bench.bench_tsne
	$(BIN)/python -m bench.report

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
