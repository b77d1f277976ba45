# Two entry points, each creates/refreshes .venv from the project's own files first:
#   make demo   segment a few coco-mini images and write overlays + a report to out/demo
#   make test   lint (ruff) + the default test suite (parity against the reference packages)
# More: make test-slow, make lint, make bench.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
DATA   ?= ../shared/data
# The CPU wheel of torch; a GPU user sets TORCH_SPEC to their CUDA build (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow lint format bench bench-speed bench-service bench-label eval-baselines weights \
	weights-ablation eval-own eval-runtimes bench-quant bench-int8 browser venv clean

venv: $(STAMP)

# Refreshes whenever the project's own dependency files change.
$(STAMP): pyproject.toml requirements-test.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@# Reference packages for parity tests: --no-deps, or pip would swap torch for a CUDA build.
	$(PY) -m pip install --quiet --no-deps -r requirements-test.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/leansam demo --data $(DATA)/coco-mini --out out/demo $(DEMO_ARGS)

test: $(STAMP) lint browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Debian's chromium for the web-page test (tests/test_web_page.py), installed once with apt-get when
# missing and this is root on Debian; elsewhere the test is skipped (and fails under CI=true).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the web-page test"; \
			{ apt-get update -qq >/dev/null && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
			echo "note: apt-get could not install chromium: the web-page test is skipped"; \
		else echo "note: no chromium (apt-get install chromium): the web-page test is skipped"; fi; }

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/encoder_latency.py --runs 15 --out benchmarks/results/encoder_latency.json
	$(PY) benchmarks/encoder_latency.py --models efficientvit-sam-l0 --runtime torch-opt --runs 15 \
		--out benchmarks/results/encoder_latency_torch_opt.json

# Runtimes, encoder table (incl. SAM-ViT-H), decoder per prompt, segment everything (~20 minutes).
bench-speed: $(STAMP)
	$(PY) benchmarks/speed.py --runs 7 --out benchmarks/results/speed.json

# `leansam serve` under load on loopback (16 clients, 2 x 30 s) -> BENCHMARKS.md.
bench-service: $(STAMP)
	$(PY) benchmarks/service_load.py --clients 16 --duration 30 \
		--out benchmarks/results/service_load.json

bench-label: $(STAMP)
	$(PY) benchmarks/label_dataset.py --images 2 --rounds 2 \
		--out benchmarks/results/label_dataset.json

# The baseline rows of EVALUATION.md on coco-mini val (about 30 minutes on 2 cores).
EVAL_ARGS = --images $(DATA)/coco-mini/val2017 \
	--annotations $(DATA)/coco-mini/annotations/instances_val2017.json --no-progress
eval-baselines: $(STAMP)
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model box-fill --protocol box --out out/eval/box-fill-box
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model ellipse-fill --protocol box --out out/eval/ellipse-fill-box
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model box-fill --protocol detector --detections gt \
		--out out/eval/box-fill-det
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model grabcut --protocol box --out out/eval/grabcut-box
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model grabcut --protocol click --clicks 1,3,5 \
		--out out/eval/grabcut-click
	$(VENV)/bin/leansam eval $(EVAL_ARGS) --model grabcut --protocol detector --detections gt \
		--out out/eval/grabcut-det

# leansam's own models (MODEL_CARD.md): data conversion, the decoder's box prior, teacher, student
# stage 1 + 2 (boxes, then boxes and clicks), publish to weights/. About 2 hours on 2 CPU cores with AMX (MODEL_CARD.md);
# every step resumes where an interrupted run stopped.
LEANSAM = $(VENV)/bin/leansam
OWN_IMAGES = $(DATA)/coco-mval/images $(DATA)/coco-mini/train2017
# The decoder warm start fails (min_box_iou) when it stays on its plateau: `make weights
# WARMUP_SEED=1` reruns it with another seed in folders of their own, and the teacher starts from
# that (keep WARMUP_SEED on every later run; README "leansam's own models"). The warm start runs on
# 1 thread: its result depends on the seed and the thread count (MODEL_CARD.md).
WARMUP_OUT = out/own/decoder-warmup$(if $(WARMUP_SEED),-seed$(WARMUP_SEED))
SHAPES_OUT = out/own/decoder-shapes$(if $(WARMUP_SEED),-seed$(WARMUP_SEED))
weights: $(STAMP)
	$(LEANSAM) data coco-to-sa1b --images $(DATA)/coco-mval/images \
		--annotations $(DATA)/coco-mval/annotations/instances.json --out out/sa1b/coco-mval
	$(LEANSAM) data coco-to-sa1b --images $(DATA)/coco-mini/train2017 \
		--annotations $(DATA)/coco-mini/annotations/instances_train2017.json \
		--out out/sa1b/coco-mini-train
	$(LEANSAM) data synth --out out/sa1b/synth --count 400 --seed 0
	$(LEANSAM) train prompt --recipe recipes/own/decoder-warmup.yaml --out $(WARMUP_OUT) \
		--threads 1 $(if $(WARMUP_SEED),--seed $(WARMUP_SEED)) --resume
	$(LEANSAM) train prompt --recipe recipes/own/decoder-shapes.yaml --out $(SHAPES_OUT) \
		--decoder-checkpoint $(WARMUP_OUT)/model.pt --resume
	$(LEANSAM) train finetune --recipe recipes/own/teacher.yaml \
		--decoder-checkpoint $(SHAPES_OUT)/model.pt --resume
	$(LEANSAM) train distill --recipe recipes/own/student-stage1.yaml --data $(OWN_IMAGES) --resume
	$(LEANSAM) train finetune --recipe recipes/own/student-stage2.yaml --resume
	$(LEANSAM) train finetune --recipe recipes/own/student-clicks.yaml --resume
	$(LEANSAM) weights publish --model leansam-vit-s --checkpoint out/own/teacher/model.pt
	$(LEANSAM) weights publish --model leansam-efficientvit-s --checkpoint out/own/student/model.pt

