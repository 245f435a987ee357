#!/usr/bin/env python3
"""Side-by-side load benchmark: NGINX, HAProxy and Portico in front of one nginx upstream.

Run through bench/run.sh, which installs the tools first. See bench/README.md.

    bench.py compare     the five scenarios, over ROUNDS rounds, proxy order rotating per round, + idle RSS
    bench.py scale       Portico with 10 / 1 000 / 10 000 virtual hosts + reload under load
    bench.py idle        only the idle RSS of Portico on conf/portico.toml
    bench.py instructions  h1-1k under callgrind: instructions per request, and Portico's by component
    bench.py policy      Portico alone: a plain route, one with a local rate limit, one with a Redis limit
    bench.py conns       memory per idle connection (plain, TLS, h2) and a fresh request's latency meanwhile

Everything listens on 127.0.0.1; every process started here is stopped by its PID on exit.
"""

import collections
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

LIB = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(LIB)
REPO = os.path.dirname(BENCH)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


ROUNDS = env_int("ROUNDS", 3)
DURATION = env_int("DURATION", 10)
WARMUP = env_int("WARMUP", 1)
PORT_BASE = env_int("PORT_BASE", 27000)
PIN = os.environ.get("PIN", "1") not in ("0", "", "no", "false")
PORTICO = os.environ.get("PORTICO_BIN") or os.path.join(REPO, "target", "release", "portico")
PROXIES = [p for p in os.environ.get("PROXIES", "nginx,haproxy,portico").replace(" ", ",").split(",") if p]
ALL_SCENARIOS = ["h1-1k", "h1-capped", "h1-100k", "https-ka", "tls-new", "tls-capped", "h2",
                 "h2-100k", "h1-1k-logged"]
SCENARIO_NAMES = [s for s in os.environ.get("SCENARIOS", ",".join(ALL_SCENARIOS)).replace(" ", ",").split(",") if s]
RESULTS = os.environ.get("RESULTS_FILE") or os.path.join(BENCH, "RESULTS.md")
OUT = os.path.join(BENCH, "out")
CACHE = os.path.join(BENCH, ".cache")
CERT_KEY = os.environ.get("CERT_KEY", "ec")
# CPU the proxy gets in capped scenarios, in cores (a CFS quota on its cgroup).
CAP_CORES = float(os.environ.get("CAP_CORES", "0.5"))

# CPUs: with PIN, the proxy under test gets CPU 1 to itself; the upstream and the load
# generator share CPU 0. Without PIN the scheduler places everything.
PROXY_CPU = "1"
OTHER_CPU = "0"

HOST = "bench.example.com"
SNIS = ["bench1.example.com", "bench2.example.com", "bench3.example.com"]

PORTS = {
    "upstream": PORT_BASE,
    # The WebSocket echo of the conns benchmark's tunnel rows (ws_upstream.py).
    "ws_upstream": PORT_BASE + 5,
    "nginx": (PORT_BASE + 10, PORT_BASE + 11),
    "haproxy": (PORT_BASE + 20, PORT_BASE + 21),
    "portico": (PORT_BASE + 30, PORT_BASE + 31),
    "portico_admin": PORT_BASE + 39,
    # The same proxies with their access log on (h1-1k-logged), run next to the others.
    "nginx+log": (PORT_BASE + 12, PORT_BASE + 13),
    "haproxy+log": (PORT_BASE + 22, PORT_BASE + 23),
    "portico+log": (PORT_BASE + 32, PORT_BASE + 33),
    "portico+log_admin": PORT_BASE + 38,
    "scale": (PORT_BASE + 40, PORT_BASE + 41),
    "scale_admin": PORT_BASE + 49,
    "idle": (PORT_BASE + 50, PORT_BASE + 51),
    "idle_admin": PORT_BASE + 59,
    "floor": (PORT_BASE + 60,),
    "redis": PORT_BASE + 70,
    "collector": PORT_BASE + 71,
    # features: the traced twin of the bench Portico.
    "portico+trace": (PORT_BASE + 34,),
    "portico+trace_admin": PORT_BASE + 37,
}

CLOSE_FLAG = ' -H "Connection: close"'
# Connections a proxy is configured to hold (NGINX worker_connections, HAProxy maxconn):
# raised by `conns`.
MAX_CONNS = 8000
LABEL = {"nginx": "NGINX", "haproxy": "HAProxy", "portico": "Portico", "floor": "floor (tokio + httparse)"}


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes we start

STARTED = []  # Popen objects, stopped by PID in cleanup()
PROXY_WRAP = []  # a command the proxies run under (valgrind, for `instructions`)


def pinned(cmd, cpu):
    return (["taskset", "-c", cpu] + cmd) if PIN else cmd


