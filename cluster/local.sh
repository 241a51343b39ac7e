#!/usr/bin/env bash
# A Ray cluster on one machine: a head and N worker nodes, token authentication on, the
# dashboard bound to 127.0.0.1. Each node is a `ray start --block` in its own process group,
# recorded in $STATE, so `stop` stops exactly these nodes (unlike `ray stop`, which stops every
# Ray of this user on the machine).
#
#   cluster/local.sh start 2            # head + 2 workers, 1 CPU each (CPUS_PER_NODE=...)
#   export RAY_AUTH_MODE=token          # the token is ~/.ray/auth_token
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/sweep.py SWEEP.yaml --out results/
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Settings (environment): PORT (GCS, 6380), DASHBOARD_PORT (8265), CPUS_PER_NODE (1),
# HEAD_CPUS (0: the head only coordinates), STATE (~/.cache/rlvr-ray/local-cluster).
set -euo pipefail

PORT=${PORT:-6380}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
HEAD_CPUS=${HEAD_CPUS:-0}
STATE=${STATE:-$HOME/.cache/rlvr-ray/local-cluster}
export RAY_AUTH_MODE=token

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# every node of one machine needs its own agent/metrics ports (the defaults would collide)
node_ports() {
    echo "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
         "--metrics-export-port=$(free_port) --runtime-env-agent-port=$(free_port)"
}

launch() {  # NAME ARGS...: a blocking `ray start` in its own session, pid saved
    local name=$1; shift
    setsid ray start --block --disable-usage-stats "$@" >"$STATE/$name.log" 2>&1 &
    echo $! >"$STATE/$name.pid"
}

start() {
    local n=${1:-2}
    mkdir -p "$STATE"
    if ls "$STATE"/*.pid >/dev/null 2>&1; then
        echo "local.sh: a cluster is already recorded in $STATE; run 'cluster/local.sh stop' first" >&2
        exit 1
    fi
    # shellcheck disable=SC2046
    launch head --head --port="$PORT" --node-ip-address=127.0.0.1 \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port="$(free_port)" --num-cpus="$HEAD_CPUS" $(node_ports)
    for _ in $(seq 60); do ray status --address "127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 2; done
    for i in $(seq "$n"); do
        # shellcheck disable=SC2046
        launch "worker-$i" --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 \
            --num-cpus="$CPUS_PER_NODE" $(node_ports)
    done
    for _ in $(seq 60); do
        [ "$(ray status --address "127.0.0.1:$PORT" 2>/dev/null | grep -c ' node_')" -ge $((n + 1)) ] && break
        sleep 2
    done
    echo "head 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT, $n workers" \
         "(RAY_AUTH_MODE=token; token in ~/.ray/auth_token)"
}

stop() {
    shopt -s nullglob
    for f in "$STATE"/*.pid; do
        kill -TERM -- "-$(cat "$f")" 2>/dev/null || true
    done
    sleep 5
    for f in "$STATE"/*.pid; do
        kill -KILL -- "-$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
    # `ray start` recorded the head for a bare ray.init(); forget it, as `ray stop` would
    if grep -qs ":$PORT\$" /tmp/ray/ray_current_cluster; then rm -f /tmp/ray/ray_current_cluster; fi
    echo "stopped the nodes recorded in $STATE"
}

case "${1:-}" in
    start) start "${2:-2}" ;;
    stop) stop ;;
    status) ray status --address "127.0.0.1:$PORT" ;;
    *) echo "usage: cluster/local.sh start [N] | status | stop" >&2; exit 2 ;;
esac
