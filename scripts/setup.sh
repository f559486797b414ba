#!/usr/bin/env bash
# Set up everything swarm needs in .venv/ of the repository: system build tools for libp2p's
# fastecdsa (gcc, libgmp-dev, python3-dev), torch, and the project with its test dependencies; with
# --browser (as `make test` runs it) also what the tests need beyond Python: Debian's chromium and chromium-driver for
# the web page's test, ip and tc for the emulated hosts; --netlab (make bench-paper) only ip and tc.
# First it checks that $PYTHON (default python3) is Python 3.11 or newer; `setup.sh --check-python`
# does only that.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NEED=3.11  # asyncio.Runner, TimeoutError raised by asyncio.wait_for

# is_new_enough PYTHON: true when that interpreter is Python $NEED or newer; prints its version
is_new_enough() {
    local version
    version=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || version="none"
    echo "$version"
    [[ $version =~ ^([0-9]+)\.([0-9]+)$ ]] || return 1
    (( BASH_REMATCH[1] > ${NEED%.*} || (BASH_REMATCH[1] == ${NEED%.*} && BASH_REMATCH[2] >= ${NEED#*.}) ))
}

if ! version=$(is_new_enough "$PYTHON"); then
    echo "error: swarm needs Python $NEED or newer, but PYTHON=$PYTHON is ${version/none/not a working Python}:" \
        "install one (e.g. apt-get install python3.11 python3.11-venv python3.11-dev) and pick it with" \
        "PYTHON=python3.11 make demo" >&2
    exit 1
fi
if [ -x .venv/bin/python ] && ! version=$(is_new_enough .venv/bin/python); then
    echo "error: .venv/ holds Python $version, but swarm needs $NEED or newer: remove it (make clean) and" \
        "run again, e.g. PYTHON=python3.11 make demo" >&2
    exit 1
fi
[ "${1:-}" = "--check-python" ] && exit 0
with_browser=0  # `setup.sh --browser` (make test): also what the tests need beyond Python (below)
with_netlab=0   # `setup.sh --netlab` (make bench-paper): ip and tc for the emulated hosts
[ "${1:-}" = "--browser" ] && with_browser=1 && with_netlab=1
[ "${1:-}" = "--netlab" ] && with_netlab=1

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
for pkg in libgmp-dev python3-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# what the tests need beyond Python (each test skips with the reason without it): a headless browser
# for the web page's test (tests/test_web_page.py), Debian's chromium and its chromedriver, never a
# browser downloaded by a test tool; ip and tc for the emulated hosts (tests/test_netns.py), nft for their NATs
test_pkgs=()
if [ $with_browser -eq 1 ]; then
    command -v chromium >/dev/null 2>&1 || test_pkgs+=(chromium)
    [ -x /usr/bin/chromedriver ] || test_pkgs+=(chromium-driver)
fi
if [ $with_netlab -eq 1 ]; then
    { command -v ip && command -v tc; } >/dev/null 2>&1 || test_pkgs+=(iproute2)
    command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || test_pkgs+=(nftables)  # NAT routers (netlab.Lab.add_router)
fi
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
if [ ${#need[@]} -gt 0 ] || [ ${#test_pkgs[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        $sudo_cmd apt-get update -qq
    elif [ ${#need[@]} -gt 0 ]; then
        echo "please install a C compiler, GMP headers and Python headers (needed to build fastecdsa)" >&2
        exit 1
    fi
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing system packages: ${need[*]}"
    $sudo_cmd apt-get install -y -qq "${need[@]}"
fi
if [ ${#test_pkgs[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing system packages: ${test_pkgs[*]}"
        $sudo_cmd apt-get install -y -qq "${test_pkgs[@]}" ||
            echo "warning: could not install ${test_pkgs[*]}: the tests that need them will be skipped" >&2
    else
        echo "warning: no apt-get to install ${test_pkgs[*]}: the tests that need them will be skipped" >&2
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
