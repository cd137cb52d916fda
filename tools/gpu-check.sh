#!/usr/bin/env bash
# The one script a session with a GPU machine runs (through the device tool, in the repo root):
#
#   tools/gpu-check.sh [STEP...]      STEP: env build test sanitize bench (default: all, in order)
#
#   env       nvidia-smi, nvcc, cmake and compiler versions
#   build     configure build-gpu with -DQLORA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90, then build
#   test      ctest (the CUDA backend is tested because a device is visible)
#   sanitize  every test executable (or those matching the glob QLORA_SANITIZE_TESTS) under
#             compute-sanitizer memcheck; the quantization tests also under racecheck, initcheck
#             and synccheck
#   bench     build-gpu/bin/qlora-bench (CUDA at a size that leaves L2, then all backends), its
#             linear, adamw and model subcommands on CUDA, and a 30-step qlora-ft run on the GPU
#
# Nothing can be installed on the GPU machine. Run tools/gpu-deps.sh here first and carry
# .gpu-deps: Check, libsubunit, cJSON and pkgconf come from its unpacked tree (.gpu-deps/root,
# or the trees named by QLORA_CHECK_ROOT / QLORA_CJSON_ROOT); so does OpenBLAS when pkg-config
# finds none on the machine.
#
# Every log lands in $OUT (./build-gpu/out when OUT is unset) as at most 9 files: summary.txt,
# env.txt, build.log, ctest.log, sanitizer.log, bench.txt, ft-metrics.jsonl, logs.tar.gz (all
# individual logs). The
# whole run stays inside QLORA_GPU_CHECK_BUDGET seconds (default 540, under the device tool's
# 600 s per command); a step that no longer fits is skipped and counted as a failure. Steps can
# be run in separate calls: build-gpu stays on a warm machine between calls.
# Exit status: 0 only when every step that was asked for passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)

build="build-gpu"
out=${OUT:-$repo/$build/out}
budget=${QLORA_GPU_CHECK_BUDGET:-540}
bench_args_cuda=${QLORA_BENCH_CUDA_ARGS:---backend cuda --size 1024 --iters 20}
bench_args_all=${QLORA_BENCH_ALL_ARGS:---backend all}
start=$(date +%s)
mkdir -p "$out"
logs=$(mktemp -d)
summary=$out/summary.txt
: >"$summary"
failures=0

remaining() { echo $((budget - ($(date +%s) - start))); }

# record STEP STATUS DETAIL: one line of the summary.
record() {
    printf '%-34s %-8s %s\n' "$1" "$2" "$3" | tee -a "$summary"
    if [ "$2" != PASS ] && [ "$2" != INFO ]; then failures=$((failures + 1)); fi
}

# run_logged NAME LIMIT LOG CMD...: runs CMD with a time limit (capped by the budget left), all
# output appended to LOG; returns its exit status (124 on timeout, 125 when out of budget).
run_logged() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left
    left=$(remaining)
    if [ "$left" -le 5 ]; then
        echo "== $name: skipped, budget of ${budget}s used up" >>"$log"
        return 125
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" >>"$log"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s" >>"$log"
    return $rc
}

status_word() {
    case $1 in
    0) echo PASS ;;
    124 | 137) echo TIMEOUT ;;
    125) echo SKIPPED ;;
    *) echo FAIL ;;
    esac
}

