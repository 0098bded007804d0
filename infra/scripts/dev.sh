#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash infra/scripts/dev.sh demo   create .venv, install Fleet with its worker side, run `fleet demo`
#   bash infra/scripts/dev.sh test   same plus the test tools, then run the whole test suite
# Extra arguments after `test` go to pytest.
#
# torch is installed first and pinned (FLEET_TORCH_SPEC, default torch==2.13.0, the CPU wheel
# these machines carry): an unpinned torch would pull a multi-GB CUDA build. For a GPU machine
# see README "GPU install".
set -euo pipefail

cd "$(dirname "$0")/../.."
mode="${1:-}"
shift || true
case "$mode" in demo|test) ;; *) echo "usage: $0 demo|test [pytest args...]" >&2; exit 2 ;; esac

python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "Fleet needs Python >= 3.11 (found $("$python" --version 2>&1))" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
extras="worker"
[ "$mode" = test ] && extras="worker,onnx,dev"
stamp=".venv/.fleet-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${FLEET_TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  if [ "$mode" = test ]; then
    # Offline kustomize renderer for the manifest tests. It declares Python >= 3.14 but runs on 3.11,
    # so it cannot sit in the [dev] extra.
    .venv/bin/python -m pip install -q --ignore-requires-python pykustomize==0.1.4
  fi
  touch "$stamp"
fi

if [ "$mode" = demo ]; then
  exec .venv/bin/fleet demo
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
