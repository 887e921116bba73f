#!/usr/bin/env bash
# A real Kubernetes 1.20 control plane for the test tier: kube-apiserver, kube-controller-manager
# (the real Job controller, garbage collector and validation) and etcd, all on 127.0.0.1.
#
#   k8s-control-plane.sh build            build the binaries once into the cache (reused after)
#   k8s-control-plane.sh start RUN_DIR    PKI, token, etcd, apiserver, controller-manager
#   k8s-control-plane.sh stop RUN_DIR     stop everything started in RUN_DIR
#   k8s-control-plane.sh status RUN_DIR   exit 0 when the apiserver answers /readyz
#
# `start` leaves in RUN_DIR: admin.kubeconfig and admin.token (a system:masters user), server
# (the URL), pki/ (ca.crt; serving.crt/.key, also the kubelet stand-in's log server cert), the
# etcd data and one log per process. There is no scheduler or kubelet: run the stand-in with
#   python -m tests.realkube.kubelet --server "$(cat RUN_DIR/server)" \
#     --token-file RUN_DIR/admin.token --ca RUN_DIR/pki/ca.crt --cert RUN_DIR/pki/serving.crt \
#     --key RUN_DIR/pki/serving.key --workdir RUN_DIR/kubelet
#
# Sources: Debian 12's `kubernetes` source package (Kubernetes 1.20.2 with vendor/), built with
# Debian's golang-1.19-go and no network but Debian's archive (one vendored module is replaced
# by Debian's newer copy, see patch_vendor); etcd from Debian's etcd-server. The apt source
# fetch uses a private source list and list directory, so the system's apt configuration is
# never touched. The cache keeps the unpacked tree and Go's build cache (about 2.5 GB) so a
# rebuild is incremental; delete the cache directory to start over.
#
# Environment:
#   QUEUEJOB_K8S_CACHE        cache for sources and binaries (default /var/cache/queuejob/k8s-1.20)
#   QUEUEJOB_K8S_BUILD_PROCS  parallel Go build jobs (default: all cores)
#   QUEUEJOB_K8S_APISERVER_PORT / _ETCD_PORT / _ETCD_PEER_PORT / _CM_PORT   ports for `start`
#                             (defaults 56443 / 52379 / 52380 / 50257)
#   QUEUEJOB_K8S_FEATURE_GATES  extra --feature-gates for apiserver and controller-manager
set -euo pipefail

CACHE="${QUEUEJOB_K8S_CACHE:-/var/cache/queuejob/k8s-1.20}"
BIN="$CACHE/bin"
SRC_PACKAGE="kubernetes"
GO_PACKAGE="golang-1.19-go"
GOROOT_DIR="/usr/lib/go-1.19"
DEB_MIRROR="${QUEUEJOB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { printf '[k8s-control-plane] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

