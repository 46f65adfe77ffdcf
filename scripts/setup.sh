#!/usr/bin/env bash
# Installs everything zsgd and its tests need on a fresh Debian/Ubuntu machine:
# the Python package with its test extras, Fashion-MNIST and OpenSSH (for the
# remote-worker tests) and Slurm with munge (for the cluster-launcher tests,
# which start their own one-node cluster) from Debian, and PyTorch's CPU build when available
# (benchmarks and parity tests only; they skip cleanly without it).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || echo "setup: apt-get update failed; continuing"
  $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist openssh-server openssh-client \
    || echo "setup: could not install Debian packages; zsgd falls back to its embedded data set"
  # Only the packages: the tests start their own munged/slurmctld/slurmd in a temporary
  # directory, so no system daemon is configured or started here.
  $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge \
    || echo "setup: could not install slurm-wlm and munge; the Slurm launcher tests will be skipped"
fi

PY=${PYTHON:-python3}
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$PY" -m pip install -q -e '.[dev]'
"$PY" -m pip install -q 'torch==2.13.0' || echo "setup: torch 2.13.0 not installable here; PyTorch parity tests and benchmarks will be skipped"
# Byte-compile the package once: with PYTHONDONTWRITEBYTECODE set (as on some CI images) every zsgd process
# would otherwise compile each module it imports again; reading a .pyc is allowed either way.
"$PY" -m compileall -q zsgd >/dev/null || echo "setup: byte-compiling zsgd failed; processes compile it as they go"
# Compile the numba kernels once so the first run and the tests start fast.
"$PY" -c "import zsgd.nn.models as m; m.warm_up_in_parallel()" || echo "setup: numba warm-up failed"
echo "setup: done"
