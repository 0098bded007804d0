#!/usr/bin/env bash
# One entry point for a fresh machine (run from anywhere; it works at the repository root):
#   bash infra/scripts/dev.sh demo          create .venv, install Fleet with the demo extra, run `fleet demo`
#   bash infra/scripts/dev.sh test [ARGS]   install Fleet with the dev extra and what the tests need from
#                                           the system, then run the whole test suite (ARGS go to pytest)
#   bash infra/scripts/dev.sh lint ruff|mypy  the linter or the type checker, as CI runs them
#
# The tests need redis-server, Chromium (the Flower dashboard test drives it), openssl and Prometheus from the
# system: as root they are installed with apt-get; otherwise the script stops with the one command
# that installs them. Under `test`, any skipped test fails the run unless it is marked `gpu`
# (FLEET_NO_SKIPS, tests/support/no_skips.py).
#
# torch is installed first and pinned (FLEET_TORCH_SPEC, default torch==2.13.0, the CPU wheel
# these machines carry): an unpinned torch would pull a multi-GB CUDA build. For a GPU machine
# see README "GPU install".
set -euo pipefail

cd "$(dirname "$0")/../.."
mode="${1:-}"
shift || true
case "$mode" in demo|test|lint) ;; *) echo "usage: $0 demo | test [pytest args...] | lint ruff|mypy" >&2; exit 2 ;; esac

python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "Fleet needs Python >= 3.11 (found $("$python" --version 2>&1))" >&2; exit 1; }

# What the tests need from the system, by Debian package name.
system_packages_for_tests() {
  command -v redis-server >/dev/null || echo redis-server
  [ -x /usr/bin/chromium ] || echo chromium   # tests/integration/test_flower_dashboard.py drives /usr/bin/chromium
  command -v openssl >/dev/null || echo openssl  # tests/integration/test_secrets.py makes TLS certificates
  # tests/integration/test_prometheus_dashboard.py scrapes real workers with it (and runs promtool).
  { command -v prometheus >/dev/null && command -v promtool >/dev/null; } || echo prometheus
}

install_system_packages() {
  local missing
  missing=("$@")
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "the tests need ${missing[*]} from the system; install with:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
}

if [ "$mode" = test ]; then
  mapfile -t missing < <(system_packages_for_tests)
  install_system_packages "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv || { echo "cannot create a virtual environment; install with: sudo apt-get install -y python3-venv" >&2; exit 1; }
fi
extras="demo"
[ "$mode" != demo ] && extras="dev"
stamp=".venv/.fleet-installed-$(sha256sum < pyproject.toml | cut -c1-16)-$extras"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${FLEET_TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  if [ "$extras" = dev ]; then
    # Offline kustomize renderer for the manifest tests. It declares Python >= 3.14 but runs on 3.11,
    # so it cannot sit in the [dev] extra.
    .venv/bin/python -m pip install -q --ignore-requires-python pykustomize==0.1.4
  fi
  touch "$stamp"
fi

case "$mode" in
  demo)
    exec .venv/bin/fleet demo ;;
  lint)
    case "${1:-}" in
      ruff) exec .venv/bin/ruff check . ;;
      mypy) exec .venv/bin/mypy ;;
      *) echo "usage: $0 lint ruff|mypy" >&2; exit 2 ;;
    esac ;;
  test)
    export HF_HUB_OFFLINE=1 FLEET_NO_SKIPS=1
    exec .venv/bin/python -m pytest "$@" ;;
esac
