# Shared by scripts/up, scripts/down and scripts/demo. Not meant to be run directly.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="$root/.flotilla"
run_dir="$state/run"
log_dir="$state/logs"
api_url="http://${FLOTILLA_LISTEN:-127.0.0.1:8420}"

# Puts a pip-installed nats-server on PATH if there is one.
with_python_scripts() {
  local scripts_dir
  scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
  [ -n "$scripts_dir" ] && export PATH="$scripts_dir:$HOME/.local/bin:$PATH"
}

is_running() { # name
  local pidfile="$run_dir/$1.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

start() { # name command...
  local name=$1; shift
  if is_running "$name"; then
    echo "  $name already running (pid $(cat "$run_dir/$name.pid"))"
    return
  fi
  (cd "$root" && exec "$@") >"$log_dir/$name.log" 2>&1 &
  echo $! >"$run_dir/$name.pid"
  echo "  $name started (pid $!, log $log_dir/$name.log)"
}

stop() { # name
  local pidfile="$run_dir/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "  $1 stopped"
  fi
  rm -f "$pidfile"
}

# Three nats-servers from deploy/nats/server.conf on loopback, n1..n3: clients on 4222-4224,
# monitoring on 8222-8224, routes on 6222-6224. Returns once the cluster has a JetStream meta
# leader.
start_nats_cluster() {
  local i
  for i in 1 2 3; do
    mkdir -p "$state/nats-n$i"
    start "nats-n$i" env FLOTILLA_NATS_NAME="n$i" FLOTILLA_NATS_HOST=127.0.0.1 \
      FLOTILLA_NATS_PORT=$((4221 + i)) FLOTILLA_NATS_HTTP_PORT=$((8221 + i)) \
      FLOTILLA_NATS_ROUTE_PORT=$((6221 + i)) FLOTILLA_NATS_STORE_DIR="$state/nats-n$i" \
      FLOTILLA_NATS_ROUTE_1=nats-route://127.0.0.1:6222 \
      FLOTILLA_NATS_ROUTE_2=nats-route://127.0.0.1:6223 \
      FLOTILLA_NATS_ROUTE_3=nats-route://127.0.0.1:6224 \
      nats-server -c "$root/deploy/nats/server.conf"
  done
  for _ in $(seq 1 300); do
    # /jsz names the meta leader once the three servers have elected one.
    if (curl -sf http://127.0.0.1:8222/jsz 2>/dev/null || true) | grep -q '"leader": *"n[123]"'; then
      echo "  nats cluster has a JetStream meta leader"
      return
    fi
    sleep 0.1
  done
  echo "scripts/up: the nats cluster elected no JetStream meta leader; see $log_dir/nats-n*.log" >&2
  exit 1
}