# ---------------------------------------------------------------- dependencies
# Unpacked .deb trees: rewrite their .pc files to point into the tree, put their libraries on
# LD_LIBRARY_PATH, and use their pkgconf when the machine has no pkg-config. The machine's own
# OpenBLAS is preferred; the carried one (unpacked without update-alternatives, so in its
# openblas-openmp dirs) is used only when pkg-config finds none.
setup_deps() {
    local roots=() r
    for r in "${QLORA_CHECK_ROOT:-}" "${QLORA_CJSON_ROOT:-}"; do
        [ -n "$r" ] && roots+=("$(cd "$r" && pwd)")
    done
    if [ ${#roots[@]} -eq 0 ] && [ -d "$repo/.gpu-deps/root" ]; then
        roots+=("$repo/.gpu-deps/root")
    fi
    local pcdir=$repo/$build/deps-pkgconfig
    rm -rf "$pcdir"
    mkdir -p "$pcdir"
    local prefix_path="" lib_path="" pkgconf=""
    for r in $(printf '%s\n' "${roots[@]}" | sort -u); do
        local pc
        for pc in "$r"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc "$r"/usr/lib/pkgconfig/*.pc "$r"/usr/share/pkgconfig/*.pc; do
            [ -e "$pc" ] || continue
            sed -E "s#^(prefix|exec_prefix|libdir|includedir)=/usr#\\1=$r/usr#" "$pc" >"$pcdir/$(basename "$pc")"
        done
        prefix_path="$prefix_path${prefix_path:+;}$r/usr"
        lib_path="$lib_path${lib_path:+:}$r/usr/lib/x86_64-linux-gnu"
        [ -x "$r/usr/bin/pkgconf" ] && pkgconf=$r/usr/bin/pkgconf
    done
    if [ -n "$lib_path" ]; then
        export LD_LIBRARY_PATH="$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    deps_cmake_args=()
    [ -n "$prefix_path" ] && deps_cmake_args+=("-DCMAKE_PREFIX_PATH=$prefix_path")
    if ! command -v pkg-config >/dev/null 2>&1; then
        if [ -n "$pkgconf" ]; then
            deps_cmake_args+=("-DPKG_CONFIG_EXECUTABLE=$pkgconf")
            PKG_CONFIG=$pkgconf
        else
            PKG_CONFIG=""
        fi
    else
        PKG_CONFIG=$(command -v pkg-config)
    fi
    local openblas_source="system"
    if [ -z "$PKG_CONFIG" ] || ! "$PKG_CONFIG" --exists openblas 2>/dev/null; then
        openblas_source="(none found)"
        for r in $(printf '%s\n' "${roots[@]}" | sort -u); do
            local ob=$r/usr/lib/x86_64-linux-gnu/openblas-openmp
            [ -e "$ob/pkgconfig/openblas.pc" ] || continue
            sed -E "s#^(prefix|exec_prefix|libdir|includedir)=/usr#\\1=$r/usr#" "$ob/pkgconfig/openblas.pc" >"$pcdir/openblas.pc"
            export LD_LIBRARY_PATH="$ob${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            # libgfortran5/libquadmath0 only when the machine lacks them: a carried copy first on
            # LD_LIBRARY_PATH would shadow the system's own.
            if ldd "$ob/libopenblas.so.0" 2>/dev/null | grep -q 'not found' && [ -d "$r/usr/lib/x86_64-linux-gnu/openblas-runtime" ]; then
                export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$r/usr/lib/x86_64-linux-gnu/openblas-runtime"
            fi
            openblas_source="carried $ob"
            break
        done
    fi
    export PKG_CONFIG_PATH="$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
    echo "dependency trees: ${roots[*]:-(none)}"
    echo "PKG_CONFIG_PATH=$PKG_CONFIG_PATH"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "pkg-config: ${PKG_CONFIG:-(none)}"
    echo "openblas: $openblas_source"
    if [ "$openblas_source" != system ] && [ "$openblas_source" != "(none found)" ]; then
        echo "  ldd libopenblas.so.0:"
        ldd "${openblas_source#carried }/libopenblas.so.0" 2>&1 | sed 's/^/  /'
    fi
    if [ -n "$PKG_CONFIG" ]; then
        local m
        for m in check libcjson openblas; do
            echo "  $m: $("$PKG_CONFIG" --modversion "$m" 2>&1) | $("$PKG_CONFIG" --cflags --libs "$m" 2>&1)"
        done
    fi
}

find_cuda_tool() {
    local name=$1 d
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return 0
    fi
    for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer /opt/nvidia/*/bin; do
        [ -x "$d/$name" ] && { echo "$d/$name"; return 0; }
    done
    return 1
}

# ---------------------------------------------------------------- steps
step_env() {
    local log=$out/env.txt
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "host: $(uname -a)"
        echo "repo: $repo"
        git -C "$repo" log -1 --format='commit: %H %s' 2>/dev/null || echo "commit: (none)"
        echo "--- nvidia-smi"
        nvidia-smi 2>&1 || echo "nvidia-smi failed or is missing"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
        echo "--- nvcc"
        "${NVCC:-nvcc}" --version 2>&1 || echo "nvcc missing"
        echo "--- compute-sanitizer: $(find_cuda_tool compute-sanitizer || echo missing)"
        echo "--- cmake: $(cmake --version 2>&1 | head -1)"
        echo "--- cc: $(cc --version 2>&1 | head -1)"
        echo "--- cores: $(nproc)"
        setup_deps
    } >"$log" 2>&1
    cat "$log"
    if nvidia-smi -L >/dev/null 2>&1; then
        record env INFO "$(nvidia-smi -L 2>/dev/null | head -1)"
    else
        record env FAIL "nvidia-smi -L failed: no GPU visible"
    fi
}

step_build() {
    local log=$logs/build.log rc
    : >"$log"
    run_logged configure 120 "$log" cmake -S "$repo" -B "$repo/$build" -DQLORA_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release "${deps_cmake_args[@]}"
    rc=$?
    if [ $rc -eq 0 ]; then
        run_logged build 400 "$log" cmake --build "$repo/$build" -j "$(nproc)"
        rc=$?
    fi
    cp "$log" "$out/build.log"
    record build "$(status_word $rc)" "see build.log$( [ $rc -ne 0 ] && echo ": $(grep -m1 -E 'error:|Error [0-9]|CMake Error' "$log")")"
    return $rc
}

step_test() {
    local log=$logs/ctest.log rc
    : >"$log"
    run_logged ctest 300 "$log" ctest --test-dir "$repo/$build" --output-on-failure --timeout 280
    rc=$?
    cp "$log" "$out/ctest.log"
    [ -f "$repo/$build/Testing/Temporary/LastTest.log" ] && cp "$repo/$build/Testing/Temporary/LastTest.log" "$logs/"
    record ctest "$(status_word $rc)" "$(grep -E 'tests passed|tests failed' "$log" | tail -1)"
}

step_sanitize() {
    local cs
    if ! cs=$(find_cuda_tool compute-sanitizer); then
        record sanitize FAIL "compute-sanitizer not found"
        return
    fi
    local all=$out/sanitizer.log exe name tool rc
    : >"$all"
    local tests=("$repo/$build"/tests/test_*)
    if [ ! -x "${tests[0]}" ]; then
        record sanitize FAIL "no test executables in $build/tests (build first)"
        return
    fi
    for exe in "${tests[@]}"; do
        name=$(basename "$exe")
        # shellcheck disable=SC2053 # a glob on purpose
        [[ $name == ${QLORA_SANITIZE_TESTS:-test_*} ]] || continue
        local tools=(memcheck)
        case $name in *quant*) tools+=(racecheck initcheck synccheck) ;; esac
        for tool in "${tools[@]}"; do
            local log=$logs/sanitize-$name-$tool.log extra=()
            : >"$log"
            [ "$tool" = memcheck ] && extra=(--leak-check full)
            # CK_FORK=no: the test cases run in the sanitized process itself.
            run_logged "$tool $name" 240 "$log" env CK_FORK=no QLORA_FIXTURES="$repo/tests/fixtures" \
                QLORA_BIN="$repo/$build/bin" "$cs" --tool "$tool" "${extra[@]}" --error-exitcode 86 --report-api-errors no \
                --print-limit 50 --target-processes all "$exe"
            rc=$?
            cat "$log" >>"$all"
            record "$tool $name" "$(status_word $rc)" \
                "$(grep -E '[0-9]+%: Checks' "$log" | tail -1) $(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -1)"
        done
    done
}

