# Thin wrapper around CMake. `make deps test` sets up a fresh Debian 12 machine and runs the tests.
BUILD ?= build
ASAN_BUILD ?= build-asan
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
QLORA_CUDA ?= AUTO
CMAKE_FLAGS ?=

# Debian packages the build needs (Check + subunit for tests, cJSON, OpenBLAS in its OpenMP
# build, PCRE2 and utf8proc for the tokenizer, CMake, a C toolchain).
DEB_PACKAGES := build-essential cmake pkg-config check libsubunit-dev libcjson-dev libopenblas-openmp-dev libpcre2-dev \
                libutf8proc-dev

.PHONY: all deps build test test-asan finetune demo bench gpu-check install clean

all: build

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all present"; fi

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DQLORA_CUDA=$(QLORA_CUDA) $(CMAKE_FLAGS)

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

# CPU code under AddressSanitizer + UndefinedBehaviorSanitizer.
test-asan:
	cmake -S . -B $(ASAN_BUILD) -DQLORA_CUDA=OFF -DQLORA_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS)

# The main job until qlora-ft exists: make a small random Llama-style model, quantize it to
# NF4 + double quantization in the bitsandbytes layout and back to BF16, then estimate what
# finetuning Llama-7B takes in each regime (table + demo/memory-llama-7b.svg).
# The main job: qlora-ft finetunes its embedded default model on its embedded data (output in
# qlora-out/: the PEFT adapter, checkpoints, loss.svg, metrics.jsonl), then tries the adapter.
finetune: build
	$(BUILD)/bin/qlora-ft --out qlora-out --metrics qlora-out/metrics.jsonl
	$(BUILD)/bin/qlora-ft generate --adapter qlora-out/adapter --template alpaca --temperature 0 \
	  --max-new 40 --prompt "What is 17 plus 25?"

demo: build
	rm -rf demo && mkdir -p demo
	$(BUILD)/bin/make-example-model demo/model
	$(BUILD)/bin/qlora-quantize --quiet demo/model demo/model-nf4
	$(BUILD)/bin/qlora-quantize --quiet --dequantize demo/model-nf4 demo/model-bf16
	$(BUILD)/bin/qlora-mem --preset llama-7b --svg demo/memory-llama-7b.svg

bench: build
	$(BUILD)/bin/qlora-bench

# On a GPU machine: build for sm_90, run tests (+ compute-sanitizer) and benchmarks.
gpu-check:
	bash tools/gpu-check.sh

install: build
	cmake --install $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) demo qlora-out
