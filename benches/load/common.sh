# Shared by run.sh and profile.sh (sourced, not run).

# Stops every process whose pid file is in $1 and waits until each is gone: daemons
# (Redis, nginx) are not the script's children, and one still closing would keep its port
# from the next run (whose Redis then failed to bind, and that run measured 503s).
stop_pidfiles() { # dir
  local f pid
  for f in "$1"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}