step_bench() {
    local exe=$repo/$build/bin/qlora-bench log=$out/bench.txt rc
    : >"$log"
    if [ ! -x "$exe" ]; then
        record bench FAIL "$exe missing (build first)"
        return
    fi
    # shellcheck disable=SC2086 # the argument strings are meant to split
    run_logged "bench cuda" 90 "$log" "$exe" $bench_args_cuda
    rc=$?
    record "bench $bench_args_cuda" "$(status_word $rc)" "see bench.txt"
    # shellcheck disable=SC2086
    run_logged "bench all" 60 "$log" "$exe" $bench_args_all
    rc=$?
    record "bench $bench_args_all" "$(status_word $rc)" "see bench.txt"
    # the layer, the optimizer and the model against cuBLAS / a device copy in the same run
    for sub in linear adamw model; do
        run_logged "bench $sub" 120 "$log" "$exe" "$sub" --backend cuda
        rc=$?
        record "bench $sub --backend cuda" "$(status_word $rc)" "see bench.txt"
    done
    # a short finetune of the embedded default on the GPU: tokens/s, memory measured vs estimated
    run_logged "qlora-ft" 90 "$log" "$repo/$build/bin/qlora-ft" --device cuda --out "$repo/$build/ft-out" \
        --steps 30 --metrics "$out/ft-metrics.jsonl"
    rc=$?
    record "qlora-ft --device cuda --steps 30" "$(status_word $rc)" "see bench.txt"
    cat "$log"
}

# ---------------------------------------------------------------- main
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env build test sanitize bench)
deps_cmake_args=()
for s in "${steps[@]}"; do
    case $s in env | build | test | sanitize | bench) ;; *)
        echo "gpu-check: unknown step '$s' (env build test sanitize bench)" >&2
        exit 2
        ;;
    esac
done
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
fi
# The environment (deps) is needed by every step, so it is always set up; 'env' also prints it.
case " ${steps[*]} " in *" env "*) ;; *) setup_deps >/dev/null ;; esac

for s in "${steps[@]}"; do
    echo "===== $s ($(remaining)s of budget left)"
    if [ "$s" = build ]; then
        step_build || { echo "build failed: later steps that need it are skipped"; build_failed=1; }
    elif [ "${build_failed:-0}" = 1 ] && [ "$s" != env ]; then
        record "$s" SKIPPED "build failed"
    else
        "step_$s"
    fi
done

tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null
rm -rf "$logs"
echo
echo "===== summary ($(($(date +%s) - start))s; logs in $out)"
cat "$summary"
if [ $failures -ne 0 ]; then
    echo "gpu-check: $failures step(s) did not pass"
    exit 1
fi
echo "gpu-check: all steps passed"
