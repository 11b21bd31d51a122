#!/usr/bin/env bash
# A multi-host hera-ray cluster on one machine, built from Linux network namespaces.
#
#   scripts/netns-cluster.sh up            build the network, start Ray (head + cloud worker), `hera up`, 2 edges
#   scripts/netns-cluster.sh status        hosts, links, Ray nodes, registered edges
#   scripts/netns-cluster.sh link-down edge1 / link-up edge1     cut / restore a host's link
#   scripts/netns-cluster.sh edge-stop edge1 / edge-start edge1  stop (drain) / start an edge node process
#   scripts/netns-cluster.sh exec head CMD...                   run a command on a host
#   scripts/netns-cluster.sh down          stop every process on the hosts; delete namespaces, veths, bridge
#
# Four hosts, each a network namespace with one veth pair onto a bridge in the root namespace:
#
#   hera-head  198.18.77.1   Ray head (GCS 6379, dashboard/jobs 8265, Ray Client 10001), the scheduler actor
#                            with its EdgeRegistry (50051), the Serve controller and the HTTP ingress (8000)
#   hera-cloud 198.18.77.2   Ray worker node with the custom resource {"cloud": 4}: the cloud LLM replica
#   hera-edge1 198.18.77.11  `hera edge serve` (50061): not a Ray node, it dials the registry on the head
#   hera-edge2 198.18.77.12  the same
#   bridge     198.18.77.254 the root namespace (this shell, the tests, the benchmark) reaches the hosts here
#
# 198.18.0.0/15 is the RFC 2544 benchmarking range: it is never routed on the Internet. The hosts get no
# default route and the root namespace does not forward, so nothing they send can leave the machine.
#
# Needs root and iproute2. Settings (environment):
#   HERA_NETNS_DIR     work folder: logs, Ray's temp dirs, config, token, pids   [/tmp/hera-netns]
#   HERA_NETNS_BIN     folder holding the `ray` and `hera` commands            [<repo>/.venv/bin]
#   HERA_NETNS_CONFIG  a HeraConfig YAML used instead of the default (SmolLM2 as the cloud model, so it is
#                      quick). The netns addresses are set through HERA_* variables, which win over it.
#   HERA_NETNS_EDGE_ARGS  extra flags for every `hera edge serve`              [--n-ctx 1024]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${HERA_NETNS_DIR:-/tmp/hera-netns}
BIN=${HERA_NETNS_BIN:-$ROOT/.venv/bin}
EDGE_ARGS=${HERA_NETNS_EDGE_ARGS:---n-ctx 1024}
NET=198.18.77
BRIDGE=hera-br0
BRIDGE_IP=$NET.254
HOSTS=(head cloud edge1 edge2)
EDGES=(edge1 edge2)
declare -A IP=([head]=$NET.1 [cloud]=$NET.2 [edge1]=$NET.11 [edge2]=$NET.12)
HEAD=${IP[head]}
RAY_PORT=6379
DASHBOARD_PORT=8265
CLIENT_PORT=10001
INGRESS_PORT=8000
REGISTRY_PORT=50051
EDGE_PORT=50061

ns() { echo "hera-$1"; }
veth() { echo "hv-$1"; }   # the root-namespace end of a host's veth pair (the host's end is eth0)
log() { printf '%s\n' "$*" >&2; }
die() { log "netns-cluster: $*"; exit 1; }

is_host() { [[ -n "${IP[$1]:-}" ]] || die "unknown host '$1': one of ${HOSTS[*]}"; }
is_edge() { [[ " ${EDGES[*]} " == *" ${1:-?} "* ]] || die "not an edge host: '${1:-}' (one of ${EDGES[*]})"; }
ns_exists() { ip netns list 2>/dev/null | grep -qw "^$(ns "$1")"; }

# Every process on a host gets the same environment: the venv first on PATH (Ray Jobs run their
# entrypoint with the raylet's PATH), Ray's token auth on, usage stats off, no proxies, and none of the
# single-machine settings a caller (the test suite) may carry: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 would
# make Ray take 127.0.0.1 as every process's node address, and RAY_ADDRESS would point at another cluster.
# GRPC_ENABLE_FORK_SUPPORT=false: Ray Client's proxier forks a server per client while its gRPC threads
# run, and gRPC's fork handlers then crash the child now and then ("Check failed: next_worker->state ==
# KICKED", ray-project/ray#63202): the client gets "Starting Ray client server failed". The proxier
# execs right after the fork, so the handlers are not needed.
on_prefix() {  # sets ON: the command prefix that runs a command on host $1 (an array, so `"${ON[@]}" cmd &` gives cmd's pid)
  ON=(ip netns exec "$(ns "$1")" env -u RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER -u RAY_ADDRESS -u HTTP_PROXY -u HTTPS_PROXY
    -u http_proxy -u https_proxy -u ALL_PROXY -u all_proxy
    PATH="$BIN:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token OMP_WAIT_POLICY=PASSIVE GRPC_ENABLE_FORK_SUPPORT=false
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 HERA_CACHE_DIR="$WORK/cache" NO_PROXY='*')
}
on() { local host=$1; shift; on_prefix "$host"; "${ON[@]}" "$@"; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, veths, a bridge)"
  command -v ip >/dev/null || die "needs iproute2 (the ip command)"
  [[ -x $BIN/ray && -x $BIN/hera ]] || die "no ray/hera in $BIN: run 'make install' (or set HERA_NETNS_BIN)"
}

