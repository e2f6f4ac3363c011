#!/usr/bin/env bash
# Run the tests that reach the C++ core against a build of fullvq_rt._core with AddressSanitizer and
# UndefinedBehaviorSanitizer (CPU only; the CUDA sources are not built). Exits non-zero on any report.
#
#   bench/sanitize.sh                      # the default test selection below
#   bench/sanitize.sh tests/test_lookup.py -k cosine      # any pytest arguments instead
#   FULLVQ_SANITIZE=address bench/sanitize.sh             # another list of -fsanitize= names
#
# Run it with the project's environment active (numpy, pytest, torch, onnx, onnxruntime: ".[dev]").
# Nothing is installed into that environment: the sanitized module is built in build/sanitize and
# installed into build/sanitize-site, and the tests run in build/sanitize-venv, a virtual environment
# holding only the build tools that sees build/sanitize-site first and the project environment's
# packages after it. (PYTHONPATH alone is not enough: an editable install of the project puts an
# import hook in front of sys.path.) Sanitizer reports go to build/sanitize-logs (one file per
# reporting process, the tests' subprocesses included) and are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
SANITIZE=${FULLVQ_SANITIZE:-address,undefined,float-cast-overflow}
BUILD=$ROOT/build/sanitize SITE=$ROOT/build/sanitize-site VENV=$ROOT/build/sanitize-venv LOGS=$ROOT/build/sanitize-logs
start=$(date +%s)

# The test files that reach _core: the lookup, the sampler, the gather, the generation loop (directly
# and through Tokenizer / Generator on real exported engines), the bundle, the quantizers' lookup.
# Left out: the training and interop runs (test_training, test_fvq_recipe, test_gpt_training,
# test_study, test_evaluation, test_interop, test_fvq_interop): minutes of torch each, and they reach
# only the nearest-code lookup that these already cover; and the GPU and TensorRT tests (this build
# has no CUDA).
DEFAULT_TESTS=(tests/test_lookup.py tests/test_sampler.py tests/test_bundle.py tests/test_tokenizer.py
               tests/test_generator.py tests/test_sampling.py tests/test_readme.py tests/test_quantizers.py
               tests/test_lc_codebook.py tests/test_codes.py --durations=10)
if [ $# -eq 0 ]; then set -- "${DEFAULT_TESTS[@]}"; fi

# One virtual environment for the build tools and the tests: it sees build/sanitize-site first, then
# the project environment's packages (a .pth of plain paths, so that the project's editable-install
# hook, itself a .pth, is not run there). The build tools live in it so that build/sanitize stays
# incremental (pip's build isolation would hand CMake a new nanobind path on every run).
echo "== environment $VENV"
[ -x "$VENV/bin/pip" ] || "$PY" -m venv "$VENV"
venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sys, sysconfig; p = sysconfig.get_paths(); print(*dict.fromkeys([sys.argv[1], p["purelib"], p["platlib"]]), sep="\n")' \
  "$SITE" > "$venv_site/fullvq_sanitize.pth"
# GCC's libubsan ignores UBSAN_OPTIONS=log_path next to a preloaded libasan (its call that sets the
# report path binds to libasan's copy), so every interpreter sets it through libubsan's own symbol.
echo 'import os, ctypes; os.environ.get("FULLVQ_UBSAN_LIB") and ctypes.CDLL(os.environ["FULLVQ_UBSAN_LIB"]).__sanitizer_set_report_path(os.environ["FULLVQ_UBSAN_LOG"].encode())' \
  > "$venv_site/fullvq_sanitize_ubsan.pth"
requires=$("$PY" -c 'import re; print(*re.findall(r"\"([^\"]+)\"", re.search(r"\[build-system\]\s*requires\s*=\s*\[([^]]*)\]", open("pyproject.toml").read())[1]))')
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $requires

echo "== building _core with -fsanitize=$SANITIZE (CPU only) in $BUILD"
rm -rf "$SITE"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$VENV/bin/python" -m pip install -q \
  --disable-pip-version-check --no-build-isolation --no-deps --target "$SITE" -Cbuild-dir="$BUILD" \
  -Cinstall.strip=false -Ccmake.define.FULLVQ_SANITIZE="$SANITIZE" -Ccmake.define.FULLVQ_CUDA=OFF "$ROOT"
core=$(ls "$SITE"/fullvq_rt/_core.*.so)
echo "   ready after $(( $(date +%s) - start )) s: $core"

# The ASan runtime must be loaded before anything else, so it is preloaded into Python: the one the
# module links to (libasan with GCC, libclang_rt.asan with Clang), then the module's C++ library, which
# Python itself does not link (else ASan finds no __cxa_throw to intercept and aborts on the first
# C++ exception).
preload=$(ldd "$core" | awk '/libasan|libclang_rt\.asan/ {print $3; exit}')
if [[ ",$SANITIZE," == *,address,* ]]; then
  [ -n "$preload" ] || { echo "sanitize.sh: $core does not link an ASan runtime" >&2; exit 2; }
  preload="$preload $(ldd "$core" | awk '/libstdc\+\+|libc\+\+\.so/ {print $3; exit}')"
fi

rm -rf "$LOGS" && mkdir -p "$LOGS"
export LD_PRELOAD="${preload}${LD_PRELOAD:+ $LD_PRELOAD}"
# No leak check: the interpreter itself never frees everything at exit.
export ASAN_OPTIONS=detect_leaks=0:check_initialization_order=1:detect_stack_use_after_return=1:log_path=$LOGS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}
export FULLVQ_UBSAN_LIB=$(ldd "$core" | awk '/libubsan/ {print $3; exit}') FULLVQ_UBSAN_LOG=$LOGS/ubsan
unset PYTHONPATH

# Check that the tests will import the sanitized module, and that it works at all.
"$VENV/bin/python" - "$core" <<'EOF'
import sys
import numpy as np
import fullvq_rt
from fullvq_rt import _core
print("fullvq_rt._core:", _core.__file__)
assert _core.__file__ == sys.argv[1], f"the tests would import {_core.__file__}, not the sanitized {sys.argv[1]}"
print("kernels:", fullvq_rt.cpu_kernels(), "| nearest:", fullvq_rt.nearest(np.eye(3, 4, dtype=np.float32), np.eye(4, dtype=np.float32)))
EOF

echo "== pytest $* (LD_PRELOAD=$LD_PRELOAD)"
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=$?
pytest_status=$status

reports=$(find "$LOGS" -type f | sort)
if [ -n "$reports" ]; then
  for f in $reports; do echo "---- $f"; cat "$f"; done
  echo "sanitize.sh: $(echo "$reports" | wc -l) sanitizer report(s), see above" >&2
  [ $status -ne 0 ] || status=1
fi
echo "== sanitize.sh: pytest exit $pytest_status, $(echo -n "$reports" | grep -c . || true) report(s), $(( $(date +%s) - start )) s"
exit $status