# The stage-2-only student of MODEL_CARD.md (an ablation, not part of `make weights`): no teacher and
# no stage 1, as many steps as the distilled student's stage 1 + 2 take in wall time (its recipe).
weights-ablation: $(STAMP)
	$(LEANSAM) train finetune --recipe recipes/own/student-stage2-only.yaml \
		--decoder-checkpoint $(SHAPES_OUT)/model.pt --resume

# The own-model rows of EVALUATION.md (box protocol on coco-mini val, never trained on).
eval-own: $(STAMP)
	$(LEANSAM) eval $(EVAL_ARGS) --model leansam-vit-s --protocol box --out out/eval/teacher-box
	$(LEANSAM) eval $(EVAL_ARGS) --model leansam-efficientvit-s --protocol box \
		--out out/eval/student-box
	$(LEANSAM) eval $(EVAL_ARGS) --model leansam-efficientvit-s --protocol click --clicks 1,3,5 \
		--out out/eval/student-click
	$(LEANSAM) eval $(EVAL_ARGS) --model leansam-efficientvit-s --protocol box \
		--checkpoint out/own/student-stage2/model.pt --out out/eval/student-s2-box
	$(LEANSAM) eval $(EVAL_ARGS) --model leansam-efficientvit-s --protocol click --clicks 1,3,5 \
		--checkpoint out/own/student-stage2/model.pt --out out/eval/student-s2-click
	$(LEANSAM) eval $(EVAL_ARGS) --model leansam-efficientvit-s --protocol box \
		--checkpoint out/own/student-stage2-only/model.pt --out out/eval/student-s2only-box

# Box mIoU of the shipped student on coco-mini val with each encoder runtime (BENCHMARKS.md): the
# accuracy cost of bf16 and INT8 (INT8 calibrated on the first 8 coco-mini train images).
RUNTIMES_EVAL = torch torch-bf16 onnx-int8
eval-runtimes: $(STAMP)
	for rt in $(RUNTIMES_EVAL); do \
		$(LEANSAM) eval $(EVAL_ARGS) --model leansam-efficientvit-s --protocol box --runtime $$rt \
			--calib-images $(DATA)/coco-mini/train2017 --out out/eval/runtime-$$rt || exit 1; \
	done

# QUANTIZATION.md: every method on both own models, the student at W8A8 / W6A6 / W4A4 and the
# teacher at W8A8 / W4A4 (calibrated on coco-mini train, box mIoU on val; about 2 hours), one
# process per model; resumable on the same weights (reruns skip finished configurations).
QUANT_ARGS = --calib-count 16 --iters 40 --threads 1
STUDENT_BITS = w8a8,w4a4,w6a6
TEACHER_BITS = w8a8,w4a4
QUANT_RECORDS = benchmarks/results/quantization-student.json \
	benchmarks/results/quantization-teacher.json
bench-quant: $(STAMP)
	$(PY) benchmarks/quantization.py $(QUANT_ARGS) --models leansam-efficientvit-s \
		--bits $(STUDENT_BITS) --out benchmarks/results/quantization-student.json & \
	$(PY) benchmarks/quantization.py $(QUANT_ARGS) --models leansam-vit-s \
		--bits $(TEACHER_BITS) --out benchmarks/results/quantization-teacher.json & \
	wait
	$(PY) benchmarks/quantization.py --markdown $(QUANT_RECORDS)

# Deployed INT8 (issue 22; BENCHMARKS.md "INT8 on CPU", QUANTIZATION.md "Deployed INT8"): AHCPTQ
# W8A8 files of both own models (~17 min each), box mIoU of every INT8 path (one process per model,
# 40-60 min), then the speed table (~15 min; run it alone).
INT8_DIR = out/int8
CALIB = --calib-images $(DATA)/coco-mini/train2017 \
	--calib-annotations $(DATA)/coco-mini/annotations/instances_train2017.json
$(INT8_DIR)/%-ahcptq-w8a8.pt: | $(STAMP)
	$(VENV)/bin/leansam quantize --model $* --method ahcptq --bits w8a8 $(CALIB) \
		$(QUANT_ARGS) --no-progress --out $@
bench-int8: $(STAMP) $(INT8_DIR)/leansam-efficientvit-s-ahcptq-w8a8.pt \
		$(INT8_DIR)/leansam-vit-s-ahcptq-w8a8.pt
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/int8.py --models "" --accuracy-models leansam-efficientvit-s \
		--quantized leansam-efficientvit-s=$(INT8_DIR)/leansam-efficientvit-s-ahcptq-w8a8.pt \
		--out benchmarks/results/int8-accuracy-student.json & \
	$(PY) benchmarks/int8.py --models "" --accuracy-models leansam-vit-s \
		--quantized leansam-vit-s=$(INT8_DIR)/leansam-vit-s-ahcptq-w8a8.pt \
		--out benchmarks/results/int8-accuracy-teacher.json & \
	wait
	$(PY) benchmarks/int8.py --accuracy-models "" --runs 5 \
		--quantized leansam-efficientvit-s=$(INT8_DIR)/leansam-efficientvit-s-ahcptq-w8a8.pt \
		--out benchmarks/results/int8-speed.json

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
