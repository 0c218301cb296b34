# Two set-up commands: `make demo` (train on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo dpo-demo ablation video-demo test test-fast test-distributed lint bench gpu-check gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Qwen-VL's three stages on the embedded default, each starting from the previous one's output,
# then the final model evaluated on the held-out test split (prints the results table).
# A rerun moves the previous demo's runs aside (outputs/<stage>.old-<time>) rather than refusing.
# DEMO_OPTIONS go to every stage, e.g. a quick trial: make demo DEMO_OPTIONS="run.max_steps=4 run.warmup_steps=0"
DEMO_OPTIONS ?=
demo: install
	$(PY) train.py --cfg-path projects/pretrain.yaml --options run.overwrite=true $(DEMO_OPTIONS)
	$(PY) train.py --cfg-path projects/multitask.yaml --options model.load_from=outputs/pretrain run.overwrite=true $(DEMO_OPTIONS)
	$(PY) train.py --cfg-path projects/sft.yaml --options model.load_from=outputs/multitask run.overwrite=true $(DEMO_OPTIONS)
	$(PY) evaluate.py --cfg-path projects/eval/demo.yaml

# The optional fourth stage (README, "DPO on the embedded default"), after `make demo` (or `make demo dpo-demo`):
# projects/dpo.yaml trained from outputs/sft on the shapes world's preference pairs, evaluated like the SFT model
# (projects/eval/demo.yaml); prints the SFT model against the DPO model (VQA by question type, caption
# hallucination, CIDEr, grounding). DPO_OPTIONS go to the training, DPO_EVAL_OPTIONS to both evaluations, e.g.
# make dpo-demo DPO_OPTIONS="run.max_steps=4 run.warmup_steps=0" DPO_EVAL_OPTIONS="evaluation.vqa.max_samples=40"
DPO_OPTIONS ?=
DPO_EVAL_OPTIONS ?=
dpo-demo: install
	$(PY) scripts/dpo_demo.py --options $(DPO_OPTIONS) --eval-options $(DPO_EVAL_OPTIONS)

# The resolution ablation (README, "Resolution ablation"): the three rows of projects/ablations/ trained from
# scratch on the small-objects data set (generated under data/small_objects on first use), each evaluated on
# its test split; prints one table (VQA accuracy per question type, image tokens per sample, training time).
# ABLATION_OPTIONS go to every training, e.g. a quick trial: make ablation ABLATION_OPTIONS="run.max_steps=4 run.warmup_steps=0"
ABLATION_OPTIONS ?=
ablation: install
	$(PY) scripts/ablation.py --options $(ABLATION_OPTIONS)

# Video on the embedded default (README, "Video on the embedded default"): projects/video/train.yaml trained from
# scratch on the synthetic clips (generated under data/videos on first use), evaluated on their test split; prints
# the accuracy per question type beside the blind prior. VIDEO_OPTIONS go to the training, VIDEO_EVAL_OPTIONS to the
# evaluation, e.g. a quick trial:
# make video-demo VIDEO_OPTIONS="run.max_steps=4 run.warmup_steps=0" VIDEO_EVAL_OPTIONS="evaluation.vqa.max_samples=40"
VIDEO_OPTIONS ?=
VIDEO_EVAL_OPTIONS ?=
video-demo: install
	$(PY) scripts/video_demo.py --options $(VIDEO_OPTIONS) --eval-options $(VIDEO_EVAL_OPTIONS)

# Everything (CI runs it); the 25 slowest tests are listed at the end so that slow ones are seen.
test: install
	$(PY) -m pytest -q tests --durations=25

# The unit tests only (a few minutes on 2 CPU cores): no `integration` tests (subprocesses, torchrun,
# trainings of more than a few steps, a browser) and no `distributed` ones. `make test` runs them all.
test-fast: install
	$(PY) -m pytest -q tests -m "not integration and not distributed" --durations=10

# ruff (ruff.toml) and the layer contract (.importlinter: imports point down only); both report,
# neither rewrites anything. CI runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

# Only the multi-process tests (torchrun, 2-3 processes on the CPU); `make test` runs them too.
test-distributed: install
	$(PY) -m pytest -q -m distributed tests

# Every GPU check in one command, under 10 minutes on one GPU (README, "GPU checks"): the GPU-only tests
# (tests/test_gpu.py), throughput and MFU (benchmarks/gpu_throughput.py), full-size LoRA / Q-LoRA memory
# (benchmarks/finetune_memory.py --full-size). No install step: it runs on the GPU machine's own PyTorch (GPU_PYTHON,
# default python3); logs and a summary in $$OUT or gpu_check/. `make gpu-wheels`, here, writes .whl/: the wheels of
# this project's other packages, which gpu-check installs on a machine that has no network.
gpu-check:
	bash scripts/gpu_check.sh

gpu-wheels: install
	$(PY) scripts/gpu_wheels.py

bench: install
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/eval_gap.py

clean:
	rm -rf $(VENV) outputs data/synthetic
