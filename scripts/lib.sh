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
