"""`bench/run.sh conns`: memory held per idle connection, and a fresh request's latency
while they are held, for each proxy (NGINX, HAProxy, Portico: one worker each, the
`compare` configs).

For each proxy and each kind of connection (plain HTTP/1.1, HTTP/1.1 over TLS 1.3, h2 over
TLS), this opens N client connections, sends one request on each and reads its whole
answer, then leaves them open and idle. The serving process's RSS (NGINX: its worker)
before and after, divided by N, is the cost of an idle connection. While they are held,
`PROBES` requests each on a fresh connection give the latency a new client sees (p50 and
p99). Then the connections close (RSS after the close is shown: what the process keeps),
and the process stops: each row has a fresh one.

The client is this Python process (blocking sockets, one connection at a time; up to
`CONNS_PER_SOURCE` per 127.0.0.x source address, so the kernel's ephemeral ports last).
Each process here is limited by RLIMIT_NOFILE (`ulimit -Hn`): the proxies need one
descriptor per client connection (plus their upstream ones), so N is capped below it.
"""

import os
import resource
import socket
import ssl
import statistics
import struct
import time

import sys

# bench.py runs as __main__ and imports this module: its globals (the binary's path, the
# processes started) are that module's, not a second copy's.
b = sys.modules["__main__"]

ALL_KINDS = ["plain", "tls", "h2", "ws"]
KINDS = [k for k in os.environ.get("CONN_KINDS", ",".join(ALL_KINDS)).split(",") if k]
CONNS_PER_SOURCE = 20000


def wanted(kind):
    default = {"plain": 10000, "tls": 5000, "h2": 5000, "ws": 5000}[kind]
    return b.env_int(f"CONNS_{kind.upper()}", default)


