#!/usr/bin/env bash
# Quick start: install what is needed (the package in .venv), make sure a Redis answers on
# 127.0.0.1:6379 (starting a
# throwaway one if none does), then run the proxy in the foreground on the default config
# (127.0.0.1:6380 -> 127.0.0.1:6379). Ctrl-C stops the proxy (and the Redis it started).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
started_redis=""
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis_dir=$(mktemp -d)
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --dir "$redis_dir" \
    --daemonize yes --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log"
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  started_redis="$redis_dir/redis.pid"
  echo "started redis-server on 127.0.0.1:6379 (log: $redis_dir/redis.log)"
fi
cleanup() { [ -n "$started_redis" ] && [ -f "$started_redis" ] && kill "$(cat "$started_redis")" 2>/dev/null || true; }
trap cleanup EXIT
.venv/bin/python -m shotover_gevent start -c conf/config.yaml -t conf/topology.yaml
