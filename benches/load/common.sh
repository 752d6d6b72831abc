# Shared by run.sh, phases.sh and profile.sh (sourced, not run).

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

# UPSTREAM_H2 without TLS: an nginx stand-in takes h2c on its plain port + 30 (nginx 1.22
# takes HTTP/2 without TLS by prior knowledge only, on a port of its own).
h2c_port() { # plain port
  echo $(($1 + 30))
}

add_h2c_listener() { # nginx.conf port
  sed -i -E "s#^( *)listen 127.0.0.1:$2 (.*)#&\n\1listen 127.0.0.1:$(h2c_port "$2") http2 \2#" "$1"
}

# keygate's config speaks HTTP/2 to the upstream: upstream.protocol, and a plain upstream's
# h2c port (an https:// one takes h2 by ALPN on its own port).
use_upstream_http2() { # keygate.toml upstream_port
  sed -i -e 's#^\[upstream\]#[upstream]\nprotocol = "http2"#' \
    -e "s#^url = \"http://127.0.0.1:$2\"#url = \"http://127.0.0.1:$(h2c_port "$2")\"#" "$1"
}
