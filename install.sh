#!/usr/bin/env bash
# Fresh-machine install of apt into ./.venv.   Usage: ./install.sh [--dev]
#   --dev   also install the test/plot extras (pytest, hypothesis, matplotlib, ruff, tensorboard)
# Steps: venv -> `pip install -e .` (torch, timm, numba, pyarrow, webdataset, ...) -> Pillow-SIMD.
# Pillow-SIMD must be the LAST step: any later install of torchvision/timm brings plain Pillow back.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
EXTRAS=""
[[ "${1:-}" == "--dev" ]] && EXTRAS="[dev]"

if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip setuptools wheel
$VPIP install -q -e ".${EXTRAS}"

# ---- Pillow-SIMD (same PIL API, faster resize). Build from source with AVX2 where the CPU has it.
if .venv/bin/python - <<'PYEOF'
import importlib.metadata as md, sys
try:
    md.version("pillow-simd")
except md.PackageNotFoundError:
    sys.exit(1)
try:
    md.version("pillow")  # both installed means PIL/ may hold a mix of the two: redo the swap
    sys.exit(1)
except md.PackageNotFoundError:
    sys.exit(0)
PYEOF
then
  echo "install.sh: Pillow-SIMD already installed"
else
  if ! { [[ -f /usr/include/jpeglib.h ]] && [[ -f /usr/include/zlib.h ]]; }; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
      (apt-get update -qq && apt-get install -y -qq libjpeg62-turbo-dev zlib1g-dev) >/dev/null 2>&1 || true
    fi
  fi
  SIMD_CC="cc"
  grep -qw avx2 /proc/cpuinfo 2>/dev/null && SIMD_CC="cc -mavx2"
  # the wheel is built once and kept in the venv, so a rerun (whose `pip install -e .` brings plain
  # Pillow back) swaps it in again in seconds instead of rebuilding
  WHEELS=".venv/wheelhouse"
  if ! ls "$WHEELS"/pillow_simd-*.whl >/dev/null 2>&1; then
    CC="$SIMD_CC" $VPIP wheel -q --no-deps --no-cache-dir -w "$WHEELS" pillow-simd >/dev/null 2>&1 \
      && echo "install.sh: Pillow-SIMD wheel built with CC='$SIMD_CC'"
  fi
  $VPIP uninstall -q -y pillow pillow-simd >/dev/null 2>&1 || true
  if ls "$WHEELS"/pillow_simd-*.whl >/dev/null 2>&1 && $VPIP install -q --no-deps "$WHEELS"/pillow_simd-*.whl; then
    echo "install.sh: Pillow-SIMD installed"
  else
    echo "install.sh: WARNING: could not build Pillow-SIMD (needs a C compiler plus libjpeg and zlib" \
         "headers: Debian packages libjpeg62-turbo-dev zlib1g-dev); falling back to plain Pillow," \
         "which is correct but resizes about 1.6x slower." >&2
    $VPIP install -q pillow
  fi
fi
.venv/bin/python -c "import PIL, numba, torch, timm; print(f'install.sh: ok (Pillow {PIL.__version__}, numba {numba.__version__}, torch {torch.__version__}, timm {timm.__version__})')"
