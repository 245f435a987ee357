#!/usr/bin/env python3
"""What an idle keep-alive connection's memory is made of (#28): a heap profile of Portico
holding N idle connections of one kind.

    PORTICO_BIN=<a --features dhat-heap build> heap_conns.py KIND N OUTDIR

KIND is plain, tls or h2 (as `bench/run.sh conns`). This starts a small upstream (in this
process), Portico on the bench route (`--threads 1`) with its heap profile going to
OUTDIR/dhat-KIND-N.json, opens N connections that each send one request and read the
whole answer (conns.py's client), waits for the RSS to settle, then stops Portico with
SIGINT: the profile is written at exit, and its peak ("t-gmax") is the N idle
connections. Summarise it with `dhat_sites.py OUTDIR/dhat-KIND-N.json --per N`.
The RSS before and with the connections is printed too (a dhat build's RSS includes
dhat's own records: read it for the difference between runs, not as the real figure).
"""

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time

LIB = os.path.dirname(os.path.abspath(__file__))
HOST = "bench.example.com"
SNIS = ["bench1.example.com"]


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v else default


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


sys.path.insert(0, LIB)
import conns  # noqa: E402  (reads HOST, SNIS, env_int, status_kib from this module)


class Up(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b"x" * 1024

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(self.body)))
        self.send_header("x-got-bench", self.headers.get("x-bench", ""))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def main():
    kind, n, out = sys.argv[1], int(sys.argv[2]), os.path.abspath(sys.argv[3])
    os.makedirs(out, exist_ok=True)
    binary = os.environ["PORTICO_BIN"]
    certs = os.path.join(out, "certs")
    subprocess.run([sys.executable, os.path.join(LIB, "certs.py"), certs, *SNIS], check=True,
                   stdout=subprocess.DEVNULL)
    up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Up)
    up.daemon_threads = True
    threading.Thread(target=up.serve_forever, daemon=True).start()
    http_port, https_port, admin = free_port(), free_port(), free_port()
    cfg = os.path.join(out, "heap-conns.toml")
    with open(cfg, "w") as f:
        f.write(f"""[mesh]
admin = "127.0.0.1:{admin}"

[mesh.downstream]
# A dhat build is slow to open thousands of connections: none may time out meanwhile.
idleTimeout = "600s"

[[gateways]]
name = "bench"
[[gateways.servers]]
port = {{ number = {http_port}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["{HOST}"]
[[gateways.servers]]
port = {{ number = {https_port}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["{HOST}", "{SNIS[0]}"]
tls = {{ mode = "SIMPLE", serverCertificate = "{certs}/{SNIS[0]}.crt", privateKey = "{certs}/{SNIS[0]}.key", minProtocolVersion = "TLSV1_3" }}

[[virtualServices]]
name = "bench"
hosts = ["{HOST}"]
gateways = ["bench"]
[[virtualServices.http]]
name = "api"
match = [{{ uri = {{ prefix = "/api/" }} }}]
route = [{{ destination = {{ host = "upstream.bench", port = {{ number = {up.server_port} }} }} }}]
headers = {{ request = {{ set = {{ x-bench = "1" }} }} }}

[[serviceEntries]]
name = "upstream"
hosts = ["upstream.bench"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = {up.server_port}, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1" }}]
""")
    profile = os.path.join(out, f"dhat-{kind}-{n}.json")
    env = dict(os.environ, DHAT_FILE=profile)
    log = open(os.path.join(out, f"portico-{kind}-{n}.log"), "wb")
    p = subprocess.Popen([binary, "run", "-c", cfg, "--threads", "1"], env=env, stdout=log,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        end = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                if p.poll() is not None or time.time() > end:
                    raise RuntimeError("portico did not start; see the log in " + out)
                time.sleep(0.1)
        port = http_port if kind == "plain" else https_port
        ctx = conns.tls_context(["h2"] if kind == "h2" else ["http/1.1"])
        for j in range(20):
            conns.open_one(kind, port, j, ctx).close()
        before = conns.settle(p.pid)
        held = [conns.open_one(kind, port, i, ctx) for i in range(n)]
        after = conns.settle(p.pid)
        print(f"{kind}: {n} idle connections, RSS {before} -> {after} KiB, "
              f"{(after - before) / n:.2f} KiB each (dhat build)")
        p.send_signal(signal.SIGINT)
        p.wait(120)
        for s in held:
            s.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    print(f"profile: {profile} ({os.path.getsize(profile) if os.path.exists(profile) else 0} bytes)")


if __name__ == "__main__":
    main()