# -- the network -----------------------------------------------------------------------------------

net_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$BRIDGE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # With bridge netfilter loaded, bridged frames also cross iptables' FORWARD chain, where a DROP policy
  # (Docker sets one) would silently cut host-to-host traffic. Exempt this bridge if iptables is here;
  # the global sysctl net.bridge.bridge-nf-call-iptables is left alone (other bridges may rely on it).
  if command -v iptables >/dev/null 2>&1; then
    iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null \
      || iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
  fi
  for host in "${HOSTS[@]}"; do
    local n; n=$(ns "$host")
    ns_exists "$host" || ip netns add "$n"
    ip -n "$n" link set lo up
    if ! ip link show "$(veth "$host")" >/dev/null 2>&1; then
      ip -n "$n" link del eth0 2>/dev/null || true
      ip link add "$(veth "$host")" type veth peer name "hp-$host"
      ip link set "hp-$host" netns "$n"
      ip -n "$n" link set "hp-$host" name eth0
    fi
    ip link set "$(veth "$host")" master "$BRIDGE" up
    ip -n "$n" addr replace "${IP[$host]}/24" dev eth0
    ip -n "$n" link set eth0 up
  done
}

can_dial() {  # can_dial HOST|root ADDRESS PORT: a TCP connect within 3 s
  local from=$1 addr=$2 port=$3
  local probe="exec 3<>/dev/tcp/$addr/$port"
  if [[ $from == root ]]; then timeout 3 bash -c "$probe" 2>/dev/null
  else timeout 3 ip netns exec "$(ns "$from")" bash -c "$probe" 2>/dev/null; fi
}

check_net() {  # once the head listens: every host and the root namespace reach it across the bridge
  for from in root "${HOSTS[@]}"; do
    can_dial "$from" "$HEAD" $RAY_PORT \
      || die "$from cannot reach the head at $HEAD:$RAY_PORT over $BRIDGE (is bridged traffic filtered? see net_up)"
  done
}

net_down() {
  for host in "${HOSTS[@]}"; do
    ip link del "$(veth "$host")" 2>/dev/null || true
    ns_exists "$host" && ip netns del "$(ns "$host")"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if command -v iptables >/dev/null 2>&1; then
    iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
  fi
}

# -- processes -------------------------------------------------------------------------------------

wait_for() {  # wait_for SECONDS WHAT CMD... : poll CMD until it succeeds
  local limit=$1 what=$2; shift 2
  local t0=$SECONDS
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - t0 < limit )) || return 1
    sleep 0.5
  done
}

write_config() {
  if [[ -n ${HERA_NETNS_CONFIG:-} ]]; then
    cp "$HERA_NETNS_CONFIG" "$WORK/hera.yaml"
    return
  fi
  # SmolLM2 stands in as the cloud model (quick to load and to answer on 2 cores); the cloud replica
  # asks for the custom resource only the cloud worker has, so it runs on that host.
  cat > "$WORK/hera.yaml" <<'EOF'
cloud:
  model: smollm2-135m
  model_id: smollm2-as-cloud
  threads: 1
  n_ctx: 2048
  num_cpus: 0.5
  resources: {cloud: 1}
  autoscaling: {min_replicas: 1, max_replicas: 1}
scheduler:
  edge_model: smollm2-135m
agent:
  max_steps: 3
  max_tokens_per_step: 96
hera:
  enabled: false
EOF
}

registry_token() { echo "$WORK/registry-token"; }