def start(cmd, logfile, cpu=None, cwd=None, stop_sig=signal.SIGTERM):
    f = open(logfile, "ab")
    p = subprocess.Popen(pinned(cmd, cpu) if cpu else cmd, stdout=f, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
    f.close()
    p.stop_sig = stop_sig
    STARTED.append(p)
    return p


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            if int(rest[1]) == pid:
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def tree(pid):
    pids = [pid]
    for c in children(pid):
        pids += tree(c)
    return pids


def stop(p, sig=None, wait=5):
    sig = sig or getattr(p, "stop_sig", signal.SIGTERM)
    if p.poll() is not None:
        return
    kids = tree(p.pid)[1:]
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        return
    try:
        p.wait(wait)
    except subprocess.TimeoutExpired:
        for pid in [p.pid] + kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(5)
    for pid in kids:  # nginx workers exit with their master; make sure
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cleanup():
    for p in reversed(STARTED):
        try:
            stop(p)
        except Exception as e:  # noqa: BLE001
            log(f"stopping {p.pid}: {e}")
    STARTED.clear()


def cpu_split(pids):
    """User and system clock ticks of `pids` (fields 14 utime and 15 stime of /proc/PID/stat)."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            user += int(rest[11])
            system += int(rest[12])
        except (OSError, IndexError):
            pass
    return user, system


def cpu_ticks(pids):
    return sum(cpu_split(pids))


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm(pid):
    """Resets VmHWM to the current RSS (Linux clear_refs 5) so a run's peak is its own."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def wait_port(port, timeout=60, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def port_free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def http_get(port, path, host, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("GET", path, headers={"Host": host})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), body


def https_get(port, sni, path, host, alpn=("h2", "http/1.1")):
    """TLS handshake with SNI; returns (tls version, alpn, cert CN, status/None)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            der = s.getpeercert(binary_form=True)
            version, proto = s.version(), s.selected_alpn_protocol()
    cn = cert_cn(der)
    status = None
    if "http/1.1" in alpn:
        ctx.set_alpn_protocols(["http/1.1"])
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
        c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 5), server_hostname=sni)
        c.request("GET", path, headers={"Host": host})
        r = c.getresponse()
        r.read()
        status = r.status
        c.close()
    return version, proto, cn, status


def cert_cn(der):
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        return x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    except Exception:  # noqa: BLE001
        pem = ssl.DER_cert_to_PEM_cert(der)
        out = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=pem.encode(),
                             capture_output=True).stdout.decode()
        m = re.search(r"CN\s*=\s*([^,/\n]+)", out)
        return m.group(1).strip() if m else "?"


def curl_h2(port, sni, path, host):
    r = subprocess.run(
        ["curl", "-sk", "--http2", "--max-time", "5", "--resolve", f"{sni}:{port}:127.0.0.1",
         "-H", f"Host: {host}", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
         f"https://{sni}:{port}{path}"], capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


# ------------------------------------------------------------------ load generators


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def run_wrk(port, path, host, conns, duration, lua=True, extra=(), stop=None):
    """wrk for `duration` s, or until `stop` (a threading.Event) is set: then SIGINT, after
    which wrk still prints its summary and the done() line."""
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s",
           "-H", f"Host: {host}", *extra]
    if lua:
        cmd += ["-s", os.path.join(LIB, "stats.lua")]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    p = subprocess.Popen(pinned(cmd, OTHER_CPU), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stop is not None and stop.wait(duration) and p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        stdout, stderr = p.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise RuntimeError("wrk did not finish in time")
    m = re.search(r"^BENCHJSON (.*)$", stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}): {stdout[-800:]} {stderr[-800:]}")
    j = json.loads(m.group(1))
    secs = j["duration_us"] / 1e6
    errors = j["connect"] + j["read"] + j["write"] + j["timeout"]
    return {
        "requests": j["requests"], "seconds": secs, "rps": j["requests"] / secs,
        "p50_ms": j["p50"] / 1000, "p99_ms": j["p99"] / 1000, "p999_ms": j["p999"] / 1000,
        "max_ms": j["max"] / 1000, "non2xx": j["status"], "socket_errors": errors,
        "mbytes_s": j["bytes"] / secs / 1e6,
    }


H2LOAD_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
H2LOAD_REQS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout")
H2LOAD_CODES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
H2LOAD_TIME = re.compile(r"^time (for connect|to 1st byte):\s+(\S+)\s+(\S+)\s+(\S+)", re.M)


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)$", v)
    if not m:
        return None
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000}[m.group(2)]


def h2load_cmd(port, sni, path, host, conns, streams, duration, h1, close, logfile, count=None):
    # -n COUNT instead of -D: h2load before 1.64 often hangs at the end of a -D run whose
    # server closes connections (nghttp2 issue 2250), so "new connection per request"
    # runs a request count sized from the last measured rate.
    length = ["-n", str(count)] if count else ["-D", str(duration)]
    cmd = ["h2load", "-t1", f"-c{conns}", f"-m{streams}", *length,
           "--log-file", logfile, "--connect-to", f"127.0.0.1:{port}",
           "-H", f":authority: {host}"]
    if h1:
        cmd.append("--h1")
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"https://{sni}:{port}{path}")
    return cmd


def run_h2load(port, snis, path, host, conns, streams, duration, h1, close, tmp, count=None,
               timeout=None):
    """One h2load per SNI name, all at once; their counts are added, their logs merged."""
    timeout = timeout or duration + 60
    procs = []
    for i, sni in enumerate(snis):
        logfile = os.path.join(tmp, f"h2load-{i}.log")
        if os.path.exists(logfile):
            os.unlink(logfile)
        cmd = h2load_cmd(port, sni, path, host, conns, streams, duration, h1, close, logfile,
                         count // len(snis) if count else None)
        procs.append((subprocess.Popen(pinned(cmd, OTHER_CPU), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), logfile))
    rps = 0.0
    total = {"done": 0, "succeeded": 0, "failed": 0, "errored": 0, "timeout": 0, "non2xx": 0}
    secs = []
    ttfb = []
    lat = []
    outs = []
    for p, logfile in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                if q.poll() is None:
                    q.kill()
                    q.communicate()
            raise RuntimeError(f"h2load did not finish within {timeout:.0f}s")
        outs.append(out[-1500:] + err[-500:])
        f = H2LOAD_FINISHED.search(out)
        q = H2LOAD_REQS.search(out)
        c = H2LOAD_CODES.search(out)
        if not (f and q and c):
            raise RuntimeError(f"h2load failed ({p.returncode}): {out[-800:]} {err[-800:]}")
        s = float(f.group(1)) / (1000 if f.group(2) == "ms" else 1)
        secs.append(s)
        rps += float(f.group(3))
        total["done"] += int(q.group(3))
        total["succeeded"] += int(q.group(4))
        total["failed"] += int(q.group(5))
        total["errored"] += int(q.group(6))
        total["timeout"] += int(q.group(7))
        total["non2xx"] += int(c.group(3)) + int(c.group(4))
        for name, _mn, _mx, mean in H2LOAD_TIME.findall(out):
            if name == "to 1st byte":
                ttfb.append(to_ms(mean))
        with open(logfile) as lf:
            for line in lf:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] != "-1":
                    lat.append(int(parts[2]))
        os.unlink(logfile)
    lat.sort()
    errors = total["errored"] + total["timeout"] + max(0, total["failed"] - total["non2xx"])
    # Keep what h2load printed when something went wrong, for the log.
    odd = "\n".join(outs) if (total["done"] == 0 or errors) else None
    if len(secs) > 1:  # parallel processes: all requests over the longest of them
        rps = total["done"] / max(secs)
    return {
        "requests": total["done"], "seconds": max(secs), "rps": rps,
        "p50_ms": (pct(lat, 50) or 0) / 1000, "p99_ms": (pct(lat, 99) or 0) / 1000,
        "p999_ms": (pct(lat, 99.9) or 0) / 1000, "max_ms": (lat[-1] if lat else 0) / 1000,
        "non2xx": total["non2xx"], "socket_errors": errors,
        "ttfb_mean_ms": statistics.mean([t for t in ttfb if t is not None]) if ttfb else None,
        "tool_output": odd,
    }


# ------------------------------------------------------------------ scenarios

SCENARIOS = {
    "h1-1k": {"title": "HTTP/1.1 keep-alive, 1 KiB", "tool": "wrk", "path": "/api/1k",
              "conns": env_int("CONNS_H1", 64)},
    # As h1-1k, with the proxy held to CAP_CORES of a core: in h1-1k wrk and the upstream
    # share a core that is the limit for every proxy, so req/s there is theirs; capped, the
    # proxy is the limit and req/s is requests per unit of proxy CPU.
    "h1-capped": {"title": f"HTTP/1.1 keep-alive, 1 KiB, proxy held to {CAP_CORES:g} core",
                  "tool": "wrk", "path": "/api/1k", "conns": env_int("CONNS_H1", 64),
                  "cap": True},
    "h1-100k": {"title": "HTTP/1.1 keep-alive, 100 KiB", "tool": "wrk", "path": "/api/big",
                "conns": env_int("CONNS_H1", 64)},
    "https-ka": {"title": "HTTPS keep-alive (TLS 1.3, HTTP/1.1), 1 KiB", "tool": "h2load",
                 "path": "/api/1k", "conns": env_int("CONNS_H1", 64), "streams": 1, "h1": True,
                 "close": False, "snis": SNIS[:1]},
    "tls-new": {"title": "new TLS 1.3 connection per request, SNI over 3 names, 1 KiB",
                "tool": "h2load", "path": "/api/1k", "conns": env_int("CONNS_TLS_NEW", 8),
                "streams": 1, "h1": True, "close": True, "snis": SNIS, "count": True},
    # As tls-new, with the proxy held to CAP_CORES of a core: on two cores h2load's own
    # handshakes (an ECDSA verify each) keep its core busier than any proxy's, so in tls-new
    # the handshake rate is the client's. Capped, the proxy is the limit and the rate is
    # handshakes per unit of proxy CPU.
    "tls-capped": {"title": f"new TLS 1.3 connection per request, SNI over 3 names, 1 KiB, proxy held to {CAP_CORES:g} core",
                   "tool": "h2load", "path": "/api/1k", "conns": env_int("CONNS_TLS_NEW", 8),
                   "streams": 1, "h1": True, "close": True, "snis": SNIS, "count": True, "cap": True},
    "h2": {"title": "HTTP/2 over TLS 1.3, 100 streams, 1 KiB", "tool": "h2load",
           "path": "/api/1k", "conns": env_int("CONNS_H2", 1), "streams": 100, "h1": False,
           "close": False, "snis": SNIS[:1]},
    "h2-100k": {"title": "HTTP/2 over TLS 1.3, 100 streams, 100 KiB", "tool": "h2load",
                "path": "/api/big", "conns": env_int("CONNS_H2", 1), "streams": 100,
                "h1": False, "close": False, "snis": SNIS[:1]},
    # As h1-1k, on a second instance of each proxy that writes its access log to a file in
    # its usual format: NGINX's `combined` (access_log FILE), HAProxy's `option httplog` to
    # stdout (`log stdout format raw`, its stdout a file; HAProxy has no file logging of its
    # own), Portico's JSON with Istio's fields (accessLogFile = FILE).
    "h1-1k-logged": {"title": "HTTP/1.1 keep-alive, 1 KiB, access log to a file", "tool": "wrk",
                     "path": "/api/1k", "conns": env_int("CONNS_H1", 64), "logged": True},
}


def key_of(name, logged):
    """The process key (and PORTS key) of a proxy: `portico`, or `portico+log` for its twin
    with the access log on."""
    return f"{name}+log" if logged else name


def logged(scenario):
    return bool(SCENARIOS[scenario].get("logged"))


RATE = {}  # (port, scenario, host) -> last measured req/s, to size request-count runs


def run_scenario(name, ports, duration, tmp, host=HOST, snis=None, path=None):
    sc = SCENARIOS[name]
    if sc["tool"] == "wrk":
        return run_wrk(ports[0], path or sc["path"], host, sc["conns"], duration)
    https_port = ports[1]
    snis = snis or sc["snis"]
    args = (https_port, snis, path or sc["path"], host, sc["conns"], sc["streams"], duration,
            sc["h1"], sc["close"], tmp)
    if not sc.get("count"):
        return run_h2load(*args)
    key = (https_port, name, host)
    floor = sc["conns"] * len(snis) * 4
    if key not in RATE:  # probe the rate once
        probe = run_h2load(*args, count=floor * 10, timeout=120)
        RATE[key] = probe["rps"]
    count = max(floor, int(RATE[key] * duration))
    r = run_h2load(*args, count=count, timeout=duration * 5 + 60)
    RATE[key] = r["rps"]
    return r


# ------------------------------------------------------------------ servers


def check_ports():
    """Refuse to start when one of the benchmark's ports is taken: a leftover upstream from
    an earlier run would answer in place of the one started here, unmeasured."""
    busy = []
    for name, v in PORTS.items():
        for port in v if isinstance(v, tuple) else (v,):
            if not port_free(port):
                busy.append(f"{port} ({name})")
    if busy:
        raise SystemExit("ports in use: " + ", ".join(busy) + "; stop what holds them or set PORT_BASE")


class Env:
    def __init__(self):
        check_ports()
        self.tmp = tempfile.mkdtemp(prefix="portico-bench-")
        os.chmod(self.tmp, 0o755)
        self.certs = os.path.join(self.tmp, "certs")
        self.servers = {}  # name -> Popen

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    def close(self):
        cleanup()
        if os.environ.get("KEEP_TMP"):
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def nginx_common(prefix):
    # Under valgrind (PROXY_WRAP) the worker must be the process valgrind started:
    # callgrind_control cannot reach a forked one.
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
master_process {"off" if PROXY_WRAP else "on"};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections {max(16384, MAX_CONNS)}; }}
"""


def nginx_temp_paths(prefix):
    return "".join(f"  {k}_temp_path {prefix}/tmp/{k};\n"
                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def start_upstream(env):
    prefix = env.path("upstream")
    www = os.path.join(prefix, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "1k"), "wb") as f:
        f.write(b"a" * 1023 + b"\n")
    with open(os.path.join(www, "big"), "wb") as f:
        f.write(b"b" * 102399 + b"\n")
    port = PORTS["upstream"]
    conf = nginx_common(prefix) + f"""http {{
  access_log off;
{nginx_temp_paths(prefix)}  keepalive_requests 1000000;
  keepalive_timeout 120s;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  open_file_cache max=16 inactive=1h;
  open_file_cache_valid 1h;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {www};
    # Echo the header the proxies add, so the sanity check sees it arrive.
    add_header x-got-bench "$http_x_bench" always;
    location / {{ try_files /1k =404; }}
    location ~ /big$ {{ try_files /big =404; }}
  }}
}}
"""
    cfg = os.path.join(prefix, "nginx.conf")
    with open(cfg, "w") as f:
        f.write(conf)
    p = start(["nginx", "-p", prefix, "-c", cfg, "-e", os.path.join(prefix, "error.log")],
              os.path.join(prefix, "stdout.log"), cpu=OTHER_CPU)
    wait_port(port, proc=p)
    env.servers["upstream"] = p
    return p


def start_nginx(env, logged=False):
    prefix = env.path(key_of("nginx", logged))
    http_port, https_port = PORTS[key_of("nginx", logged)]
    up = PORTS["upstream"]
    c = env.certs
    proxy = """proxy_pass http://bench_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header x-bench 1;"""
    cert_servers = "".join(f"""
  server {{
    listen 127.0.0.1:{https_port} ssl http2;
    server_name {sni};
    ssl_certificate {c}/{sni}.crt;
    ssl_certificate_key {c}/{sni}.key;
    return 404;
  }}
""" for sni in SNIS[1:])
    access_log = f"access_log {prefix}/access.log" if logged else "access_log off"
    conf = nginx_common(prefix) + f"""http {{
  {access_log};
{nginx_temp_paths(prefix)}  keepalive_requests 1000000;
  keepalive_timeout 120s;
  ssl_protocols TLSv1.3;
  upstream bench_upstream {{
    server 127.0.0.1:{up};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  # Unknown Host: 404. SNI bench1 and clients without SNI get the bench1 certificate.
  server {{
    listen 127.0.0.1:{http_port} default_server backlog=4096;
    listen 127.0.0.1:{https_port} ssl http2 default_server backlog=4096;
    server_name {SNIS[0]};
    ssl_certificate {c}/{SNIS[0]}.crt;
    ssl_certificate_key {c}/{SNIS[0]}.key;
    return 404;
  }}
  # The route: Host bench.example.com + /api/ (nginx picks this server by Host after the
  # handshake, whatever the SNI was).
  server {{
    listen 127.0.0.1:{http_port};
    listen 127.0.0.1:{https_port} ssl http2;
    server_name {HOST};
    ssl_certificate {c}/{SNIS[0]}.crt;
    ssl_certificate_key {c}/{SNIS[0]}.key;
    location /api/ {{
      {proxy}
    }}
    # Tunnels (conns' WebSocket rows): the upgrade passed on, held as long as it is open.
    location /ws/ {{
      proxy_pass http://127.0.0.1:{PORTS['ws_upstream']};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
    }}
    location / {{ return 404; }}
  }}
{cert_servers}}}
"""
    cfg = os.path.join(prefix, "nginx.conf")
    with open(cfg, "w") as f:
        f.write(conf)
    p = start(PROXY_WRAP + ["nginx", "-p", prefix, "-c", cfg, "-e", os.path.join(prefix, "error.log")],
              os.path.join(prefix, "stdout.log"), cpu=PROXY_CPU)
    wait_port(http_port, proc=p)
    wait_port(https_port, proc=p)
    return p


def haproxy_maxconn():
    """HAProxy refuses to start when its maxconn needs more descriptors than the hard limit
    (two per connection: client and server side)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(max(8000, MAX_CONNS), (hard - 200) // 2)


def start_haproxy(env, logged=False):
    prefix = env.path(key_of("haproxy", logged))
    os.makedirs(prefix, exist_ok=True)
    http_port, https_port = PORTS[key_of("haproxy", logged)]
    log_global = "  log stdout format raw local0\n" if logged else ""
    log_defaults = "  log global\n  option httplog\n" if logged else ""
    crts = " ".join(f"crt {env.certs}/{s}.pem" for s in SNIS)
    conf = f"""global
  nbthread 1
  maxconn {haproxy_maxconn()}
  ssl-default-bind-options ssl-min-ver TLSv1.3
{log_global}
defaults
  mode http
{log_defaults}  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  option http-keep-alive
  http-reuse always

frontend bench
  bind 127.0.0.1:{http_port} backlog 4096
  bind 127.0.0.1:{https_port} backlog 4096 ssl {crts} alpn h2,http/1.1 ssl-min-ver TLSv1.3
  acl bench_host req.hdr(host),field(1,:) -i {HOST}
  acl api path_beg /api/
  acl ws path_beg /ws/
  use_backend upstream if bench_host api
  use_backend ws if bench_host ws
  default_backend notfound

backend upstream
  http-reuse always
  http-request set-header x-bench 1
  server up1 127.0.0.1:{PORTS['upstream']}

backend ws
  timeout tunnel 1h
  server ws1 127.0.0.1:{PORTS['ws_upstream']}

backend notfound
  http-request return status 404
"""
    cfg = os.path.join(prefix, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(conf)
    p = start(PROXY_WRAP + ["haproxy", "-db", "-f", cfg], os.path.join(prefix, "stdout.log"), cpu=PROXY_CPU)
    wait_port(http_port, proc=p)
    wait_port(https_port, proc=p)
    return p


def portico_bench_config(env, logged=False):
    http_port, https_port = PORTS[key_of("portico", logged)]
    admin = PORTS[key_of("portico", logged) + "_admin"]
    access_log = env.path(key_of("portico", logged), "access.log") if logged else ""
    up = PORTS["upstream"]
    ws = PORTS["ws_upstream"]
    c = env.certs
    servers = ""
    for i, sni in enumerate(SNIS):
        hosts = f'["{HOST}", "{sni}"]' if i == 0 else f'["{sni}"]'
        default = ", defaultCertificate = true" if i == 0 else ""
        servers += f"""
[[gateways.servers]]
port = {{ number = {https_port}, name = "https-{i + 1}", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = {hosts}
tls = {{ mode = "SIMPLE", serverCertificate = "{c}/{sni}.crt", privateKey = "{c}/{sni}.key", minProtocolVersion = "TLSV1_3"{default} }}
"""
    return f"""# Generated by bench/lib/bench.py: the benchmark route, as in the NGINX and HAProxy configs.
[mesh]
admin = "127.0.0.1:{admin}"
accessLogFile = "{access_log}"

[[gateways]]
name = "bench"
[[gateways.servers]]
port = {{ number = {http_port}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["{HOST}"]
{servers}
[[virtualServices]]
name = "bench"
hosts = ["{HOST}"]
gateways = ["bench"]
[[virtualServices.http]]
name = "api"
match = [{{ uri = {{ prefix = "/api/" }} }}]
route = [{{ destination = {{ host = "upstream.bench", port = {{ number = {up} }} }} }}]
headers = {{ request = {{ set = {{ x-bench = "1" }} }} }}
[[virtualServices.http]]
name = "ws"
match = [{{ uri = {{ prefix = "/ws/" }} }}]
route = [{{ destination = {{ host = "ws.bench", port = {{ number = {ws} }} }} }}]

[[serviceEntries]]
name = "upstream"
hosts = ["upstream.bench"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = {up}, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1" }}]

[[serviceEntries]]
name = "ws"
hosts = ["ws.bench"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = {ws}, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1" }}]
"""


def wait_ready(admin_port, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"portico exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
            c.request("GET", "/ready")
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"portico not ready after {timeout}s")


def start_portico(env, config_text=None, name="portico", args=(), ports=None, admin=None,
                  ready_timeout=60):
    prefix = env.path(name)
    os.makedirs(prefix, exist_ok=True)
    cfg = os.path.join(prefix, "bench-config.toml")
    if config_text is not None:
        with open(cfg, "w") as f:
            f.write(config_text)
    p = start(PROXY_WRAP + [PORTICO, "run", "-c", cfg, "--threads", "1", *args],
              os.path.join(prefix, "stderr.log"), cpu=PROXY_CPU,
              stop_sig=signal.SIGINT)
    wait_ready(admin or PORTS["portico_admin"], p, ready_timeout)
    for port in ports or PORTS["portico"]:
        wait_port(port, proc=p)
    return p


def worker_pid(name, p):
    """The process that serves: nginx's worker, else the process itself."""
    if name == "nginx":
        kids = children(p.pid)
        # taskset execs nginx, so p.pid is the master; its child is the single worker
        if kids:
            return kids[0]
    return p.pid


def sanity(name, ports):
    http_port = ports[0]
    problems = []
    st, hdrs, body = http_get(http_port, "/api/1k", HOST)
    if st != 200 or len(body) != 1024:
        problems.append(f"GET /api/1k: {st}, {len(body)} bytes")
    if hdrs.get("x-got-bench") != "1":
        problems.append(f"x-bench did not reach the upstream (x-got-bench={hdrs.get('x-got-bench')!r})")
    st, _, body = http_get(http_port, "/api/big", HOST)
    if st != 200 or len(body) != 102400:
        problems.append(f"GET /api/big: {st}, {len(body)} bytes")
    st, _, _ = http_get(http_port, "/api/1k", "other.example.com")
    if st == 200:
        problems.append("Host other.example.com was routed (expected 404)")
    st, _, _ = http_get(http_port, "/else", HOST)
    if st == 200:
        problems.append("path /else was routed (expected 404)")
    if name == "floor":  # plain HTTP/1.1 only
        if problems:
            raise RuntimeError(f"{name} sanity check failed:\n  " + "\n  ".join(problems))
        log(f"{name}: sanity ok (routing by Host+prefix, x-bench added; no TLS)")
        return
    https_port = ports[1]
    for sni in SNIS:
        version, proto, cn, status = https_get(https_port, sni, "/api/1k", HOST)
        if version != "TLSv1.3" or proto != "h2" or cn != sni or status != 200:
            problems.append(f"TLS {sni}: {version}, ALPN {proto}, cert CN {cn}, HTTP/1.1 status {status}")
    h2 = curl_h2(https_port, SNIS[1], "/api/1k", HOST)
    if h2 != "200 2":
        problems.append(f"HTTP/2 GET via curl: {h2!r}")
    if problems:
        raise RuntimeError(f"{name} sanity check failed:\n  " + "\n  ".join(problems))
    log(f"{name}: sanity ok (routing by Host+prefix, x-bench added, 3 SNI certs, TLS 1.3, ALPN h2, HTTP/2)")


# ------------------------------------------------------------------ measuring a run


class AnonPeak:
    """Samples the serving process's RssAnon and RssFile (/proc/PID/status) every 50 ms
    while a run lasts: VmHWM is one number for both, and the two say different things.
    Anonymous pages are what the proxy allocates (buffers, connection and stream state);
    file pages are its code and libraries mapped from disk, shared with the page cache and
    dropped by the kernel when memory is short."""

    def __init__(self, pid):
        import threading
        self.pid, self.anon, self.file = pid, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            anon, file = status_kib(self.pid, "RssAnon"), status_kib(self.pid, "RssFile")
            if anon is not None and anon > self.anon:
                self.anon = anon
            if file is not None and file > self.file:
                self.file = file
            self.stop.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def measured(label, pids_fn, worker, fn, other_pids=()):
    reset_ok = reset_hwm(worker)
    pids = pids_fn()
    u0, s0 = cpu_split(pids)
    o0 = cpu_ticks(other_pids)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.time()
    with AnonPeak(worker) as peaks:
        r = fn()
    wall = time.time() - w0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    u1, s1 = cpu_split(pids)
    o1 = cpu_ticks(other_pids)
    user, system = (u1 - u0) / CLK_TCK, (s1 - s0) / CLK_TCK
    cpu = user + system
    r["proxy_cpu_s"] = cpu
    r["proxy_cpu_pct"] = 100 * cpu / r["seconds"] if r["seconds"] else None
    r["cpu_per_100k"] = cpu / r["requests"] * 1e5 if r["requests"] else None
    r["user_per_100k"] = user / r["requests"] * 1e5 if r["requests"] else None
    r["sys_per_100k"] = system / r["requests"] * 1e5 if r["requests"] else None
    r["upstream_cpu_pct"] = 100 * (o1 - o0) / CLK_TCK / wall
    r["client_cpu_pct"] = 100 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / wall
    hwm = status_kib(worker, "VmHWM")
    r["peak_rss_mib"] = hwm / 1024 if hwm else None
    r["peak_anon_mib"] = peaks.anon / 1024 if peaks.anon else None
    r["peak_file_mib"] = peaks.file / 1024 if peaks.file else None
    r["hwm_reset"] = reset_ok
    return r


def cgroup_cpu():
    """A cgroup hierarchy in which a CPU quota can be set: ("v1", path) for the cpu
    controller of cgroup v1, ("v2", path) for cgroup v2 with the cpu controller enabled for
    children, else (None, why)."""
    v1 = "/sys/fs/cgroup/cpu"
    if os.path.exists(os.path.join(v1, "cpu.cfs_quota_us")):
        return ("v1", v1) if os.access(v1, os.W_OK) else (None, f"{v1} is not writable")
    v2 = "/sys/fs/cgroup"
    ctl = os.path.join(v2, "cgroup.subtree_control")
    try:
        with open(ctl) as f:
            enabled = f.read().split()
        if "cpu" not in enabled:
            with open(ctl, "w") as f:
                f.write("+cpu")
        return "v2", v2
    except OSError as e:
        return None, f"no cgroup v1 cpu controller and cgroup v2 cpu not usable ({e})"


@contextlib.contextmanager
def cpu_cap(pids, cores, name):
    """Run the body with `pids` (whole processes) in a cgroup limited to `cores` of CPU,
    then put them back where they were."""
    kind, root = cgroup_cpu()
    if kind is None:
        raise RuntimeError(f"cannot cap CPU: {root}")
    path = os.path.join(root, f"portico-bench-{name}")
    os.makedirs(path, exist_ok=True)
    period = 10000  # 10 ms periods: short throttling stalls, same total CPU

    def put(f, v):
        with open(os.path.join(path, f), "w") as fh:
            fh.write(str(v))

    if kind == "v1":
        put("cpu.cfs_period_us", period)
        put("cpu.cfs_quota_us", int(period * cores))
    else:
        put("cpu.max", f"{int(period * cores)} {period}")
    home = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                for line in f:
                    _, ctrls, rel = line.rstrip("\n").split(":", 2)
                    if (kind == "v1" and "cpu" in ctrls.split(",")) or (kind == "v2" and ctrls == ""):
                        home[pid] = os.path.join(root, rel.lstrip("/"))
            put("cgroup.procs", pid)
        except OSError:
            pass  # gone
    try:
        yield
    finally:
        for pid, back in home.items():
            try:
                with open(os.path.join(back, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except OSError:
                pass
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def versions():
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"

    return {
        "nginx": out(["nginx", "-v"]).replace("nginx version: ", ""),
        "haproxy": out(["haproxy", "-v"]),
        "wrk": out(["wrk", "-v"]),
        "h2load": out(["h2load", "--version"]),
        "portico": out([PORTICO, "--version"]) + BUILD_NOTE,
        "openssl": out(["openssl", "version"]),
    }


BUILD_NOTE = ""


def portico_build_note():
    try:
        mtime = os.path.getmtime(PORTICO)
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                               capture_output=True, text=True).stdout.strip()
        when = datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
        return f" (binary built {when}; repo HEAD {rev}{', src/ has uncommitted edits' if dirty else ''})"
    except Exception:  # noqa: BLE001
        return ""


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ------------------------------------------------------------------ report helpers


def fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.{digits}f}"


def med(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    if a is None or b in (None, 0):
        return "–"
    return f"{a / b:.2f}"


def write_section(section, text):
    """Replaces (or appends) one marked section of RESULTS.md, keeping the others."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = ""
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            old = f.read()
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end) + 1:]
    else:
        head = "" if old.strip() else "# Portico benchmark results\n\nWritten by `bench/run.sh`; see `bench/README.md` for the method.\n\n"
        new = (old.rstrip() + "\n\n" if old.strip() else head) + block
    with open(RESULTS, "w") as f:
        f.write(new)


NOISE = ("- **noise:** the machine is shared with other engineers who compile at the same time; "
         "numbers move by 10-30 % from run to run. Compare proxies within one run (they alternate "
         "A B C, B C A, C A B: the order rotates each round; medians over rounds), not across runs.")


def header(command, start_load, vers, mach, extra=(), noise=NOISE):
    lines = [
        f"- command: `{command}`",
        f"- date: {mach['date']}",
        f"- machine: {mach['nproc']} CPUs (`nproc`), {mach['cpu']}, kernel {mach['kernel']}",
        f"- load average at start: {start_load}; at end: {loadavg()}",
        "- versions: " + "; ".join(f"{k} `{v}`" for k, v in vers.items()),
    ]
    lines += list(extra)
    if noise:
        lines.append(noise)
    return "\n".join(lines)


# ------------------------------------------------------------------ instructions per request

IR_CONNS = env_int("IR_CONNS", 16)
# h1-1k (wrk, IR_CONNS connections, DURATION s) or h2 (h2load, one connection, 100
# streams, IR_H2_REQUESTS requests after 5 000 of warm-up).
IR_SCENARIO = os.environ.get("IR_SCENARIO", "h1-1k")
if IR_SCENARIO not in ("h1-1k", "h1-1k-logged", "h2"):
    sys.exit(f"IR_SCENARIO must be h1-1k, h1-1k-logged or h2, not {IR_SCENARIO!r}")
IR_H2_REQUESTS = env_int("IR_H2_REQUESTS", 40000)
# The floor (bench/floor) runs in this mode only: it has no TLS and one hard-wired route.
IR_PROXIES = (PROXIES if "PROXIES" in os.environ or IR_SCENARIO != "h1-1k"
              else PROXIES + ["floor"])
FLOOR = os.path.join(BENCH, "floor")


def start_floor(env):
    """bench/floor: a minimal HTTP/1.1 proxy on tokio + httparse, the floor for a Rust proxy."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path",
                    os.path.join(FLOOR, "Cargo.toml")], check=True)
    port = PORTS["floor"][0]
    p = start(PROXY_WRAP + [os.path.join(FLOOR, "target", "release", "portico-bench-floor"),
                            f"127.0.0.1:{port}", f"127.0.0.1:{PORTS['upstream']}"],
              env.path("floor.log"), cpu=PROXY_CPU)
    wait_port(port, timeout=120, proc=p)
    return p


def start_proxy(env, name, ready_timeout=60, logged=False):
    if name == "nginx":
        return start_nginx(env, logged)
    if name == "haproxy":
        return start_haproxy(env, logged)
    if name == "portico":
        key = key_of(name, logged)
        return start_portico(env, portico_bench_config(env, logged), name=key,
                             ready_timeout=ready_timeout, ports=PORTS[key],
                             admin=PORTS[key + "_admin"])
    if name == "floor":
        return start_floor(env)
    raise SystemExit(f"unknown proxy {name!r}")


def instructions(command):
    """h1-1k through each proxy running under callgrind: instructions per request, and for
    Portico where they go. Deterministic where CPU seconds are noisy; slow (valgrind runs
    the proxy ~50x slower), so it is its own mode."""
    import glob
    import callgrind

    global PROXY_WRAP
    start_load = loadavg()
    mach = machine()
    vers = versions()
    env = Env()
    out_dir = env.path("callgrind")
    os.makedirs(out_dir)
    results = {}
    try:
        subprocess.run([sys.executable, os.path.join(LIB, "certs.py"), env.certs, *SNIS], check=True)
        start_upstream(env)
        for name in IR_PROXIES:
            PROXY_WRAP = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/{name}.%p"]
            try:
                p = start_proxy(env, name, ready_timeout=300, logged=logged(IR_SCENARIO))
            finally:
                PROXY_WRAP = []
            path = SCENARIOS[IR_SCENARIO]["path"]
            ports = PORTS[key_of(name, logged(IR_SCENARIO))]
            if IR_SCENARIO == "h2":
                sc = SCENARIOS["h2"]

                def load(count):
                    return run_h2load(ports[1], sc["snis"], path, HOST, sc["conns"],
                                      sc["streams"], 0, False, False, env.tmp, count=count,
                                      timeout=600)
            else:
                def load(count):
                    return run_wrk(ports[0], path, HOST, IR_CONNS, count)
            load(5000 if IR_SCENARIO == "h2" else 3)  # warm up under valgrind
            pids = [str(x) for x in tree(p.pid)]
            # callgrind acts on a command when the process next runs: the zeroing lands as
            # the load starts, and the dump needs a poke, a request that is then counted.
            subprocess.run(["callgrind_control", "-z", *pids], check=True, stdout=subprocess.DEVNULL)
            r = load(IR_H2_REQUESTS if IR_SCENARIO == "h2" else DURATION)
            dump = subprocess.Popen(["callgrind_control", "-d", *pids], stdout=subprocess.DEVNULL)
            pokes = 0
            while dump.poll() is None and pokes < 100:
                time.sleep(0.2)
                http_get(ports[0], path, HOST)
                pokes += 1
            dump.wait(30)
            r["requests"] += pokes
            stop(p)
            files = [f for pid in pids for f in glob.glob(f"{out_dir}/{name}.{pid}.1")]
            if not files:
                raise RuntimeError(f"{name}: callgrind wrote no dump in {out_dir}")
            own, calls = callgrind.parse(files)
            total = sum(own.values())
            if r["non2xx"] or r["socket_errors"] or not r["requests"]:
                raise RuntimeError(f"{name}: {r['requests']} requests, {r['non2xx']} non-2xx, "
                                   f"{r['socket_errors']} socket errors under valgrind")
            results[name] = {"requests": r["requests"], "ir": total / r["requests"],
                             "own": own, "calls": calls}
            log(f"{name}: {r['requests']} requests, {total / r['requests']:,.0f} instructions per request")
    finally:
        env.close()
    text = instructions_report(command, start_load, vers, mach, results)
    print(text)
    write_section({"h1-1k": "instructions", "h2": "instructions-h2"}.get(IR_SCENARIO, f"instructions-{IR_SCENARIO}"), text)
    log(f"wrote {RESULTS}")


def instructions_report(command, start_load, vers, mach, results):
    import callgrind

    if IR_SCENARIO == "h2":
        title = "HTTP/2"
        load = (f"`h2load -t1 -c1 -m100 -n {IR_H2_REQUESTS}` on h2 (HTTP/2 over TLS 1.3, GET "
                f"{SCENARIOS['h2']['path']}, 1 KiB from the upstream, x-bench added), after "
                "5 000 requests of warm-up")
        seen = "two runs of the same Portico binary on 2026-12-05: 58,062 and 58,031, 0.05 %"
    else:
        title = "HTTP/1.1"
        load = (f"`wrk -t1 -c{IR_CONNS} -d{DURATION}s` on {IR_SCENARIO} (GET {SCENARIOS['h1-1k']['path']}, "
                "1 KiB from the upstream, x-bench added"
                + ("; each proxy's access log to a file in its usual format" if logged(IR_SCENARIO) else "")
                + "), after 3 s of warm-up")
        seen = "two runs of the same binary differed by 0.04 % (Portico) and 0.6 % (NGINX)"
    settings = [f"- load: {load}; counters zeroed "
                "(`callgrind_control -z`) before and dumped (`-d`) after; all of the proxy's "
                "processes and threads counted, user space only (the kernel's socket work is "
                "not in these numbers)"]
    logs = ", access log to a file" if logged(IR_SCENARIO) else ""
    out = [f"## Instructions per {title} request{logs} (callgrind)", "",
           header(command, start_load, vers, mach, settings,
                  noise="- **noise:** instruction counts barely move with the machine's load "
                        f"({seen}: how many requests "
                        "each wake-up finds ready changes the polling work per request)"), ""]
    base = results.get("nginx", {}).get("ir")
    out += ["| proxy | requests counted | instructions / request | / NGINX |", "|---|---:|---:|---:|"]
    for name in IR_PROXIES:
        if name in results:
            r = results[name]
            out.append(f"| {LABEL[name]} | {r['requests']:,} | {r['ir']:,.0f} | "
                       f"{ratio(r['ir'], base) if base else '-'} |")
    out.append("")
    if "floor" in results:
        out += ["The floor is `bench/floor`: a minimal HTTP/1.1 keep-alive proxy on tokio (current-thread "
                "runtime) and httparse, with the benchmark's route hard-wired, `x-bench` added and the "
                "upstream's response passed on after parsing its head; no TLS, no metrics, no pool. "
                "About the least a Rust proxy on tokio does per request.", ""]
    if "portico" in results:
        r = results["portico"]
        n = r["requests"]
        groups = collections.Counter()
        for fn, c in r["own"].items():
            groups[callgrind.group_of(fn)] += c
        total = sum(groups.values())
        out += ["### Portico: where the instructions go", "",
                "Self instructions per request, by the crate of the function that executed them.", "",
                "| component | instructions / request | share |", "|---|---:|---:|"]
        for g, c in groups.most_common():
            out.append(f"| {g} | {c / n:,.0f} | {100 * c / total:.1f} % |")
        out += ["", "Portico's entry points, inclusive: the HTTP/1.1 fast path's connection loop, or on "
                "pingora's path its `ProxyHttp` callbacks with the pingora and http work they call "
                "(such as inserting headers):", "",
                "| entry point | instructions / request |", "|---|---:|"]
        for fn, c in callgrind.portico_callbacks(r["calls"]).most_common(8):
            if c / n >= 20:
                out.append(f"| `{callgrind.short(fn)}` | {c / n:,.0f} |")
        out += ["", "Top functions by self instructions:", "",
                "| function | instructions / request |", "|---|---:|"]
        for fn, c in r["own"].most_common(15):
            out.append(f"| `{callgrind.short(fn)}` | {c / n:,.0f} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------ idle RSS


def idle_rss(env):
    """Portico on a copy of conf/ (the default config) with its default threads: VmRSS after 2 s."""
    src = os.path.join(REPO, "conf")
    dst = env.path("idle", "conf")
    shutil.copytree(src, dst)
    cfg = os.path.join(dst, "portico.toml")
    text = open(cfg).read()
    note = "conf/portico.toml copied to a temp dir (its self-signed demo certificates are written there)"
    defaults = {8080: PORTS["idle"][0], 8443: PORTS["idle"][1], 15000: PORTS["idle_admin"]}
    busy = [p for p in defaults if not port_free(p)]
    admin = 15000
    if busy:
        for old, new in defaults.items():
            text = re.sub(rf"\b{old}\b", str(new), text)
        with open(cfg, "w") as f:
            f.write(text)
        admin = PORTS["idle_admin"]
        note += f"; ports {busy} were busy so its ports were moved to {list(defaults.values())} (nothing else changed)"
    p = start([PORTICO, "run", "-c", cfg], env.path("idle", "stderr.log"), stop_sig=signal.SIGINT)
    try:
        wait_ready(admin, p, 30)
        time.sleep(2)
        rss = status_kib(p.pid, "VmRSS")
        threads = status_kib(p.pid, "Threads")
    finally:
        stop(p)
        STARTED.remove(p)
    return {"rss_mib": rss / 1024 if rss else None, "threads": threads, "note": note}


# ------------------------------------------------------------------ compare


def runs_in(name, scenario):
    """The floor speaks plain HTTP/1.1 only: it runs in the wrk scenarios."""
    return name != "floor" or (SCENARIOS[scenario]["tool"] == "wrk" and not logged(scenario))


def compare(command):
    start_load = loadavg()
    mach = machine()
    vers = versions()
    for s in SCENARIO_NAMES:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}; known: {', '.join(ALL_SCENARIOS)}")
    capped = [s for s in SCENARIO_NAMES if SCENARIOS[s].get("cap")]
    if capped:
        kind, why = cgroup_cpu()
        if kind is None:
            log(f"skipping {', '.join(capped)}: {why}")
            SCENARIO_NAMES[:] = [s for s in SCENARIO_NAMES if s not in capped]
    env = Env()
    results = {p: {s: [] for s in SCENARIO_NAMES} for p in PROXIES}
    failed = []
    try:
        subprocess.run([sys.executable, os.path.join(LIB, "certs.py"), env.certs, *SNIS], check=True)
        start_upstream(env)
        procs = {}
        twins = any(logged(s) for s in SCENARIO_NAMES)
        for name in PROXIES:
            procs[name] = start_proxy(env, name)
            if twins and name != "floor":
                procs[key_of(name, True)] = start_proxy(env, name, logged=True)
        for key in procs:
            sanity(key.split("+")[0], PORTS[key])
        upstream_pids = tree(env.servers["upstream"].pid)
        total = ROUNDS * sum(1 for s in SCENARIO_NAMES for name in PROXIES if runs_in(name, s))
        log(f"{total} runs of {DURATION}s (+{WARMUP}s warm-up each): about "
            f"{total * (DURATION + WARMUP + 1) // 60 + 1} min")
        n = 0
        for rnd in range(ROUNDS):
            # The order rotates every round (A B C, B C A, C A B): back-to-back runs on this
            # machine showed the first of a pair ~15 % slower whichever binary it was, so a
            # fixed order would hand the same proxy the same handicap every round.
            order = PROXIES[rnd % len(PROXIES):] + PROXIES[:rnd % len(PROXIES)]
            for s in SCENARIO_NAMES:
                for name in order:
                    if not runs_in(name, s):
                        continue
                    n += 1
                    key = key_of(name, logged(s))
                    p = procs[key]
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} died (exit {p.returncode})")
                    cap = (cpu_cap(tree(p.pid), CAP_CORES, name) if SCENARIOS[s].get("cap")
                           else contextlib.nullcontext())
                    try:
                        with cap:
                            if WARMUP > 0 or SCENARIOS[s].get("count"):
                                run_scenario(s, PORTS[key], max(WARMUP, 1), env.tmp)
                            r = measured(name, lambda p=p: tree(p.pid), worker_pid(name, p),
                                         lambda: run_scenario(s, PORTS[key], DURATION, env.tmp),
                                         upstream_pids)
                    except RuntimeError as e:
                        failed.append(f"round {rnd + 1} {s} {name}: {e}")
                        log(f"[{n}/{total}] round {rnd + 1} {s} {name}: FAILED: {e}")
                        continue
                    r["round"] = rnd + 1
                    results[name][s].append(r)
                    log(f"[{n}/{total}] round {rnd + 1} {s:8} {name:8} {fmt(r['rps']):>8} req/s  "
                        f"p99 {fmt(r['p99_ms'])} ms  cpu {fmt(r['cpu_per_100k'])} s/100k  "
                        f"proxy {fmt(r['proxy_cpu_pct'])}%  up {fmt(r['upstream_cpu_pct'])}%  "
                        f"client {fmt(r['client_cpu_pct'])}%  err {r['non2xx'] + r['socket_errors']}")
                    if r.get("tool_output"):
                        log("load generator said:\n" + r["tool_output"])
        for name in PROXIES:
            nerr = os.path.join(env.tmp, name, "error.log")
            if os.path.exists(nerr):
                with open(nerr) as f:
                    buffered = sum(1 for line in f if "buffered to a temporary file" in line)
                if buffered:
                    log(f"{name}: {buffered} responses were buffered to temporary files")
        completeness = {key.split("+")[0]: log_complete(env, key, p)
                        for key, p in procs.items() if key.endswith("+log")}
        idle = idle_rss(env) if "portico" in PROXIES else None
    finally:
        env.close()

    os.makedirs(OUT, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = os.path.join(OUT, f"compare-{stamp}.json")
    with open(raw, "w") as f:
        json.dump({"machine": mach, "versions": vers, "results": results, "idle": idle, "failed": failed,
                   "log_lines": completeness,
                   "settings": {"rounds": ROUNDS, "duration": DURATION, "pin": PIN}}, f, indent=1)
    text = compare_report(command, start_load, vers, mach, results, idle, raw, failed)
    if completeness:
        text += "\n" + log_complete_report(completeness)
    print(text)
    write_section("compare", text)
    log(f"wrote {RESULTS} and {raw}")


LOG_CHECK_REQUESTS = env_int("LOG_CHECK_REQUESTS", 20000)


def access_log_lines(env, key):
    """Lines the logged twin `key` wrote for the benchmark's route so far."""
    path = env.path(key, "stdout.log" if key.startswith("haproxy") else "access.log")
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if b"/api/1k" in line)
    except FileNotFoundError:
        return 0


def log_complete(env, key, p):
    """Are the access log lines complete? After the runs (and a pause for writes in
    flight), exactly LOG_CHECK_REQUESTS requests with h2load (which counts exactly, where
    wrk leaves requests in flight uncounted), then the proxy is stopped (Portico: SIGINT,
    so the lines still in its buffers are the shutdown's to write): the log must have
    grown by exactly that many lines."""
    time.sleep(2)
    before = access_log_lines(env, key)
    out = subprocess.run(
        ["h2load", "--h1", "-t1", "-c16", "-m1", "-n", str(LOG_CHECK_REQUESTS),
         "-H", f":authority: {HOST}", f"http://127.0.0.1:{PORTS[key][0]}/api/1k"],
        capture_output=True, text=True, timeout=600).stdout
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    done = int(m.group(2)) if m else None
    stop(p)
    after = access_log_lines(env, key)
    log(f"{key}: {done} requests answered, {after - before} access log lines written")
    return {"requests": done, "lines": after - before}


def log_complete_report(completeness):
    out = ["### Access log lines (h1-1k-logged's proxies, after the runs)", "",
           f"`h2load --h1 -c16 -n {LOG_CHECK_REQUESTS}` to each logged proxy, then the proxy "
           "stopped at once (Portico: SIGINT; the lines still buffered are written at shutdown) "
           "and its log's new lines for the route counted.", "",
           "| proxy | requests answered | lines written | complete |", "|---|---:|---:|---|"]
    for name, c in completeness.items():
        ok = "yes" if c["requests"] is not None and c["requests"] == c["lines"] else "**no**"
        out.append(f"| {LABEL[name]} | {c['requests']} | {c['lines']} | {ok} |")
    out.append("")
    return "\n".join(out)


def cpu_split_report(results):
    """User and system CPU per request in the HTTP/1.1 scenarios, and what the HTTP/1.1 budget
    (CPU <= 0.8x NGINX's) leaves Portico for user space after its system time."""
    out = ["### User and system CPU, HTTP/1.1 (medians, s/100k)", "",
           "For 1 KiB responses the kernel's work per request (2 receives and 2 sends, 4 segments) "
           "is the same for every proxy, so system time is about equal and user time is where "
           "proxies differ; for 100 KiB ones the sizes of a proxy's reads and writes change its "
           "system time too.", "",
           "| scenario | proxy | user | sys | user+sys | user+sys / NGINX |",
           "|---|---|---:|---:|---:|---:|"]
    for s in SCENARIO_NAMES:
        if SCENARIOS[s]["tool"] != "wrk":
            continue
        base = med(results["nginx"][s], "cpu_per_100k")
        for name in PROXIES:
            runs = results[name][s]
            if runs_in(name, s) and runs:
                out.append(f"| {s} | {LABEL[name]} | {fmt(med(runs, 'user_per_100k'))} | "
                           f"{fmt(med(runs, 'sys_per_100k'))} | {fmt(med(runs, 'cpu_per_100k'))} | "
                           f"{ratio(med(runs, 'cpu_per_100k'), base)} |")
    out.append("")
    base_h1 = med(results["nginx"]["h1-1k"], "cpu_per_100k")
    if "portico" in PROXIES and results["portico"]["h1-1k"] and base_h1 is not None:
        budget = 0.8 * base_h1
        sys_p = med(results["portico"]["h1-1k"], "sys_per_100k")
        user_p = med(results["portico"]["h1-1k"], "user_per_100k")
        line = (f"h1-1k: 0.8x NGINX's CPU per request is {fmt(budget)} s/100k; after Portico's system "
                f"time ({fmt(sys_p)}) that leaves {fmt(budget - sys_p)} for user space, where Portico "
                f"spends {fmt(user_p)}")
        if "floor" in PROXIES and results["floor"]["h1-1k"]:
            line += f" and the floor {fmt(med(results['floor']['h1-1k'], 'user_per_100k'))}"
        out += [line + ".", ""]
    return out


def compare_report(command, start_load, vers, mach, results, idle, raw, failed):
    settings = [
        f"- settings: ROUNDS={ROUNDS}, DURATION={DURATION}s (+{WARMUP}s unmeasured warm-up per run), "
        f"SCENARIOS={','.join(SCENARIO_NAMES)}, PIN={'on: proxy on CPU 1, upstream + load generator on CPU 0' if PIN else 'off'}, "
        f"certificates {'ECDSA P-256' if CERT_KEY != 'rsa' else 'RSA 2048'}",
        f"- raw per-run numbers: `{os.path.relpath(raw, REPO)}` (not committed)",
    ]
    out = ["## Side by side: NGINX, HAProxy, Portico (one worker thread each)", "",
           header(command, start_load, vers, mach, settings), ""]
    out.append("Medians over rounds. Latency in ms. CPU = proxy user+sys seconds per 100 000 requests "
               "(all its processes); proxy % = CPU of the proxy during the run (100 % = one core busy); "
               "peak RSS = VmHWM of the serving process during the run; anon / file = the highest RssAnon "
               "(what the proxy allocated) and RssFile (its code and libraries mapped from disk) sampled every "
               "50 ms during the run; errors = non-2xx + socket errors, summed over rounds.")
    out.append("")
    for s in SCENARIO_NAMES:
        sc = SCENARIOS[s]
        unit = "handshakes/s (= req/s)" if s.startswith("tls-") else "req/s"
        out.append(f"### {s}: {sc['title']}")
        out.append("")
        tool = ("wrk -t1 -c%d" % sc["conns"]) if sc["tool"] == "wrk" else (
            f"h2load -t1 -c{sc['conns']} -m{sc['streams']}{' --h1' if sc['h1'] else ''}"
            + (CLOSE_FLAG if sc["close"] else "")
            + (f", {len(sc['snis'])} concurrent h2load processes, one per SNI name" if len(sc["snis"]) > 1 else ""))
        out.append(f"`{tool}`")
        out.append("")
        out.append(f"| proxy | {unit} | spread (min–max) | p50 | p99 | p99.9 | CPU s/100k | proxy % | peak RSS MiB | anon / file MiB | errors |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in PROXIES:
            runs = results[name][s]
            if not runs:
                continue
            rps = [r["rps"] for r in runs]
            errs = sum(r["non2xx"] + r["socket_errors"] for r in runs)
            out.append(f"| {LABEL[name]} | {fmt(med(runs, 'rps'))} | {fmt(min(rps))}–{fmt(max(rps))} | "
                       f"{fmt(med(runs, 'p50_ms'))} | {fmt(med(runs, 'p99_ms'))} | {fmt(med(runs, 'p999_ms'))} | "
                       f"{fmt(med(runs, 'cpu_per_100k'))} | {fmt(med(runs, 'proxy_cpu_pct'))} | "
                       f"{fmt(med(runs, 'peak_rss_mib'))} | "
                       f"{fmt(med(runs, 'peak_anon_mib'))} / {fmt(med(runs, 'peak_file_mib'))} | {errs} |")
        if sc.get("cap"):
            out.append("")
            out.append(f"Each proxy (all its processes) ran in a cgroup with a CFS quota of {CAP_CORES:g} "
                       f"core (10 ms periods), so that the proxy, not {sc['tool']}, limits the rate: "
                       f"{unit.split(' ')[0]} here is what the same CPU buys from each.")
        if s.startswith("tls-"):
            out.append("")
            out.append("Latency above is h2load's request time (request sent to response end on the new "
                       "connection, handshake excluded). Mean time to first byte from connection start "
                       "(TCP connect + TLS handshake + request): " + ", ".join(
                           f"{LABEL[n]} {fmt(med(results[n][s], 'ttfb_mean_ms'))} ms" for n in PROXIES
                           if runs_in(n, s)) + ".")
        out.append("")
    if "portico" in PROXIES and len(PROXIES) > 1:
        others = [p for p in PROXIES if p != "portico"]
        out.append("### Ratios, Portico / other (medians)")
        out.append("")
        out.append("req/s: above 1 is better for Portico; latency, CPU and RSS: below 1 is better for Portico.")
        out.append("")
        cols = ["req/s", "p99", "p99.9", "CPU/100k", "peak RSS", "anon"]
        keys = ["rps", "p99_ms", "p999_ms", "cpu_per_100k", "peak_rss_mib", "peak_anon_mib"]
        out.append("| scenario | " + " | ".join(f"{c} P/{LABEL[o][0]}" for c in cols for o in others) + " |")
        out.append("|---|" + "---:|" * (len(cols) * len(others)))
        for s in SCENARIO_NAMES:
            cells = []
            for k in keys:
                for o in others:
                    cells.append(ratio(med(results["portico"][s], k), med(results[o][s], k)))
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("(" + ", ".join(f"P/{LABEL[o][0]} = Portico/{LABEL[o].split(' ')[0]}" for o in others) + ")")
        out.append("")
    if "floor" in PROXIES and "nginx" in PROXIES:
        out.append("### The floor / NGINX (medians)")
        out.append("")
        out.append("`bench/floor`: a minimal HTTP/1.1 keep-alive proxy on tokio + httparse with the "
                   "benchmark's route hard-wired (no metrics, no pool, no header maps): about the least "
                   "user-space work a proxy can do per request, so its CPU ratio is about the best any "
                   "proxy can show against NGINX on this kernel path. In h1-100k it reads the whole "
                   "response into memory and writes it in one call, which no streaming proxy does: "
                   "read h1-1k.")
        out.append("")
        out.append("| scenario | req/s | p99 | CPU/100k |")
        out.append("|---|---:|---:|---:|")
        for s in SCENARIO_NAMES:
            if runs_in("floor", s):
                out.append(f"| {s} | " + " | ".join(
                    ratio(med(results["floor"][s], k), med(results["nginx"][s], k))
                    for k in ("rps", "p99_ms", "cpu_per_100k")) + " |")
        out.append("")
    if "nginx" in PROXIES and "h1-1k" in SCENARIO_NAMES and results["nginx"]["h1-1k"]:
        out += cpu_split_report(results)
    if failed:
        out.append("### Runs that failed (left out of the medians)")
        out.append("")
        out += [f"- {f}" for f in failed]
        out.append("")
    if idle:
        out.append("### Idle memory")
        out.append("")
        out.append(f"Portico on the default config `conf/portico.toml`, default threads (= {mach['nproc']} cores), "
                   f"2 s after it is ready: **VmRSS {fmt(idle['rss_mib'])} MiB**, {idle['threads']} threads. "
                   f"({idle['note']}.)")
        out.append("")
    out.append("### Per-round req/s")
    out.append("")
    out.append("| scenario | proxy | " + " | ".join(f"round {i + 1}" for i in range(ROUNDS)) + " |")
    out.append("|---|---|" + "---:|" * ROUNDS)
    for s in SCENARIO_NAMES:
        for name in PROXIES:
            if runs_in(name, s):
                out.append(f"| {s} | {LABEL[name]} | " + " | ".join(fmt(r["rps"]) for r in results[name][s]) + " |")
    out.append("")
    out.append("Other load on the CPUs during runs (median of the load generator's and the upstream's CPU %, "
               "which tells whether they, not the proxy, were the limit):")
    out.append("")
    out.append("| scenario | proxy | client % | upstream % |")
    out.append("|---|---|---:|---:|")
    for s in SCENARIO_NAMES:
        for name in PROXIES:
            runs = results[name][s]
            if not runs_in(name, s):
                continue
            out.append(f"| {s} | {LABEL[name]} | {fmt(med(runs, 'client_cpu_pct'))} | {fmt(med(runs, 'upstream_cpu_pct'))} |")
    out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------ scale

SCALE_HOSTS = [int(x) for x in os.environ.get("SCALE_HOSTS", "10 1000 10000").replace(",", " ").split()]
SCALE_CERTS = env_int("SCALE_CERTS", 1000)
SCALE_ROUTES = 10
RELOADS = env_int("RELOADS", 3)
# Hosts per include file: a reload re-parses and recompiles only the files that changed.
CHUNK = env_int("SCALE_CHUNK", 100)


def scale_ports(i):
    """HTTP and HTTPS ports and the admin port of the i-th table of SCALE_HOSTS. All tables
    run at once and are measured in turn, so that the machine's drift over the run does not
    land on one table (measured one after the other, the first table came out slower)."""
    if i == 0:
        return PORTS["scale"], PORTS["scale_admin"]
    b = PORT_BASE + 90 + 10 * i
    return (b, b + 1), b + 9


for _i in range(1, len(SCALE_HOSTS)):
    PORTS[f"scale{_i}"], PORTS[f"scale{_i}_admin"] = scale_ports(_i)


def scale_host(i, ncerts):
    k = i % ncerts
    return f"h{i}.c{k}.scale.example.com", k


def write_scale_config(d, nhosts, certdir, ports, marker=0):
    """main.toml (mesh, gateways, upstream) + vhosts-NNN.toml with 1 000 hosts each;
    `ports` as scale_ports gives them."""
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        if f.startswith("vhosts-"):
            os.unlink(os.path.join(d, f))
    ncerts = min(SCALE_CERTS, nhosts)
    (http_port, https_port), admin = ports
    up = PORTS["upstream"]
    by_cert = [[] for _ in range(ncerts)]
    for i in range(nhosts):
        h, k = scale_host(i, ncerts)
        by_cert[k].append(h)
    main = [f"""# Generated by bench/lib/bench.py (scale): {nhosts} hosts x {SCALE_ROUTES} routes, {ncerts} certificates.
include = ["vhosts-*.toml"]

[mesh]
admin = "127.0.0.1:{admin}"
accessLogFile = ""
# Reloads come from POST /reload only, so the reload under load is timed alone.
reloadPollInterval = "1h"

[[serviceEntries]]
name = "upstream"
hosts = ["upstream.bench"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = {up}, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1" }}]

[[gateways]]
name = "scale"
[[gateways.servers]]
port = {{ number = {http_port}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
"""]
    for k in range(ncerts):
        hosts = ", ".join(f'"{h}"' for h in by_cert[k])
        default = ", defaultCertificate = true" if k == 0 else ""
        main.append(f"""[[gateways.servers]]
port = {{ number = {https_port}, name = "https-{k}", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = [{hosts}]
tls = {{ mode = "SIMPLE", serverCertificate = "{certdir}/c{k}.crt", privateKey = "{certdir}/c{k}.key"{default} }}
""")
    with open(os.path.join(d, "main.toml.tmp"), "w") as f:
        f.write("\n".join(main))
    os.replace(os.path.join(d, "main.toml.tmp"), os.path.join(d, "main.toml"))
    for c0 in range(0, nhosts, CHUNK):
        write_chunk(d, nhosts, c0, marker)
    return os.path.join(d, "main.toml")


def write_chunk(d, nhosts, c0, marker):
    """One include file. `marker` changes one route of the last host (for the reload test)."""
    ncerts = min(SCALE_CERTS, nhosts)
    up = PORTS["upstream"]
    out = []
    for i in range(c0, min(c0 + CHUNK, nhosts)):
        h, _ = scale_host(i, ncerts)
        out.append(f'[[virtualServices]]\nname = "vh{i}"\nhosts = ["{h}"]\ngateways = ["scale"]\n')
        for j in range(SCALE_ROUTES):
            prefix = "/api/" if j == SCALE_ROUTES - 1 else f"/r{j}/"
            if j < SCALE_ROUTES - 1:
                value = f"{i}-{j}"
            else:
                value = str(marker) if (marker and i == nhosts - 1) else "1"
            out.append(f"""[[virtualServices.http]]
name = "r{j}"
match = [{{ uri = {{ prefix = "{prefix}" }} }}]
route = [{{ destination = {{ host = "upstream.bench", port = {{ number = {up} }} }} }}]
headers = {{ request = {{ set = {{ x-bench = "{value}" }} }} }}
""")
    name = os.path.join(d, f"vhosts-{c0 // CHUNK:03d}.toml")
    with open(name + ".tmp", "w") as f:
        f.write("\n".join(out))
    os.replace(name + ".tmp", name)


def post_reload(admin, timeout=600):
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=timeout)
    t0 = time.perf_counter()
    c.request("POST", "/reload")
    r = c.getresponse()
    body = r.read()
    dt = time.perf_counter() - t0
    c.close()
    return dt, r.status, body.decode(errors="replace")


# One table size of the scale run: its report row, its Portico, config dir, ports
# (as scale_ports gives them) and the first and last host of its table.
ScaleTable = collections.namedtuple("ScaleTable", "row proc dir ports first last")


def scale(command):
    start_load = loadavg()
    mach = machine()
    vers = {"portico": versions()["portico"], "wrk": versions()["wrk"], "h2load": versions()["h2load"]}
    env = Env()
    certdir = os.path.join(CACHE, f"scale-certs-{CERT_KEY}")
    ncerts_max = min(SCALE_CERTS, max(SCALE_HOSTS))
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(LIB, "certs.py"), "--scale", str(ncerts_max), certdir], check=True)
    cert_secs = time.time() - t0
    rows = []
    reload_res = None
    try:
        start_upstream(env)
        tables = []
        for i, nhosts in enumerate(SCALE_HOSTS):
            ports = scale_ports(i)
            d = env.path(f"scale-{nhosts}")
            t0 = time.time()
            cfg = write_scale_config(d, nhosts, certdir, ports)
            gen_secs = time.time() - t0
            size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            t0 = time.time()
            p = start([PORTICO, "run", "-c", cfg, "--threads", "1"], os.path.join(d, "stderr.log"), cpu=PROXY_CPU,
                      stop_sig=signal.SIGINT)
            wait_ready(ports[1], p, 900)
            start_secs = time.time() - t0
            for port in ports[0]:
                wait_port(port, proc=p)
            time.sleep(2)
            rss_idle = status_kib(p.pid, "VmRSS")
            first, _ = scale_host(0, min(SCALE_CERTS, nhosts))
            last, _ = scale_host(nhosts - 1, min(SCALE_CERTS, nhosts))
            for h in (first, last):
                st, hdrs, _ = http_get(ports[0][0], "/api/1k", h)
                if st != 200 or hdrs.get("x-got-bench") != "1":
                    raise RuntimeError(f"scale {nhosts}: {h} -> {st} {hdrs.get('x-got-bench')}")
            row = {"hosts": nhosts, "routes": nhosts * SCALE_ROUTES, "certs": min(SCALE_CERTS, nhosts),
                   "config_mb": size / 1e6, "gen_s": gen_secs, "start_s": start_secs,
                   "rss_idle_mib": rss_idle / 1024, "runs": {}}
            log(f"scale {nhosts} hosts: config {size / 1e6:.1f} MB, ready in {start_secs:.2f}s, RSS {rss_idle / 1024:.1f} MiB")
            rows.append(row)
            tables.append(ScaleTable(row, p, d, ports, first, last))
        # All tables serve at once (idle but for the one measured); each round measures every
        # table in turn, starting one table later than the round before.
        for rnd in range(ROUNDS):
            for s in ("h1-1k", "tls-new"):
                order = tables[rnd % len(tables):] + tables[:rnd % len(tables)]
                for t in order:
                    port = t.ports[0]
                    for which, h in (("first", t.first), ("last", t.last)):
                        if WARMUP > 0 or SCENARIOS[s].get("count"):
                            run_scenario(s, port, max(WARMUP, 1), env.tmp, host=h, snis=[h])
                        r = measured("portico", lambda: tree(t.proc.pid), t.proc.pid,
                                     lambda: run_scenario(s, port, DURATION, env.tmp, host=h, snis=[h]))
                        t.row["runs"].setdefault(f"{s}/{which}", []).append(r)
                        log(f"scale {t.row['hosts']} round {rnd + 1} {s} {which}: {r['rps']:,.0f} req/s "
                            f"p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms cpu {r['cpu_per_100k']:.2f} s/100k")
        for t in tables:
            t.row["rss_after_mib"] = status_kib(t.proc.pid, "VmRSS") / 1024
        t = max(tables, key=lambda t: t.row["hosts"])
        reload_res = reload_under_load(env, t.proc, t.dir, t.row["hosts"], t.ports)
        for t in tables:
            stop(t.proc)
            STARTED.remove(t.proc)
    finally:
        env.close()
    os.makedirs(OUT, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = os.path.join(OUT, f"scale-{stamp}.json")
    with open(raw, "w") as f:
        json.dump({"machine": mach, "versions": vers, "rows": rows, "reload": reload_res}, f, indent=1)
    text = scale_report(command, start_load, vers, mach, rows, reload_res, cert_secs, certdir, raw)
    print(text)
    write_section("scale", text)
    log(f"wrote {RESULTS} and {raw}")


def reload_under_load(env, p, d, nhosts, ports):
    """wrk on the last host while the config is rewritten (one route) and POST /reload'ed."""
    import threading

    (http_port, _), admin = ports
    last, _ = scale_host(nhosts - 1, min(SCALE_CERTS, nhosts))
    # The load lasts until 2 s after the last reload answered (SIGINT to wrk), at most
    # `cap` seconds; a reload of a big config can take longer than DURATION.
    cap = min(3600, max(DURATION, 4 + 3 * RELOADS) + 300 * RELOADS)
    lastchunk = ((nhosts - 1) // CHUNK) * CHUNK
    box = {}
    done = threading.Event()

    def load():
        try:
            box["wrk"] = run_wrk(http_port, "/api/1k", last, SCENARIOS["h1-1k"]["conns"], cap,
                                 stop=done)
        except Exception as e:  # noqa: BLE001
            box["error"] = str(e)

    # First one reload without load, as the baseline.
    write_chunk(d, nhosts, lastchunk, 999)
    c_idle = cpu_ticks(tree(p.pid))
    idle_s, idle_status, _ = post_reload(admin)
    idle_cpu = (cpu_ticks(tree(p.pid)) - c_idle) / CLK_TCK
    log(f"reload without load: {idle_s:.3f}s -> {idle_status}, {idle_cpu:.1f} CPU s")
    # main.toml changes (a comment): the mesh settings may have, so every route is compiled
    # again; the include files are not re-parsed (their text is the same).
    main = os.path.join(d, "main.toml")
    with open(main, "a") as f:
        f.write("\n# touched by the reload benchmark\n")
    time.sleep(0.1)
    c_full = cpu_ticks(tree(p.pid))
    full_s, full_status, _ = post_reload(admin)
    full_cpu = (cpu_ticks(tree(p.pid)) - c_full) / CLK_TCK
    log(f"reload after main.toml changed, without load: {full_s:.3f}s -> {full_status}, {full_cpu:.1f} CPU s")
    time.sleep(1)
    th = threading.Thread(target=load)
    c0 = cpu_ticks(tree(p.pid))
    t_start = time.perf_counter()
    th.start()
    time.sleep(2)
    reloads = []
    for n in range(RELOADS):
        if time.perf_counter() - t_start > cap - 30:
            log("reload under load: out of time, fewer reloads than RELOADS")
            break
        marker = 1000 + n
        t0 = time.perf_counter()
        write_chunk(d, nhosts, lastchunk, marker)
        write_s = time.perf_counter() - t0
        dt, status, body = post_reload(admin)
        applied = None
        try:
            _, hdrs, _ = http_get(http_port, "/api/1k", last)
            applied = hdrs.get("x-got-bench") == str(marker)
        except OSError:
            pass
        try:
            body = json.dumps(json.loads(body))
        except ValueError:
            body = body.strip()
        reloads.append({"seconds": dt, "status": status, "body": body, "write_s": write_s,
                        "applied": applied, "rss_mib": status_kib(p.pid, "VmRSS") / 1024})
        log(f"reload {n + 1}: {dt:.3f}s -> {status} {body} (new route live: {applied})")
        time.sleep(2)
    done.set()
    th.join(cap + 120)
    load_s = time.perf_counter() - t_start
    cpu = (cpu_ticks(tree(p.pid)) - c0) / CLK_TCK
    if "error" in box:
        raise RuntimeError(box["error"])
    return {"reloads": reloads, "wrk": box["wrk"], "load_s": load_s, "hosts": nhosts, "cpu_s": cpu,
            "idle_reload_s": idle_s, "idle_reload_cpu_s": idle_cpu, "idle_reload_status": idle_status,
            "full_reload_s": full_s, "full_reload_cpu_s": full_cpu, "full_reload_status": full_status,
            "hwm_mib": status_kib(p.pid, "VmHWM") / 1024}


def scale_report(command, start_load, vers, mach, rows, rl, cert_secs, certdir, raw):
    out = ["## Scale: Portico with many virtual hosts", "",
           header(command, start_load, vers, mach, [
               f"- settings: SCALE_HOSTS={' '.join(map(str, SCALE_HOSTS))}, {SCALE_ROUTES} routes per host "
               f"(9 `prefix /rN/` then `prefix /api/`, each sets a header; requests hit the 10th), "
               f"certificates: min(hosts, {SCALE_CERTS}) {'ECDSA P-256' if CERT_KEY != 'rsa' else 'RSA 2048'} "
               f"(cached in `{os.path.relpath(certdir, REPO)}`; this run spent {cert_secs:.1f}s on them), "
               f"ROUNDS={ROUNDS}, DURATION={DURATION}s, `--threads 1`, PIN={'on' if PIN else 'off'}; "
               "one Portico per size, all running, measured in turn with the order rotated each round",
               "- config: `main.toml` (mesh, gateway with one HTTPS server per certificate, upstream) + "
               f"`include` of `vhosts-NNN.toml`, {CHUNK:,} hosts each (`SCALE_CHUNK`); `reloadPollInterval = \"1h\"` so that only "
               "`POST /reload` reloads",
               f"- raw numbers: `{os.path.relpath(raw, REPO)}` (not committed)"]), ""]
    out.append("### Size, start-up and memory")
    out.append("")
    out.append("| hosts | routes | certs | config MB | ready after s | RSS idle MiB | RSS after load MiB | MiB per 1 000 hosts vs first row |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0] if rows else None
    for r in rows:
        per = "–"
        if base and r is not base and r["hosts"] != base["hosts"]:
            per = fmt((r["rss_idle_mib"] - base["rss_idle_mib"]) / (r["hosts"] - base["hosts"]) * 1000)
        out.append(f"| {r['hosts']:,} | {r['routes']:,} | {r['certs']:,} | {fmt(r['config_mb'])} | {fmt(r['start_s'])} | "
                   f"{fmt(r['rss_idle_mib'])} | {fmt(r['rss_after_mib'])} | {per} |")
    out.append("")
    if len(rows) >= 3:
        a, b = rows[-2], rows[-1]
        if a["certs"] == b["certs"] and b["hosts"] != a["hosts"]:
            out.append(f"Between {a['hosts']:,} and {b['hosts']:,} hosts (same {a['certs']:,} certificates): "
                       f"**{fmt((b['rss_idle_mib'] - a['rss_idle_mib']) * 1024 / (b['hosts'] - a['hosts']))} KiB per host** "
                       f"({SCALE_ROUTES} routes each).")
            out.append("")
    out.append("### Request cost: first vs last host of the table (medians)")
    out.append("")
    out.append("`h1-1k`: wrk, HTTP/1.1 keep-alive, Host = that host. `tls-new`: h2load, a new TLS 1.3 connection per "
               "request with SNI = that host (the certificate lookup is per handshake). req/s of tls-new = handshakes/s.")
    out.append("")
    out.append("| hosts | scenario | host | req/s | p50 ms | p99 ms | p99.9 ms | CPU s/100k | errors |")
    out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for key, runs in r["runs"].items():
            s, which = key.split("/")
            errs = sum(x["non2xx"] + x["socket_errors"] for x in runs)
            out.append(f"| {r['hosts']:,} | {s} | {which} | {fmt(med(runs, 'rps'))} | {fmt(med(runs, 'p50_ms'))} | "
                       f"{fmt(med(runs, 'p99_ms'))} | {fmt(med(runs, 'p999_ms'))} | {fmt(med(runs, 'cpu_per_100k'))} | {errs} |")
    out.append("")
    if rl:
        w = rl["wrk"]
        secs = [x["seconds"] for x in rl["reloads"]]
        out.append(f"### Reload of the {rl['hosts']:,}-host config under load")
        out.append("")
        out.append(f"wrk ({SCENARIOS['h1-1k']['conns']} connections, {rl['load_s']:.0f} s: from 2 s before the first reload "
                   f"to 2 s after the last) on the last host while, {len(rl['reloads'])} times, "
                   "the include file holding the last host is rewritten (the header value of its `/api/` route changes) "
                   "and `POST /reload` is sent; the time is from the POST to the `{\"generation\": N}` answer; "
                   "\"new route served\" = the next request carried the new header value upstream.")
        out.append("")
        out.append("| reload | seconds | answer | new route served | RSS after MiB |")
        out.append("|---:|---:|---|---|---:|")
        for i, x in enumerate(rl["reloads"]):
            out.append(f"| {i + 1} | {x['seconds']:.3f} | {x['status']} `{x['body']}` | {x['applied']} | {fmt(x['rss_mib'])} |")
        out.append("")
        out.append(f"- median reload time under load: **{statistics.median(secs):.3f} s**; the same reload "
                   f"without load just before: {rl['idle_reload_s']:.3f} s ({rl['idle_reload_cpu_s']:.1f} CPU s). With "
                   "`PIN=1` Portico's reload thread shares CPU 1 with its busy listener thread. "
                   f"A reload re-parses only the changed include file ({CHUNK:,} hosts) and recompiles only its "
                   "VirtualServices; when `main.toml` changes (a comment appended: its rules and mesh settings may "
                   "have changed, so every route and cluster is compiled again, the include files are not re-parsed) "
                   f"the reload took {rl['full_reload_s']:.3f} s without load ({rl['full_reload_cpu_s']:.1f} CPU s, "
                   f"answer {rl['full_reload_status']}); start-up, which parses everything, is in \"ready after\" above.")
        out.append(f"- during the load: {w['requests']:,} requests, {fmt(w['rps'])} req/s, p50 {fmt(w['p50_ms'])} ms, "
                   f"p99 {fmt(w['p99_ms'])} ms, p99.9 {fmt(w['p999_ms'])} ms, max {fmt(w['max_ms'])} ms")
        out.append(f"- **failed requests: {w['non2xx']} non-2xx, {w['socket_errors']} socket errors**")
        out.append(f"- Portico CPU during the run: {rl['cpu_s']:.2f} s; peak RSS since start {fmt(rl['hwm_mib'])} MiB")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------ policy: rate-limit cost

# (label, path, what it costs): the same upstream and route shape; the limits are too high
# for the load to reach, so every request is counted and allowed.
POLICY_ROUTES = [
    ("plain route", "/api/1k"),
    ("local limit", "/local/1k"),
    ("Redis limit (fixed window)", "/global/1k"),
    ("Redis limit (GCRA)", "/gcra/1k"),
]


def policy_config():
    http_port = PORTS["portico"][0]
    up = PORTS["upstream"]
    route = f'route = [{{ destination = {{ host = "upstream.bench", port = {{ number = {up} }} }} }}]'
    routes = ""
    for name in ("api", "local", "global", "gcra"):
        routes += f"""
[[virtualServices.http]]
name = "{name}"
match = [{{ uri = {{ prefix = "/{name}/" }} }}]
{route}
headers = {{ request = {{ set = {{ x-bench = "1" }} }} }}
"""
    return f"""# Generated by bench/lib/bench.py (policy): a plain route and rate-limited ones.
[mesh]
admin = "127.0.0.1:{PORTS['portico_admin']}"
accessLogFile = ""
[mesh.redis]
url = "redis://127.0.0.1:{PORTS['redis']}/0"
timeout = "100ms"

[[gateways]]
name = "bench"
[[gateways.servers]]
port = {{ number = {http_port}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["{HOST}"]

[[virtualServices]]
name = "bench"
hosts = ["{HOST}"]
gateways = ["bench"]
{routes}
# Per client address (the load comes from one): counted, never reached.
[[rateLimits]]
name = "local"
targetRefs = [{{ kind = "VirtualService", name = "bench", sectionName = "local" }}]
[[rateLimits.local.rules]]
clientSelectors = [{{ sourceCIDR = {{ type = "Distinct", value = "0.0.0.0/0" }} }}]
limit = {{ requests = 1000000000, unit = "Second" }}

[[rateLimits]]
name = "global"
targetRefs = [{{ kind = "VirtualService", name = "bench", sectionName = "global" }}]
[[rateLimits.global.rules]]
clientSelectors = [{{ sourceCIDR = {{ type = "Distinct", value = "0.0.0.0/0" }} }}]
limit = {{ requests = 4000000000, unit = "Hour" }}

[[rateLimits]]
name = "gcra"
targetRefs = [{{ kind = "VirtualService", name = "bench", sectionName = "gcra" }}]
[[rateLimits.global.rules]]
clientSelectors = [{{ sourceCIDR = {{ type = "Distinct", value = "0.0.0.0/0" }} }}]
limit = {{ requests = 1000000000, unit = "Second" }}
rateLimitAlgorithm = "GCRA"

[[serviceEntries]]
name = "upstream"
hosts = ["upstream.bench"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = {up}, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1" }}]
"""


def policy(command):
    start_load = loadavg()
    mach = machine()
    vers = versions()
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    vers["redis"] = subprocess.run([redis_bin, "--version"], capture_output=True, text=True).stdout.split(" sha=")[0].strip()
    env = Env()
    results = {label: [] for label, _ in POLICY_ROUTES}
    conns = SCENARIOS["h1-1k"]["conns"]
    http_port = PORTS["portico"][0]
    try:
        start_upstream(env)
        redis = start([redis_bin, "--port", str(PORTS["redis"]), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no", "--daemonize", "no"],
                      env.path("redis.log"), cpu=OTHER_CPU)
        wait_port(PORTS["redis"], proc=redis)
        p = start_portico(env, policy_config(), ports=(http_port,))
        for label, path in POLICY_ROUTES:
            st, hdrs, body = http_get(http_port, path, HOST)
            limited = path != "/api/1k"
            if st != 200 or len(body) != 1024 or (limited and "ratelimit-limit" not in hdrs):
                raise RuntimeError(f"{label}: GET {path}: {st}, {len(body)} bytes, fields {hdrs}")
        upstream_pids = tree(env.servers["upstream"].pid)
        total = ROUNDS * len(POLICY_ROUTES)
        log(f"{total} runs of {DURATION}s (+{WARMUP}s warm-up each)")
        n = 0
        for rnd in range(ROUNDS):
            order = POLICY_ROUTES[rnd % len(POLICY_ROUTES):] + POLICY_ROUTES[:rnd % len(POLICY_ROUTES)]
            for label, path in order:
                n += 1
                if WARMUP > 0:
                    run_wrk(http_port, path, HOST, conns, WARMUP)
                r0 = cpu_ticks([redis.pid])
                r = measured(label, lambda: tree(p.pid), p.pid,
                             lambda: run_wrk(http_port, path, HOST, conns, DURATION),
                             upstream_pids)
                redis_cpu = (cpu_ticks([redis.pid]) - r0) / CLK_TCK
                r["redis_per_100k"] = redis_cpu / r["requests"] * 1e5 if r["requests"] else None
                r["round"] = rnd + 1
                results[label].append(r)
                log(f"[{n}/{total}] {label:28} {fmt(r['rps']):>8} req/s  p99 {fmt(r['p99_ms'])} ms  "
                    f"cpu {fmt(r['cpu_per_100k'])} s/100k  redis {fmt(r['redis_per_100k'])} s/100k  "
                    f"err {r['non2xx'] + r['socket_errors']}")
        metrics = http_get(PORTS["portico_admin"], "/metrics", "127.0.0.1")[2].decode()
        decisions = collections.Counter()
        for m in re.finditer(r'^portico_ratelimit_decisions_total\{[^}]*decision="(\w+)"[^}]*\} (\S+)$',
                             metrics, re.M):
            decisions[m.group(1)] += float(m.group(2))
    finally:
        env.close()
    os.makedirs(OUT, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = os.path.join(OUT, f"policy-{stamp}.json")
    with open(raw, "w") as f:
        json.dump({"machine": mach, "versions": vers, "results": results, "decisions": decisions,
                   "settings": {"rounds": ROUNDS, "duration": DURATION, "pin": PIN}}, f, indent=1)
    base = med(results["plain route"], "cpu_per_100k")
    rows = ["| route | req/s | Portico CPU s / 100k req | vs plain | user | sys | Redis CPU s / 100k req | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, _ in POLICY_ROUTES:
        runs = results[label]
        cpu = med(runs, "cpu_per_100k")
        errors = sum(r["non2xx"] + r["socket_errors"] for r in runs)
        rows.append(f"| {label} | {fmt(med(runs, 'rps'))} | {fmt(cpu)} | {ratio(cpu, base)} | "
                    f"{fmt(med(runs, 'user_per_100k'))} | {fmt(med(runs, 'sys_per_100k'))} | "
                    f"{fmt(med(runs, 'redis_per_100k')) if label.startswith('Redis') else '–'} | "
                    f"{fmt(med(runs, 'p99_ms'))} | {errors} |")
    extra = [
        f"- load: wrk, {conns} connections, HTTP/1.1 keep-alive, 1 KiB answers (as `h1-1k`), "
        f"Portico with `--threads 1`{' on CPU 1, wrk + upstream + redis-server on CPU 0' if PIN else ''}; "
        f"{ROUNDS} rounds x {DURATION} s per route, medians; order rotating",
        "- every route forwards to the same nginx upstream; the limits are too high to be reached, "
        "so every request is counted and allowed (one key: the load comes from one address)",
        f"- rate-limit decisions counted: {', '.join(f'{k} {int(v):,}' for k, v in sorted(decisions.items())) or 'none'}",
        f"- raw per-run numbers: `{os.path.relpath(raw, REPO)}` (not committed)",
    ]
    text = "## Rate-limit cost (policy)\n\n" + header(command, start_load, vers, mach, extra) + "\n\n" + "\n".join(rows)
    print(text)
    write_section("policy", text)
    log(f"wrote {RESULTS} and {raw}")


# ------------------------------------------------------------------ features: route kinds

# (label, path, instance, status): every kind of route a config uses, on the same upstream.
# `traced` runs on a second Portico whose tracing samples 10 % and exports to a collector
# stub on loopback (tracing is mesh-wide, so it cannot be one route of the first).
FEATURE_ROUTES = [
    ("plain forward", "/api/1k", "portico", 200),
    ("rewrite (uri and authority)", "/rw/1k", "portico", 200),
    ("redirect (301)", "/redirect/1k", "portico", 301),
    ("direct response (1 KiB)", "/direct/1k", "portico", 200),
    ("fault (abort 1 %)", "/fault/1k", "portico", 200),
    ("timeout (5 s)", "/timeout/1k", "portico", 200),
    ("traced (10 % sampled, OTLP)", "/api/1k", "portico+trace", 200),
]


def features_config(traced):
    name = "portico+trace" if traced else "portico"
    http_port = PORTS[name][0]
    admin = PORTS[name + "_admin"]
    up = PORTS["upstream"]
    dest = f'route = [{{ destination = {{ host = "upstream.bench", port = {{ number = {up} }} }} }}]'
    body = "x" * 1023 + "\\n"
    tracing = ""
    if traced:
        tracing = f"""defaultConfig = {{ tracing = {{ sampling = 10.0 }} }}
extensionProviders = [{{ name = "otel", opentelemetry = {{ service = "127.0.0.1", port = {PORTS['collector']}, http = {{ path = "/v1/traces" }} }} }}]
"""
    return f"""# Generated by bench/lib/bench.py (features): one route of each kind.
[mesh]
admin = "127.0.0.1:{admin}"
accessLogFile = ""
{tracing}
[[gateways]]
name = "bench"
[[gateways.servers]]
port = {{ number = {http_port}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["{HOST}"]

[[virtualServices]]
name = "bench"
hosts = ["{HOST}"]
gateways = ["bench"]

[[virtualServices.http]]
name = "rewrite"
match = [{{ uri = {{ prefix = "/rw/" }} }}]
rewrite = {{ uri = "/api/", authority = "upstream.bench" }}
{dest}

[[virtualServices.http]]
name = "redirect"
match = [{{ uri = {{ prefix = "/redirect/" }} }}]
redirect = {{ uri = "/api/1k", redirectCode = 301 }}

[[virtualServices.http]]
name = "direct"
match = [{{ uri = {{ prefix = "/direct/" }} }}]
directResponse = {{ status = 200, body = {{ string = "{body}" }} }}

[[virtualServices.http]]
name = "fault"
match = [{{ uri = {{ prefix = "/fault/" }} }}]
fault = {{ abort = {{ httpStatus = 503, percentage = {{ value = 1.0 }} }} }}
{dest}

[[virtualServices.http]]
name = "timeout"
match = [{{ uri = {{ prefix = "/timeout/" }} }}]
timeout = "5s"
{dest}

[[virtualServices.http]]
name = "plain"
{dest}

[[serviceEntries]]
name = "upstream"
hosts = ["upstream.bench"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = {up}, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1" }}]
"""


def start_collector(env):
    """An OTLP/HTTP collector stub: answers every POST with 200 and counts the spans it got
    (GET answers the count)."""
    code = (
        "import http.server, sys\n"
        "spans = 0\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        b = str(spans).encode()\n"
        "        self.send_response(200); self.send_header('content-length', str(len(b))); self.end_headers()\n"
        "        self.wfile.write(b)\n"
        "    def do_POST(self):\n"
        "        global spans\n"
        "        n = int(self.headers.get('content-length') or 0)\n"
        "        spans += self.rfile.read(n).count(b'\"spanId\"')\n"
        "        self.send_response(200); self.send_header('content-length', '2'); self.end_headers()\n"
        "        self.wfile.write(b'{}')\n"
        "    def log_message(self, *a): pass\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    p = start([sys.executable, "-c", code, str(PORTS["collector"])], env.path("collector.log"),
              cpu=OTHER_CPU)
    wait_port(PORTS["collector"], proc=p)
    return p


def metric_sum(admin_port, name):
    text = http_get(admin_port, "/metrics", "127.0.0.1")[2].decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def features(command):
    start_load = loadavg()
    mach = machine()
    vers = versions()
    env = Env()
    results = {label: [] for label, *_ in FEATURE_ROUTES}
    conns = SCENARIOS["h1-1k"]["conns"]
    try:
        start_upstream(env)
        start_collector(env)
        procs = {}
        for name, traced in (("portico", False), ("portico+trace", True)):
            procs[name] = start_portico(env, features_config(traced), name=name,
                                        ports=(PORTS[name][0],), admin=PORTS[name + "_admin"])
        for label, path, name, want in FEATURE_ROUTES:
            st, hdrs, body = http_get(PORTS[name][0], path, HOST)
            if st != want or (want == 200 and len(body) != 1024):
                raise RuntimeError(f"{label}: GET {path}: {st} (want {want}), {len(body)} bytes")
        upstream_pids = tree(env.servers["upstream"].pid)
        total = ROUNDS * len(FEATURE_ROUTES)
        log(f"{total} runs of {DURATION}s (+{WARMUP}s warm-up each)")
        n = 0
        for rnd in range(ROUNDS):
            k = rnd % len(FEATURE_ROUTES)
            for label, path, name, want in FEATURE_ROUTES[k:] + FEATURE_ROUTES[:k]:
                n += 1
                port, admin, p = PORTS[name][0], PORTS[name + "_admin"], procs[name]
                if WARMUP > 0:
                    run_wrk(port, path, HOST, conns, WARMUP)
                fast0 = metric_sum(admin, "portico_fast_path_requests_total")
                r = measured(label, lambda: tree(p.pid), p.pid,
                             lambda: run_wrk(port, path, HOST, conns, DURATION), upstream_pids)
                fast = metric_sum(admin, "portico_fast_path_requests_total") - fast0
                r["fast_share"] = fast / r["requests"] if r["requests"] else None
                r["round"] = rnd + 1
                results[label].append(r)
                log(f"[{n}/{total}] {label:30} {fmt(r['rps']):>8} req/s  p99 {fmt(r['p99_ms'])} ms  "
                    f"cpu {fmt(r['cpu_per_100k'])} s/100k  fast {fmt(100 * (r['fast_share'] or 0))} %  "
                    f"non-2xx {r['non2xx']}  errors {r['socket_errors']}")
        time.sleep(1)  # the exporter sends a batch at least every 500 ms
        spans = int(http_get(PORTS["collector"], "/", "127.0.0.1")[2])
        traced = sum(r["requests"] for r in results["traced (10 % sampled, OTLP)"])
        dropped = metric_sum(PORTS["portico+trace_admin"], "portico_trace_spans_dropped_total")
    finally:
        env.close()
    os.makedirs(OUT, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = os.path.join(OUT, f"features-{stamp}.json")
    with open(raw, "w") as f:
        json.dump({"machine": mach, "versions": vers, "results": results,
                   "settings": {"rounds": ROUNDS, "duration": DURATION, "pin": PIN}}, f, indent=1)
    base = med(results["plain forward"], "cpu_per_100k")
    rows = ["| route | status | req/s | CPU s / 100k req | vs plain (goal <= 1.1x) | user | sys | on the fast codecs | p99 ms | socket errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, _, _, want in FEATURE_ROUTES:
        runs = results[label]
        cpu = med(runs, "cpu_per_100k")
        share = med(runs, "fast_share")
        rows.append(f"| {label} | {want} | {fmt(med(runs, 'rps'))} | {fmt(cpu)} | {ratio(cpu, base)} | "
                    f"{fmt(med(runs, 'user_per_100k'))} | {fmt(med(runs, 'sys_per_100k'))} | "
                    f"{fmt(100 * share) + ' %' if share is not None else '–'} | "
                    f"{fmt(med(runs, 'p99_ms'))} | {sum(r['socket_errors'] for r in runs)} |")
    extra = [
        f"- load: wrk, {conns} connections, HTTP/1.1 keep-alive, 1 KiB answers (as `h1-1k`), "
        f"Portico with `--threads 1`, access log off{' on CPU 1, wrk + upstream + collector stub on CPU 0' if PIN else ''}; "
        f"{ROUNDS} rounds x {DURATION} s per route, medians; order rotating",
        "- one Portico serves the plain, rewrite, redirect, direct-response, fault and timeout routes; "
        "a second, the same config with tracing at 10 % to an OTLP/HTTP collector stub (Python, loopback), the traced row",
        f"- spans the collector stub received: {spans:,} ({fmt(100 * spans / traced) if traced else '-'} % "
        f"of the traced row's measured requests; its warm-ups and checks add some), dropped "
        f"{int(dropped):,}; \"on the fast codecs\" is "
        "`portico_fast_path_requests_total` over the requests of the run",
        f"- raw per-run numbers: `{os.path.relpath(raw, REPO)}` (not committed)",
    ]
    text = "## Route kinds (features)\n\n" + header(command, start_load, vers, mach, extra) + "\n\n" + "\n".join(rows)
    print(text)
    write_section("features", text)
    log(f"wrote {RESULTS} and {raw}")


# ------------------------------------------------------------------ main


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "compare"
    command = os.environ.get("BENCH_COMMAND", " ".join(sys.argv))

    def on_signal(sig, _frame):
        cleanup()
        sys.exit(128 + sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    global PORTICO
    snapshot = None
    try:
        if not os.access(PORTICO, os.X_OK):
            raise SystemExit(f"no portico binary at {PORTICO} (cargo build --release, or set PORTICO_BIN)")
        # Others may rebuild target/release/portico while this runs: use a private copy.
        versions_note = portico_build_note()
        snapshot = tempfile.mkdtemp(prefix="portico-bench-bin-")
        shutil.copy2(PORTICO, os.path.join(snapshot, "portico"))
        PORTICO = os.path.join(snapshot, "portico")
        global BUILD_NOTE
        BUILD_NOTE = versions_note
        if what == "compare":
            compare(command)
        elif what == "scale":
            scale(command)
        elif what == "instructions":
            instructions(command)
        elif what == "policy":
            policy(command)
        elif what == "features":
            features(command)
        elif what == "conns":
            import conns
            conns.conns(command)
        elif what == "idle":
            env = Env()
            try:
                r = idle_rss(env)
            finally:
                env.close()
            print(f"Portico idle on conf/portico.toml: VmRSS {r['rss_mib']:.1f} MiB, {r['threads']} threads ({r['note']})")
        else:
            raise SystemExit(f"unknown command {what!r}: compare, scale, idle, instructions, policy, features or conns")
    finally:
        cleanup()
        if snapshot:
            shutil.rmtree(snapshot, ignore_errors=True)


if __name__ == "__main__":
    main()
