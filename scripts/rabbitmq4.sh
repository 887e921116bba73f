#!/usr/bin/env bash
# RabbitMQ 4.x for the broker tier (`make test-rabbitmq4`): Debian trixie's rabbitmq-server (4.0)
# and its Erlang, in a chroot made once with debootstrap (a Debian package) into a cache outside
# the repository, and reused by every later run.
#
#   scripts/rabbitmq4.sh build   make the chroot unless the cache holds it (needs root)
#   scripts/rabbitmq4.sh root    print the chroot's path (exit 1 when it is not built)
#
# QUEUEJOB_RABBITMQ4_CACHE moves the cache (default /var/cache/queuejob/rabbitmq-4);
# QUEUEJOB_DEBIAN_MIRROR the Debian mirror (default http://deb.debian.org/debian).
set -euo pipefail

CACHE="${QUEUEJOB_RABBITMQ4_CACHE:-/var/cache/queuejob/rabbitmq-4}"
MIRROR="${QUEUEJOB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie
ROOT="$CACHE/root"
STAMP="$CACHE/built"

say() { echo "[rabbitmq4] $*" >&2; }

built() { [ -f "$STAMP" ] && [ -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ]; }

build() {
    if built; then
        say "cached: $(cat "$STAMP") in $ROOT"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        say "building the RabbitMQ 4 chroot needs root (debootstrap, chroot)"
        exit 1
    fi
    if ! command -v debootstrap >/dev/null; then
        say "installing Debian's debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    fi
    local partial="$CACHE/root.partial"
    rm -rf "$partial"
    mkdir -p "$CACHE"
    say "debootstrap $SUITE with rabbitmq-server into $partial (a few minutes, once)"
    local started=$SECONDS
    if ! debootstrap --variant=minbase --include=rabbitmq-server,ca-certificates \
            "$SUITE" "$partial" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -20 "$CACHE/debootstrap.log" >&2
        say "debootstrap failed; the log is $CACHE/debootstrap.log"
        exit 1
    fi
    # The package's own broker is not wanted: ours run with private node names and ports.
    rm -rf "$partial/var/lib/rabbitmq/mnesia" "$partial/var/log/rabbitmq/"*
    local version
    version=$(chroot "$partial" dpkg-query -W -f '${Version}' rabbitmq-server)
    rm -rf "$ROOT"
    mv "$partial" "$ROOT"
    echo "rabbitmq-server $version ($SUITE)" > "$STAMP"
    say "built rabbitmq-server $version in $((SECONDS - started)) s"
}

case "${1:-}" in
    build) build ;;
    root) built && echo "$ROOT" || { say "not built: run scripts/rabbitmq4.sh build"; exit 1; } ;;
    *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