start_ray() {
  # Ray's temp dir: one per host (--temp-dir works per node), not the shared /tmp/ray. Ray runs several
  # nodes on one machine in one temp dir too (ray.cluster_utils does), but a separate dir keeps this
  # cluster's session_latest, ray_current_cluster and logs apart from any other Ray on the machine, and
  # is what separate hosts have. (Unix sockets live in it; keep HERA_NETNS_DIR short: paths < 108 bytes.)
  local common=(--disable-usage-stats --object-store-memory=200000000 --metrics-export-port=8090)
  if ! on head "$BIN/ray" status --address "$HEAD:$RAY_PORT" >/dev/null 2>&1; then
    log "starting the Ray head on $HEAD"
    on head "$BIN/ray" start --head --node-ip-address="$HEAD" --port=$RAY_PORT \
      --dashboard-host=0.0.0.0 --dashboard-port=$DASHBOARD_PORT --ray-client-server-port=$CLIENT_PORT \
      --num-cpus=2 --temp-dir="$WORK/ray-head" "${common[@]}" > "$WORK/logs/ray-head.log" 2>&1 \
      || { tail -20 "$WORK/logs/ray-head.log" >&2; die "ray start --head failed (log: $WORK/logs/ray-head.log)"; }
  fi
  check_net
  if ! ray_nodes_alive | grep -q "${IP[cloud]}"; then
    log "starting the Ray worker on ${IP[cloud]} (joins $HEAD:$RAY_PORT)"
    on cloud "$BIN/ray" start --address="$HEAD:$RAY_PORT" --node-ip-address="${IP[cloud]}" \
      --num-cpus=2 --resources='{"cloud": 4}' --temp-dir="$WORK/ray-cloud" "${common[@]}" \
      > "$WORK/logs/ray-cloud.log" 2>&1 \
      || { tail -20 "$WORK/logs/ray-cloud.log" >&2; die "ray start on the cloud host failed (log: $WORK/logs/ray-cloud.log)"; }
  fi
  wait_for 60 "two Ray nodes" two_ray_nodes \
    || die "the cloud worker did not join the Ray head: $(ray_nodes_alive | tr '\n' ' ')"
}

ray_nodes_alive() {  # the alive Ray nodes' addresses, one a line (asks the head's dashboard)
  "$BIN/python" - "$HEAD:$DASHBOARD_PORT" <<'EOF' 2>/dev/null || true
import os, sys
os.environ.setdefault("RAY_AUTH_MODE", "token")
from ray.util.state import list_nodes
for n in list_nodes(address=f"http://{sys.argv[1]}", filters=[("state", "=", "ALIVE")], timeout=10):
    print(n.node_ip, "head" if n.is_head_node else "worker")
EOF
}

two_ray_nodes() { [[ $(ray_nodes_alive | wc -l) -ge 2 ]]; }

hera_up() {
  log "hera up on the head (RAY_ADDRESS=$HEAD:$RAY_PORT, config $WORK/hera.yaml)"
  on head env RAY_ADDRESS="$HEAD:$RAY_PORT" \
    HERA_INGRESS__HOST=0.0.0.0 HERA_INGRESS__PORT=$INGRESS_PORT \
    HERA_SCHEDULER__REGISTRY_HOST=0.0.0.0 HERA_SCHEDULER__REGISTRY_PORT=$REGISTRY_PORT \
    HERA_SCHEDULER__TOKEN_FILE="$(registry_token)" \
    "$BIN/hera" up --config "$WORK/hera.yaml" --timeout 600 > "$WORK/logs/hera-up.log" 2>&1 \
    || { tail -30 "$WORK/logs/hera-up.log" >&2; die "hera up failed (log: $WORK/logs/hera-up.log)"; }
}

edge_pid() { cat "$WORK/$1.pid" 2>/dev/null || true; }
edge_running() { local pid; pid=$(edge_pid "$1"); [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }

edge_start() {  # start an edge node process on host $1 (returns at once; it registers when its model is loaded)
  local host=$1
  edge_running "$host" && { log "edge node on $host already running (pid $(edge_pid "$host"))"; return; }
  on_prefix "$host"
  # shellcheck disable=SC2086 # EDGE_ARGS is a list of flags
  "${ON[@]}" setsid "$BIN/hera" edge serve --model smollm2-135m --node-id "$host" \
    --host 0.0.0.0 --port $EDGE_PORT --advertise-address "${IP[$host]}:$EDGE_PORT" \
    --registry "$HEAD:$REGISTRY_PORT" --token-file "$(registry_token)" --slots 1 --threads 1 $EDGE_ARGS \
    >> "$WORK/logs/$host.log" 2>&1 < /dev/null &
  echo $! > "$WORK/$host.pid"
}

edge_stop() {  # SIGTERM: the node drains (finishes accepted work, deregisters); SIGKILL after 30 s
  # An edge host runs nothing but its edge node: every process in its namespace is that.
  local host=$1 pids
  mapfile -t pids < <(ip netns pids "$(ns "$host")" 2>/dev/null)
  rm -f "$WORK/$host.pid"
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 300); do
    [[ -z $(ip netns pids "$(ns "$host")") ]] && return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

healthz() { curl -sf --noproxy "*" --max-time 5 "http://$HEAD:$INGRESS_PORT/healthz"; }

edges_up() {  # how many edge nodes the scheduler sees up
  healthz | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin).get("nodes_up", 0))' 2>/dev/null || echo 0
}

