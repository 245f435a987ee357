"""RSS of one Portico process (one thread) holding N idle CONNECT tunnels of its egress
forward proxy: each tunnel to a Python echo server on loopback (a STATIC ServiceEntry),
1 KiB each way through it, then held. Portico only: NGINX and HAProxy have no CONNECT
forward proxy.

    python3 bench/lib/connect_tunnels.py PORTICO_BINARY [N=2000]
"""
import asyncio, os, socket, subprocess, sys, time, tempfile, resource

BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
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

async def main():
    # The echo handlers still running at exit are cancelled: not worth a traceback each.
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)
    up, proxy, admin = free_port(), free_port(), free_port()
    server = await asyncio.start_server(echo, "127.0.0.1", up, backlog=4096)
    d = tempfile.mkdtemp()
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
    open(f"{d}/p.toml", "w").write(conf)
    p = subprocess.Popen([BIN, "run", "-c", f"{d}/p.toml", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=open(f"{d}/err", "w"),
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000)))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", proxy), 0.2).close(); break
        except OSError:
            await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    before = rss(p.pid)
    conns = []
    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", proxy)
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
    print(f"{os.path.basename(BIN)}: {N} idle CONNECT tunnels: RSS {before/1024:.1f} -> {held/1024:.1f} MiB, "
          f"{(held-before)/N:.1f} KiB per tunnel")
    for r, w in conns: w.close()
    p.terminate(); p.wait()
    server.close()

asyncio.run(main())
