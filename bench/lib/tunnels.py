"""Tunnels through one Portico process (one thread), to a Python server on loopback (a
STATIC ServiceEntry):

- `connect`: N idle CONNECT tunnels of the egress forward proxy;
- `tcp`: N idle connections through a TCP route (an L4 listener);

each with 1 KiB each way through it, then held: the RSS growth per tunnel is printed.

- `tcp-bulk`: N MiB (default 1024) pushed through one connection of a TCP route to a
  server that discards them: MB/s.

Portico only: NGINX and HAProxy have no CONNECT forward proxy (their TCP proxying is
measured by neither of these).

    python3 bench/lib/tunnels.py PORTICO_BINARY [N=2000] [connect|tcp|tcp-bulk]
"""
import asyncio, os, socket, subprocess, sys, time, tempfile, resource

BIN = sys.argv[1]
KIND = sys.argv[3] if len(sys.argv) > 3 else "connect"
N = int(sys.argv[2]) if len(sys.argv) > 2 else (1024 if KIND == "tcp-bulk" else 2000)
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

async def echo(reader, writer):
    try:
        while True:
            d = await reader.read(65536)
            if not d:
                break
            writer.write(d); await writer.drain()
    except Exception:
        pass

async def sink(reader, writer):
    try:
        while await reader.read(1 << 20):
            pass
    except Exception:
        pass
    writer.close()

def bulk(port):
    """Pushes N MiB through the proxy's port; returns MB/s once the sink has closed."""
    s = socket.create_connection(("127.0.0.1", port))
    chunk = b"x" * (1 << 20)
    t = time.monotonic()
    for _ in range(N):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    return N * (1 << 20) / (time.monotonic() - t) / 1e6

async def main():
    # The echo handlers still running at exit are cancelled: not worth a traceback each.
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)
    up, proxy, admin = free_port(), free_port(), free_port()
    handler = sink if KIND == "tcp-bulk" else echo
    server = await asyncio.start_server(handler, "127.0.0.1", up, backlog=4096)
    d = tempfile.mkdtemp()
    if KIND == "connect":
        conf = f'''[mesh]
admin = "127.0.0.1:{admin}"
outboundTrafficPolicy = {{ mode = "REGISTRY_ONLY" }}

[[gateways]]
name = "egress"
selector = {{ istio = "egressgateway" }}
[[gateways.servers]]
port = {{ number = {proxy}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[serviceEntries]]
name = "tunnel"
hosts = ["tunnel.test"]
resolution = "STATIC"
ports = [{{ number = {up}, name = "tcp", protocol = "TCP" }}]
endpoints = [{{ address = "127.0.0.1" }}]
'''
    else:
        conf = f'''[mesh]
admin = "127.0.0.1:{admin}"

[[gateways]]
name = "tcp"
[[gateways.servers]]
port = {{ number = {proxy}, name = "tcp", protocol = "TCP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "tunnel"
hosts = ["*"]
gateways = ["tcp"]
[[virtualServices.tcp]]
match = [{{ port = {proxy} }}]
route = [{{ destination = {{ host = "tunnel.test", port = {{ number = {up} }} }} }}]

[[serviceEntries]]
name = "tunnel"
hosts = ["tunnel.test"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{{ number = {up}, name = "tcp", protocol = "TCP" }}]
endpoints = [{{ address = "127.0.0.1" }}]
'''
    open(f"{d}/p.toml", "w").write(conf)
    p = subprocess.Popen([BIN, "run", "-c", f"{d}/p.toml", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=open(f"{d}/err", "w"),
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000)))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", proxy), 0.2).close(); break
        except OSError:
            await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    if KIND == "tcp-bulk":
        rates = [await asyncio.to_thread(bulk, proxy) for _ in range(3)]
        print(f"{os.path.basename(BIN)}: {N} MiB through one TCP-route connection, 3 times: "
              + ", ".join(f"{r:.0f}" for r in rates) + " MB/s")
        p.terminate(); p.wait(); server.close()
        return
    before = rss(p.pid)
    conns = []
    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", proxy)
        if KIND == "connect":
            w.write(f"CONNECT tunnel.test:{up} HTTP/1.1\r\nHost: tunnel.test:{up}\r\n\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
        w.write(b"ping" * 256); await w.drain()
        got = await r.readexactly(1024)
        conns.append((r, w))
    for i in range(0, N, 200):
        await asyncio.gather(*(one() for _ in range(min(200, N - i))))
    last = rss(p.pid)
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = rss(p.pid)
        if abs(now - last) < 64: break
        last = now
    held = rss(p.pid)
    print(f"{os.path.basename(BIN)}: {N} idle {'CONNECT tunnels' if KIND == 'connect' else 'TCP-route connections'}: RSS {before/1024:.1f} -> {held/1024:.1f} MiB, "
          f"{(held-before)/N:.1f} KiB per tunnel")
    for r, w in conns: w.close()
    p.terminate(); p.wait()
    server.close()

asyncio.run(main())