all_edges_up() { [[ $(edges_up) -ge ${#EDGES[@]} ]]; }

# -- commands --------------------------------------------------------------------------------------

cmd_up() {
  need_root
  mkdir -p "$WORK/logs" "$WORK/cache"
  # Reuse the models joined on this machine (the Qwen cloud model is 1.1 GB): the cluster keeps its own
  # state (HERA_CACHE_DIR), so `hera up`/`hera down` elsewhere on the machine never see this one.
  if [[ -d $HOME/.cache/hera-ray/models && ! -e $WORK/cache/models ]]; then
    ln -s "$HOME/.cache/hera-ray/models" "$WORK/cache/models"
  fi
  local t0=$SECONDS
  net_up
  # Ray's token: every node and client reads ~/.ray/auth_token (here one file serves every host, as if it
  # had been copied to each; cluster.yaml copies it with file_mounts). Made once if missing.
  "$BIN/ray" get-auth-token --generate >/dev/null
  [[ -s $(registry_token) ]] || "$BIN/python" -c "from hera_ray.config import write_token_file; write_token_file(__import__('pathlib').Path('$(registry_token)'))"
  write_config
  start_ray
  if ! healthz >/dev/null 2>&1; then
    hera_up
  fi
  for host in "${EDGES[@]}"; do edge_start "$host"; done
  wait_for 180 "edges registered" all_edges_up \
    || die "the edge nodes did not register within 180 s (logs: $WORK/logs/edge*.log): $(healthz || true)"
  log "up in $((SECONDS - t0)) s"
  cmd_status
}

cmd_down() {
  [[ $(id -u) -eq 0 ]] || die "needs root"
  # Every process on the hosts, and nothing else: `ip netns pids` lists exactly those (Ray's daemons
  # included, whatever they re-parented to). `ray stop` is not used: it ends every Ray on the machine.
  for sig in TERM KILL; do
    local pids=()
    for host in "${HOSTS[@]}"; do
      ns_exists "$host" && mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$(ns "$host")")
    done
    ((${#pids[@]})) || break
    kill -s "$sig" "${pids[@]}" 2>/dev/null || true
    if [[ $sig == TERM ]]; then
      for _ in $(seq 50); do
        local left=0
        for host in "${HOSTS[@]}"; do ns_exists "$host" && left=$((left + $(ip netns pids "$(ns "$host")" | wc -l))); done
        ((left)) || break
        sleep 0.2
      done
    fi
  done
  rm -f "$WORK"/*.pid
  net_down
  log "down: namespaces, veths and $BRIDGE removed (logs kept in $WORK/logs)"
}

cmd_status() {
  printf '%-6s %-14s %-8s %s\n' host address link role
  for host in "${HOSTS[@]}"; do
    local link=absent role=""
    if ip link show "$(veth "$host")" >/dev/null 2>&1; then
      link=$(ip -br link show "$(veth "$host")" | awk '{print $2}')
    fi
    case $host in
      head) role="Ray head :$RAY_PORT, jobs/dashboard :$DASHBOARD_PORT, ray:// :$CLIENT_PORT, ingress :$INGRESS_PORT, registry :$REGISTRY_PORT";;
      cloud) role="Ray worker, resource cloud (the cloud LLM replica)";;
      *) role="edge node :$EDGE_PORT$(edge_running "$host" && echo " (pid $(edge_pid "$host"))")";;
    esac
    printf '%-6s %-14s %-8s %s\n' "$host" "${IP[$host]}" "$link" "$role"
  done
  echo "Ray nodes alive: $(ray_nodes_alive | tr '\n' ',' | sed 's/,$//; s/,/, /g')"
  echo "edge nodes up:   $(edges_up)"
  echo "ingress:         http://$HEAD:$INGRESS_PORT   (healthz: $(healthz || echo 'no answer'))"
  echo "registry:        $HEAD:$REGISTRY_PORT   token file: $(registry_token)"
  echo "Ray:             $HEAD:$RAY_PORT   jobs: http://$HEAD:$DASHBOARD_PORT   client: ray://$HEAD:$CLIENT_PORT"
  echo "logs:            $WORK/logs"
}

cmd_link() {  # link-down / link-up: the host's veth end in the root namespace (the host sees NO-CARRIER)
  local state=$1 host=${2:-}
  [[ -n $host ]] || die "usage: $0 link-$state HOST"
  is_host "$host"
  ip link set "$(veth "$host")" "$state"
  log "link of $host (${IP[$host]}) $state"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  link-down) cmd_link down "${2:-}" ;;
  link-up) cmd_link up "${2:-}" ;;
  edge-start) is_edge "${2:-}"; edge_start "$2" ;;
  edge-stop) is_edge "${2:-}"; edge_stop "$2" ;;
  exec) is_host "${2:?host}"; host=$2; shift 2; on "$host" "$@" ;;
  ray-nodes) ray_nodes_alive ;;
  edges-up) edges_up ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