def fd_room():
    """Connections a proxy can hold here: its descriptor limit, less some for its own use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200


# Linux's IP_BIND_ADDRESS_NO_PORT (not in Python's socket module).
IP_BIND_ADDRESS_NO_PORT = 24


def source(i):
    return f"127.0.0.{1 + i // CONNS_PER_SOURCE}"


def request(host):
    return (f"GET /api/1k HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench-conns\r\n\r\n").encode()


def upgrade(host):
    return (f"GET /ws/echo HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


# One masked WebSocket text frame, "ping" (the echo upstream sends the bytes back as they
# came: the proxies do not read frames).
WS_FRAME = bytes([0x81, 0x84, 1, 2, 3, 4]) + bytes(c ^ m for c, m in zip(b"ping", b"\x01\x02\x03\x04"))


def open_tunnel(s):
    """Upgrades a fresh connection and sends one frame through the tunnel, both ways."""
    s.sendall(upgrade(b.HOST))
    status, _, rest = read_head(s)
    if status != 101:
        raise RuntimeError(f"status {status}, not 101")
    s.sendall(WS_FRAME)
    while len(rest) < len(WS_FRAME):
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("tunnel closed before the echo")
        rest += chunk
    if rest != WS_FRAME:
        raise RuntimeError(f"echo {rest!r}")


def read_head(s):
    """Reads an HTTP/1.1 response head: its status, its lines, and what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError(f"closed before the head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    return int(lines[0].split()[1]), lines, rest


def read_h1(s):
    """Reads one HTTP/1.1 answer with a Content-Length body; returns its status."""
    status, lines, body = read_head(s)
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("closed in the body")
        body += chunk
    return status


# h2: the preface, an empty SETTINGS, and one HEADERS frame (END_STREAM, END_HEADERS) for
# GET https://<host>/api/1k, in HPACK without Huffman: indexed :method GET (2), :scheme
# https (7), then :path and :authority as literals without indexing (name indices 4, 1).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(index, value):
    v = value.encode()
    assert len(v) < 127
    return bytes([index]) + bytes([len(v)]) + v  # 0000xxxx: literal without indexing, name index < 15


# Streams each h2 connection opens at once before it goes idle (H2_STREAMS): 1 by default;
# more is a browser loading a page, whose connection then rests with whatever its busiest
# moment left allocated.
H2_STREAMS = b.env_int("H2_STREAMS", 1)


def h2_request(host):
    block = bytes([0x82, 0x87]) + hpack_literal(4, "/api/1k") + hpack_literal(1, host)
    frames = b"".join(h2_frame(1, 0x5, 2 * i + 1, block) for i in range(H2_STREAMS))
    # The connection's window opened to 16 MiB: the answers of many streams fit in it.
    window = h2_frame(8, 0, 0, struct.pack(">I", (1 << 24) - 65535))
    return H2_PREFACE + h2_frame(4, 0, 0, b"") + window + frames


def read_h2(s):
    """Reads frames until every stream ends (acknowledging the server's SETTINGS); returns
    the number of DATA bytes."""
    buf = b""
    data = 0
    open_streams = H2_STREAMS
    while True:
        while len(buf) < 9:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("h2: closed")
            buf += chunk
        length = int.from_bytes(buf[:3], "big")
        kind, flags = buf[3], buf[4]
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        while len(buf) < 9 + length:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("h2: closed in a frame")
            buf += chunk
        buf = buf[9 + length:]
        if kind == 4 and not flags & 1:
            s.sendall(h2_frame(4, 1, 0, b""))
        elif kind == 7:
            raise RuntimeError("h2: GOAWAY")
        elif kind == 3 and stream != 0:
            raise RuntimeError("h2: RST_STREAM")
        if kind == 0 and stream != 0:
            data += length
        if stream != 0 and kind in (0, 1) and flags & 1:
            open_streams -= 1
            if open_streams == 0:
                return data


def tls_context(alpn):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx


def open_one(kind, port, i, ctx):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The source port is chosen at connect(), for this destination: bound at bind() time
    # it must be free for every destination, and the previous rows' connections, in
    # TIME_WAIT for a minute, used up the ephemeral range ("Address already in use").
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((source(i), 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if kind == "ws":
        open_tunnel(s)
        return s
    if kind == "plain":
        s.sendall(request(b.HOST))
        status = read_h1(s)
        if status != 200:
            raise RuntimeError(f"status {status}")
        return s
    s = ctx.wrap_socket(s, server_hostname=b.SNIS[0])
    if kind == "tls":
        s.sendall(request(b.HOST))
        status = read_h1(s)
        if status != 200:
            raise RuntimeError(f"status {status}")
    else:
        if s.selected_alpn_protocol() != "h2":
            raise RuntimeError(f"ALPN {s.selected_alpn_protocol()!r}, not h2")
        s.sendall(h2_request(b.HOST))
        n = read_h2(s)
        if n != 1024 * H2_STREAMS:
            raise RuntimeError(f"h2: {n} body bytes")
    return s


def rss_kib(pid):
    return b.status_kib(pid, "VmRSS") or 0


def settle(pid):
    """RSS once it has stopped moving (the proxy may still be freeing or touching pages)."""
    last = rss_kib(pid)
    for _ in range(20):
        time.sleep(0.25)
        now = rss_kib(pid)
        if abs(now - last) < 64:
            return now
        last = now
    return last


def probe(kind, port, ctx, n):
    times = []
    for j in range(n):
        t0 = time.perf_counter()
        s = open_one(kind, port, j, ctx)
        times.append((time.perf_counter() - t0) * 1000)
        s.close()
    times.sort()
    return statistics.median(times), b.pct(times, 99)


def measure(name, proc, kind, n):
    port = b.PORTS[name][0 if kind in ("plain", "ws") else 1]
    ctx = tls_context(["h2"] if kind == "h2" else ["http/1.1"])
    pid = b.worker_pid(name, proc)
    # Warm the process (first handshakes, pools, buffers) so `before` is a serving process.
    for j in range(20):
        open_one(kind, port, j, ctx).close()
    before = settle(pid)
    held = []
    t0 = time.time()
    try:
        for i in range(n):
            held.append(open_one(kind, port, i, ctx))
        opened = time.time() - t0
        after = settle(pid)
        p50, p99 = probe(kind, port, ctx, b.env_int("PROBES", 200))
        alive = 0
        for s in held[:: max(1, len(held) // 200)]:
            # Still open: a non-blocking recv finds no data and no EOF.
            s.setblocking(False)
            try:
                alive += 0 if s.recv(1) == b"" else 1
            except (BlockingIOError, ssl.SSLWantReadError):
                alive += 1
            except OSError:
                pass
            s.setblocking(True)
        sampled = len(held[:: max(1, len(held) // 200)])
    finally:
        for s in held:
            try:
                s.close()
            except OSError:
                pass
    released = settle(pid)
    return {
        "conns": n, "before_kib": before, "after_kib": after, "released_kib": released,
        "per_conn_kib": (after - before) / n, "open_s": opened, "p50_ms": p50, "p99_ms": p99,
        "alive": f"{alive}/{sampled}",
    }


def active_conns(room):
    """Connections for the active rows: `ACTIVE_CONNS` (10 000), fewer when a proxy's
    descriptors would not hold the clients and as many upstream connections."""
    return min(b.env_int("ACTIVE_CONNS", 10000), room // 2 - 500)


def active(name, proc, kind, n, tmp):
    """N connections all sending requests back to back for ACTIVE_SECS: req/s, p50/p99,
    errors, and the serving process's peak RSS while they ran."""
    pid = b.worker_pid(name, proc)
    b.reset_hwm(pid)
    before = rss_kib(pid)
    secs = b.env_int("ACTIVE_SECS", 15)
    ports = b.PORTS[name]
    if kind == "plain":
        r = b.run_wrk(ports[0], "/api/1k", b.HOST, n, secs)
    else:
        # h2load -c N over TLS 1.3 (HTTP/1.1 keep-alive, or h2 with one stream at a time
        # per connection): N handshakes, then N requests back to back (its latency log
        # gives p50/p99).
        r = b.run_h2load(ports[1], b.SNIS[:1], "/api/1k", b.HOST, n, 1, secs, kind == "tls",
                         False, tmp, timeout=secs * 4 + 120)
    r["before_kib"] = before
    r["peak_kib"] = b.status_kib(pid, "VmHWM") or 0
    r["conns"] = n
    return r


def first_line(err):
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else "?"


def time_wait_sockets():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("tw") + 1])
    return 0


def settle_time_wait(most=2000, limit=75):
    """Waits (at most `limit` s) until the previous row's connections have left TIME_WAIT:
    tens of thousands of them hold loopback's ephemeral ports for a minute, and the next
    row's clients (and a proxy's upstream connections) then fail to connect."""
    deadline = time.time() + limit
    while time_wait_sockets() > most and time.time() < deadline:
        time.sleep(2)


def conns(command):
    start_load = b.loadavg()
    mach = b.machine()
    vers = b.versions()
    room = fd_room()
    b.MAX_CONNS = room + 1000
    env = b.Env()
    rows = []
    active_rows = []
    try:
        import subprocess
        subprocess.run([sys.executable, os.path.join(b.LIB, "certs.py"), env.certs, *b.SNIS], check=True)
        b.start_upstream(env)
        ws_upstream = b.start([sys.executable, os.path.join(b.LIB, "ws_upstream.py"),
                               str(b.PORTS["ws_upstream"])],
                              env.path("ws-upstream.log"), cpu=b.OTHER_CPU)
        b.wait_port(b.PORTS["ws_upstream"], proc=ws_upstream)
        for name in b.PROXIES if b.env_int("IDLE", 1) else ():
            if name == "floor":
                continue
            for kind in KINDS:
                # A fresh process per kind: what an allocator keeps from the previous kind
                # (and gives back at its own pace) would blur the next one's figure.
                settle_time_wait()
                proc = b.start_proxy(env, name)
                b.sanity(name, b.PORTS[name])
                n = min(wanted(kind), room if name != "haproxy" else b.haproxy_maxconn() - 100)
                if kind == "ws":
                    # A tunnel holds two descriptors in the proxy (client and upstream).
                    n = min(n, room // 2 - 500)
                b.log(f"{name} {kind}: {n} idle connections")
                try:
                    r = measure(name, proc, kind, n)
                except (RuntimeError, OSError) as e:
                    b.log(f"{name} {kind}: FAILED: {e}")
                    rows.append((name, kind, None, str(e)))
                    continue
                finally:
                    b.stop(proc)
                    b.STARTED.remove(proc)
                b.log(f"{name} {kind}: {r['per_conn_kib']:.2f} KiB per connection, "
                      f"RSS {r['before_kib'] / 1024:.1f} -> {r['after_kib'] / 1024:.1f} MiB, "
                      f"fresh request p99 {r['p99_ms']:.2f} ms, still open {r['alive']}")
                rows.append((name, kind, r, None))
        n_active = active_conns(room)
        if b.env_int("ACTIVE", 1):
            for name in b.PROXIES:
                if name == "floor":
                    continue
                for kind in ("plain", "tls", "h2"):
                    settle_time_wait()
                    proc = b.start_proxy(env, name)
                    b.sanity(name, b.PORTS[name])
                    n = min(n_active, b.haproxy_maxconn() - 100) if name == "haproxy" else n_active
                    b.log(f"{name} {kind}: {n} active connections")
                    try:
                        r = active(name, proc, kind, n, env.tmp)
                    except (RuntimeError, OSError) as e:
                        b.log(f"{name} {kind} active: FAILED: {e}")
                        active_rows.append((name, kind, None, str(e)))
                        continue
                    finally:
                        b.stop(proc)
                        b.STARTED.remove(proc)
                    b.log(f"{name} {kind} active: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, "
                          f"errors {r['socket_errors']}, non-2xx {r['non2xx']}, "
                          f"peak RSS {r['peak_kib'] / 1024:.1f} MiB")
                    active_rows.append((name, kind, r, None))
    finally:
        env.close()
    table = ["| proxy | connections | held | RSS before | RSS with them | per connection | "
             "RSS after they close | fresh request p50 / p99 | still open at the end (sampled) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    what = {"plain": "HTTP/1.1", "tls": "HTTP/1.1, TLS 1.3", "h2": "h2, TLS 1.3",
            "ws": "WebSocket tunnel"}
    if H2_STREAMS > 1:
        what["h2"] = f"h2, TLS 1.3, {H2_STREAMS} streams at once"
    for name, kind, r, err in rows:
        if r is None:
            table.append(f"| {b.LABEL[name]} | {what[kind]} | failed: {first_line(err)} | | | | | | |")
            continue
        table.append(
            f"| {b.LABEL[name]} | {what[kind]} | {r['conns']:,} | {r['before_kib'] / 1024:.1f} MiB | "
            f"{r['after_kib'] / 1024:.1f} MiB | **{r['per_conn_kib']:.1f} KiB** | "
            f"{r['released_kib'] / 1024:.1f} MiB | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | "
            f"{r['alive']} |")
    extra = [
        "- each connection: one request (`GET /api/1k`, 1 KiB answer from the nginx upstream) "
        + (f"(h2: {H2_STREAMS} of them on {H2_STREAMS} streams opened at once) " if H2_STREAMS > 1 else "")
        + "answered in full, then held idle (WebSocket: an upgrade to `/ws/echo`, 101 from a "
        "Python echo upstream, one frame each way through the tunnel, then held idle); "
        "RSS of the serving process (NGINX: its worker), "
        "settled, before and after; one worker / thread each, a fresh process for each row",
        f"- descriptors: RLIMIT_NOFILE here is {room + 200} per process, so at most {room:,} "
        f"connections per kind ({b.haproxy_maxconn() - 100:,} for HAProxy, whose maxconn counts two "
        "descriptors per connection; a tunnel holds two in every proxy); CONNS_PLAIN / CONNS_TLS / "
        "CONNS_H2 / CONNS_WS set fewer",
        "- fresh request: a new connection (and handshake) and one request while the others are "
        f"held, {b.env_int('PROBES', 200)} times",
    ]
    if not rows:
        # No idle part: its table and the lines about it go.
        table = []
        extra = [e for e in extra if not e.startswith(("- each connection", "- fresh request"))]
    if active_rows:
        table += ["", "Active connections: each sends `GET /api/1k` back to back "
                  f"({b.env_int('ACTIVE_SECS', 15)} s; wrk for HTTP/1.1, h2load over TLS, one stream at a time per h2 connection):", "",
                  "| proxy | connections | held | req/s | p50 | p99 | errors / non-2xx | peak RSS |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, kind, r, err in active_rows:
            if r is None:
                table.append(f"| {b.LABEL[name]} | {what[kind]} | failed: {first_line(err)} | | | | | |")
                continue
            table.append(
                f"| {b.LABEL[name]} | {what[kind]} | {r['conns']:,} | {r['rps']:,.0f} | "
                f"{r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['socket_errors']} / {r['non2xx']} | "
                f"{r['peak_kib'] / 1024:.1f} MiB |")
        extra.append(f"- active: {active_conns(room):,} connections (ACTIVE_CONNS; at most half the "
                     "descriptors less 500, as each may also hold an upstream connection), a fresh "
                     "process per row, peak RSS is the process's VmHWM")
    noise = ("- **noise:** the machine is shared with engineers who compile at the same time: the "
             "memory figures (RSS) do not depend on it, the latencies do")
    # An active-only run (IDLE=0) has a section of its own, so the idle table of the last
    # full run stays in RESULTS.md beside it.
    idle_run = b.env_int("IDLE", 1)
    title = "Idle and active connections (conns)" if idle_run else "Active connections (conns, IDLE=0)"
    section = "conns" if idle_run else "conns-active"
    if idle_run and KINDS != ALL_KINDS:
        # Some kinds only (CONN_KINDS): a section of their own beside the full run's.
        title = f"Idle connections: {', '.join(what[k] for k in KINDS)} (conns, CONN_KINDS={','.join(KINDS)})"
        section = "conns-" + "-".join(KINDS)
    text = (f"## {title}\n\n" + b.header(command, start_load, vers, mach, extra, noise=noise)
            + "\n\n" + "\n".join(table))
    print(text)
    b.write_section(section, text)
