#!/usr/bin/env bash
# Set up everything swarm needs in .venv/ of the repository: system build tools for libp2p's
# fastecdsa (gcc, libgmp-dev, python3-dev), torch, and the project with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
for pkg in libgmp-dev python3-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing system packages: ${need[*]}"
        sudo_cmd=""
        [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        $sudo_cmd apt-get install -y -qq "${need[@]}"
    else
        echo "please install a C compiler, GMP headers and Python headers (needed to build fastecdsa)" >&2
        exit 1
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
    # a GPU machine: let pip pick the build for it
    .venv/bin/python -m pip install --quiet torch
else
    # CPU only: pin the release whose CPU build is known to work here (an unpinned torch pulls a
    # multi-GB CUDA build)
    .venv/bin/python -m pip install --quiet torch==2.13.0
fi
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "swarm is installed in .venv/ ($(.venv/bin/swarm --help >/dev/null && echo ok))"
