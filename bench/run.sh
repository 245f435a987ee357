#!/usr/bin/env bash
# Side-by-side load benchmark of Portico, NGINX and HAProxy on loopback. See bench/README.md.
#
#   bench/run.sh            every scenario (ROUNDS x A B C, order rotating), then Portico's idle RSS
#   bench/run.sh scale      Portico with 10 / 1 000 / 10 000 virtual hosts, reload under load
#   bench/run.sh idle       only Portico's idle RSS on conf/portico.toml
#   bench/run.sh instructions  h1-1k with each proxy (and bench/floor) under callgrind: instructions per request
#   bench/run.sh policy     Portico alone: CPU per request of a plain route, a local limit, a Redis limit
#   bench/run.sh features   Portico alone: CPU per request of each route kind (rewrite, redirect, direct
#                           response, fault, timeout, traced at 10 %) against the plain forward route
#   bench/run.sh conns      memory per idle connection (plain, TLS, h2, WebSocket tunnel) for each proxy, and
#                           a fresh request's latency while they are held (CONNS_PLAIN, CONNS_TLS, CONNS_H2,
#                           CONNS_WS, PROBES; CONN_KINDS picks kinds: plain,tls,h2,ws; H2_STREAMS: streams
#                           each h2 connection opens at once before it rests, 1)
#                           then ACTIVE_CONNS (10 000) busy connections per proxy: req/s, p99 (ACTIVE_SECS; ACTIVE=0 or IDLE=0 skips a part)
#   bench/run.sh all        compare, then scale
#
# Environment: ROUNDS (3), DURATION (10 s), WARMUP (1 s), SCENARIOS
# (h1-1k,h1-capped,h1-100k,https-ka,tls-new,tls-capped,h2,h2-100k,h1-1k-logged), PROXIES (nginx,haproxy,portico), PIN (1),
# CAP_CORES (0.5: CPU of the proxy in tls-capped), IR_CONNS (16: connections for instructions),
# IR_SCENARIO (h1-1k, h1-1k-logged or h2: what instructions loads), IR_H2_REQUESTS (40000),
# LOG_CHECK_REQUESTS (20000: the line-count check after h1-1k-logged),
# CERT_KEY (ec|rsa), SCALE_HOSTS ("10 1000 10000"), SCALE_CERTS (1000), RELOADS (3),
# PORT_BASE (27000), PORTICO_BIN (target/release/portico), BUILD (1: cargo build --release
# when the binary is missing), KEEP_TMP (keep the temp dir), RESULTS_FILE (bench/RESULTS.md).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
what="${1:-compare}"
case "$what" in
  compare|scale|idle|instructions|policy|features|conns|all) ;;
  -h|--help|help) sed -n '2,21p' "$0"; exit 0 ;;
  *) echo "usage: bench/run.sh [compare|scale|idle|instructions|policy|features|conns|all]" >&2; exit 2 ;;
esac

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ "$what" = instructions ]; then
  command -v callgrind_control >/dev/null 2>&1 || need+=(valgrind)
fi
if [ "$what" = policy ]; then
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "[bench] installing: ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # The benchmark runs its own nginx and haproxy instances (own configs, ports, pid files);
  # it neither uses nor touches the packages' system services.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

# The cryptography package makes 1 000 certificates in a second; openssl is the fallback.
if ! python3 -c 'import cryptography' >/dev/null 2>&1; then
  python3 -m pip install --quiet cryptography >/dev/null 2>&1 \
    || { [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-cryptography >/dev/null 2>&1; } \
    || true
  python3 -c 'import cryptography' >/dev/null 2>&1 \
    || echo "[bench] python cryptography not available; certificates come from openssl (slower)" >&2
fi

bin="${PORTICO_BIN:-$repo/target/release/portico}"
if [ ! -x "$bin" ]; then
  if [ "${BUILD:-1}" = "1" ]; then
    echo "[bench] building portico (cargo build --release)" >&2
    (cd "$repo" && cargo build --release)
  else
    echo "[bench] no portico binary at $bin" >&2
    exit 1
  fi
fi
export PORTICO_BIN="$bin"

cmd="bench/run.sh $*"
for v in ROUNDS DURATION SCENARIOS PROXIES SCALE_HOSTS CONNS_PLAIN CONNS_TLS CONNS_H2 CONNS_WS CONN_KINDS H2_STREAMS PROBES IDLE ACTIVE; do
  [ -n "${!v:-}" ] && cmd="$v=\"${!v}\" $cmd"
done
export BENCH_COMMAND="${cmd% }"

cd "$repo"
case "$what" in
  all)
    python3 "$here/lib/bench.py" compare
    python3 "$here/lib/bench.py" scale
    ;;
  *) exec python3 "$here/lib/bench.py" "$what" ;;
esac