have_binaries() {
    [[ -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" ]]
}

apt_install() {
    # Install only what is missing; `apt-get update` once when a package is unknown.
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing Debian packages: ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${missing[@]}" >/dev/null; then
        apt-get update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

fetch_source() {
    # Fetch and unpack the source package with a private apt source list and state directory.
    local src="$CACHE/src"
    if [[ -f "$src/.unpacked" ]]; then
        log "source already unpacked in $src"
        return 0
    fi
    local aptdir="$CACHE/apt"
    mkdir -p "$aptdir/lists/partial" "$aptdir/parts" "$src"
    cat >"$aptdir/sources.list" <<EOF
deb-src $DEB_MIRROR bookworm main
EOF
    local opts=(
        -o "Dir::Etc::SourceList=$aptdir/sources.list"
        -o "Dir::Etc::SourceParts=$aptdir/parts"
        -o "Dir::State::Lists=$aptdir/lists"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
        -o "APT::Sandbox::User=root"
    )
    log "fetching the source package index (private apt lists in $aptdir)"
    apt-get "${opts[@]}" update >/dev/null
    log "fetching and unpacking source package '$SRC_PACKAGE'"
    rm -rf "$src" && mkdir -p "$src"
    (cd "$src" && apt-get "${opts[@]}" source "$SRC_PACKAGE" >/dev/null)
    local tree
    tree="$(find "$src" -mindepth 1 -maxdepth 1 -type d -name "${SRC_PACKAGE}-*" | head -n1)"
    [[ -n "$tree" && -d "$tree/vendor" ]] || die "no unpacked tree with vendor/ under $src"
    # Tarballs are no longer needed once unpacked.
    find "$src" -maxdepth 1 -type f \( -name '*.tar.*' -o -name '*.dsc' \) -delete
    basename "$tree" >"$src/.unpacked"
}

patch_vendor() {
    # Kubernetes 1.20 vendors github.com/modern-go/reflect2 v1.0.1, which breaks on Go >= 1.18:
    # the apiserver panics (nil pointer in reflect2.Type2) decoding the first request body that
    # holds a map, e.g. any object with labels. v1.0.2 fixes it with the same API; Debian ships
    # its source. The module version recorded in vendor/modules.txt is left as it is, so
    # `-mod=vendor` still accepts the tree.
    local tree="$1" stamp="$1/.queuejob-reflect2-1.0.2"
    [[ -f "$stamp" ]] && return 0
    local fixed="/usr/share/gocode/src/github.com/modern-go/reflect2"
    [[ -f "$fixed/go_above_118.go" ]] || die "$fixed has no Go 1.18 fix (need reflect2 >= 1.0.2)"
    local vendored="$tree/vendor/github.com/modern-go/reflect2"
    log "replacing vendored reflect2 v1.0.1 with Debian's v1.0.2 (Go >= 1.18 fix)"
    find "$vendored" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
    cp "$fixed"/*.go "$fixed"/*.s "$vendored/"
    rm -f "$vendored"/*_test.go
    # Keep the tree's timestamps: the code generators' make rules would otherwise see every
    # package that imports reflect2 as changed and regenerate them all (minutes, same output).
    touch -r "$tree/vendor/modules.txt" "$vendored" "$vendored"/*
    touch "$stamp"
}

cmd_build() {
    if have_binaries; then
        log "binaries present in $BIN: nothing to build"
        return 0
    fi
    local started=$SECONDS
    mkdir -p "$CACHE"
    apt_install "$GO_PACKAGE" golang-github-modern-go-reflect2-dev etcd-server dpkg-dev openssl make \
        curl rsync
    fetch_source
    local tree
    tree="$CACHE/src/$(cat "$CACHE/src/.unpacked")"
    patch_vendor "$tree"
    local procs="${QUEUEJOB_K8S_BUILD_PROCS:-$(nproc)}"
    log "building kube-apiserver and kube-controller-manager in $tree (-p $procs)"
    (
        cd "$tree"
        export PATH="$GOROOT_DIR/bin:$PATH"
        export GOROOT="$GOROOT_DIR"
        # GOPATH and GOCACHE are set by hack/lib/golang.sh (under _output/, inside the cache).
        # One flag only: hack/lib/golang.sh folds GOFLAGS into a comma-separated -tags value, and
        # a space in it breaks the build. Parallelism goes through GOMAXPROCS instead (the go
        # command's default -p).
        export GOFLAGS="-mod=vendor"
        export GOPROXY=off
        export GO111MODULE=on
        export GOMAXPROCS="$procs"
        export KUBE_BUILD_PLATFORMS="linux/amd64"
        # A source package has no .git: pin the version the binaries report.
        export KUBE_GIT_VERSION="v1.20.2"
        export KUBE_GIT_TREE_STATE="clean"
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager"
    )
    local out="$tree/_output/local/bin/linux/amd64"
    [[ -x "$out/kube-apiserver" ]] || out="$tree/_output/bin"
    mkdir -p "$BIN.tmp"
    cp "$out/kube-apiserver" "$out/kube-controller-manager" "$BIN.tmp/"
    rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
    local took=$((SECONDS - started))
    echo "$took" >"$CACHE/build-seconds"
    log "built in ${took}s: $BIN"
}

# ---------------------------------------------------------------------------- start / stop

pki() {
    # A private CA, an apiserver serving cert (also used by the kubelet stand-in's log server),
    # a client cert for the controller-manager and a service-account signing key.
    local dir="$1"
    mkdir -p "$dir"
    (
        cd "$dir"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 \
            -subj "/CN=queuejob-test-ca" >/dev/null 2>&1
        cat >serving.cnf <<'EOF'
[req]
distinguished_name = dn
[dn]
[ext]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default
EOF
        openssl req -newkey rsa:2048 -nodes -keyout serving.key -out serving.csr \
            -subj "/CN=kube-apiserver" >/dev/null 2>&1
        openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
            -out serving.crt -days 30 -extfile serving.cnf -extensions ext >/dev/null 2>&1
        openssl req -newkey rsa:2048 -nodes -keyout cm.key -out cm.csr \
            -subj "/CN=system:kube-controller-manager" >/dev/null 2>&1
        openssl x509 -req -in cm.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
            -out cm.crt -days 30 -extfile serving.cnf -extensions ext >/dev/null 2>&1
        openssl genrsa -out sa.key 2048 >/dev/null 2>&1
        openssl rsa -in sa.key -pubout -out sa.pub >/dev/null 2>&1
        chmod 600 ./*.key
    )
}

write_kubeconfig() {
    # kubeconfig FILE SERVER CA USER (token=TOKEN | cert=CRT key=KEY)
    local file="$1" server="$2" ca="$3" user="$4" auth="$5"
    {
        echo "apiVersion: v1"
        echo "kind: Config"
        echo "clusters:"
        echo "- name: queuejob-test"
        echo "  cluster:"
        echo "    server: $server"
        echo "    certificate-authority: $ca"
        echo "users:"
        echo "- name: $user"
        echo "  user:"
        echo "$auth"
        echo "contexts:"
        echo "- name: queuejob-test"
        echo "  context:"
        echo "    cluster: queuejob-test"
        echo "    user: $user"
        echo "    namespace: default"
        echo "current-context: queuejob-test"
    } >"$file"
    chmod 600 "$file"
}

spawn() {
    # spawn NAME LOGFILE CMD...: start in its own session, record the pid.
    local name="$1" logfile="$2"
    shift 2
    setsid "$@" >"$logfile" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
}

wait_for() {
    # wait_for WHAT TIMEOUT CMD...: poll until CMD succeeds, fail with WHAT's log on timeout.
    local what="$1" timeout="$2"
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "$what not ready after ${timeout}s; last log lines:"
            tail -n 20 "$RUN/$what.log" >&2 || true
            return 1
        fi
        local pidfile="$RUN/$what.pid"
        if [[ -f "$pidfile" ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            log "$what exited; last log lines:"
            tail -n 20 "$RUN/$what.log" >&2 || true
            return 1
        fi
        sleep 0.3
    done
}

default_sa_has_token() {
    curl -sf --cacert "$RUN/pki/ca.crt" -H "Authorization: Bearer $2" \
        "$1/api/v1/namespaces/default/serviceaccounts/default" | grep -q '"secrets"'
}

cmd_start() {
    RUN="${1:?usage: start RUN_DIR}"
    have_binaries || die "no binaries in $BIN: run '$0 build' first"
    command -v etcd >/dev/null || die "etcd not found: run '$0 build' (installs etcd-server)"
    mkdir -p "$RUN"
    RUN="$(cd "$RUN" && pwd)"
    local api_port="${QUEUEJOB_K8S_APISERVER_PORT:-56443}"
    local etcd_port="${QUEUEJOB_K8S_ETCD_PORT:-52379}"
    local etcd_peer="${QUEUEJOB_K8S_ETCD_PEER_PORT:-52380}"
    local cm_port="${QUEUEJOB_K8S_CM_PORT:-50257}"
    local gates="${QUEUEJOB_K8S_FEATURE_GATES:-}"
    local server="https://127.0.0.1:$api_port"
    local started=$SECONDS

    pki "$RUN/pki"
    local admin_token
    admin_token="$(openssl rand -hex 24)"
    # Static token file: token,user,uid,"group1,group2"
    printf '%s,queuejob-admin,queuejob-admin,"system:masters"\n' "$admin_token" >"$RUN/tokens.csv"
    printf '%s\n' "$admin_token" >"$RUN/admin.token"
    chmod 600 "$RUN/tokens.csv" "$RUN/admin.token"
    write_kubeconfig "$RUN/admin.kubeconfig" "$server" "$RUN/pki/ca.crt" queuejob-admin \
        "    token: $admin_token"
    write_kubeconfig "$RUN/cm.kubeconfig" "$server" "$RUN/pki/ca.crt" \
        system:kube-controller-manager \
        "$(printf '    client-certificate: %s\n    client-key: %s' \
            "$RUN/pki/cm.crt" "$RUN/pki/cm.key")"
    echo "$server" >"$RUN/server"

    spawn etcd "$RUN/etcd.log" etcd \
        --name queuejob-test \
        --data-dir "$RUN/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "queuejob-test=http://127.0.0.1:$etcd_peer"
    wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

    local gate_args=()
    [[ -n "$gates" ]] && gate_args=(--feature-gates "$gates")
    spawn apiserver "$RUN/apiserver.log" "$BIN/kube-apiserver" \
        --advertise-address 127.0.0.1 \
        --bind-address 127.0.0.1 \
        --secure-port "$api_port" \
        --insecure-port 0 \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --tls-cert-file "$RUN/pki/serving.crt" \
        --tls-private-key-file "$RUN/pki/serving.key" \
        --client-ca-file "$RUN/pki/ca.crt" \
        --token-auth-file "$RUN/tokens.csv" \
        --authorization-mode Node,RBAC \
        --service-account-key-file "$RUN/pki/sa.pub" \
        --service-account-signing-key-file "$RUN/pki/sa.key" \
        --service-account-issuer "https://kubernetes.default.svc" \
        --service-cluster-ip-range 10.96.0.0/16 \
        --kubelet-certificate-authority "$RUN/pki/ca.crt" \
        --kubelet-client-certificate "$RUN/pki/cm.crt" \
        --kubelet-client-key "$RUN/pki/cm.key" \
        --kubelet-preferred-address-types InternalIP \
        --allow-privileged=true \
        --profiling=false \
        --v 1 \
        "${gate_args[@]}"
    wait_for apiserver 90 curl -sf --cacert "$RUN/pki/ca.crt" \
        -H "Authorization: Bearer $admin_token" "$server/readyz"

    spawn controller-manager "$RUN/controller-manager.log" "$BIN/kube-controller-manager" \
        --kubeconfig "$RUN/cm.kubeconfig" \
        --authentication-kubeconfig "$RUN/cm.kubeconfig" \
        --authorization-kubeconfig "$RUN/cm.kubeconfig" \
        --bind-address 127.0.0.1 \
        --secure-port "$cm_port" \
        --port 0 \
        --leader-elect=false \
        --use-service-account-credentials=true \
        --service-account-private-key-file "$RUN/pki/sa.key" \
        --root-ca-file "$RUN/pki/ca.crt" \
        --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pvc-protection,-pv-protection,-ttl,-bootstrapsigner,-tokencleaner,-csrsigning,-csrapproving,-csrcleaner' \
        --concurrent-gc-syncs 5 \
        --profiling=false \
        --v 1 \
        "${gate_args[@]}"
    # Ready when the "default" service account has its token Secret: before that, 1.20's
    # ServiceAccount admission rejects every pod (the Job controller would only back off).
    wait_for controller-manager 60 default_sa_has_token "$server" "$admin_token"
    log "control plane ready at $server in $((SECONDS - started))s (run dir $RUN)"
}

cmd_stop() {
    RUN="${1:?usage: stop RUN_DIR}"
    local name pid
    # Reverse start order: controller-manager, apiserver, etcd.
    for name in controller-manager apiserver etcd; do
        [[ -f "$RUN/$name.pid" ]] || continue
        pid="$(cat "$RUN/$name.pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + 10))
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$RUN/$name.pid"
    done
}

cmd_status() {
    RUN="${1:?usage: status RUN_DIR}"
    local server token
    server="$(cat "$RUN/server")"
    token="$(cut -d, -f1 "$RUN/tokens.csv")"
    curl -sf --cacert "$RUN/pki/ca.crt" -H "Authorization: Bearer $token" "$server/readyz" \
        >/dev/null
}

case "${1:-}" in
build) cmd_build ;;
start) cmd_start "${2:-}" ;;
stop) cmd_stop "${2:-}" ;;
status) cmd_status "${2:-}" ;;
*)
    echo "usage: $0 {build|start RUN_DIR|stop RUN_DIR|status RUN_DIR}" >&2
    exit 2
    ;;
esac
