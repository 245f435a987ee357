"""Reading callgrind profiles: instructions per request, by component and by Portico callback.

Instruction counts (valgrind's Ir) do not depend on the machine's load or clock, so a change
of 1 % is visible in one run where CPU seconds need many rounds to show 10 %. They are not
time: a cache miss costs no instructions. Use them next to the CPU numbers of `compare`.
"""

import collections
import re

_FN = re.compile(r"^(c?fn)=\((\d+)\)(?: (.*))?$")


def parse(paths):
    """Self cost per function, and the cost of each caller -> callee call edge, summed over
    `paths` (one file per process; threads are merged). Returns (self, calls), keyed by
    function name."""
    own, calls = collections.Counter(), collections.Counter()
    for path in paths:
        ids = {}  # compressed ids are per file
        cur = callee = None
        after_call = False
        with open(path, errors="replace") as f:
            for line in f:
                m = _FN.match(line)
                if m:
                    kind, i, name = m.groups()
                    if name:
                        ids[i] = name
                    name = ids.get(i, i)
                    if kind == "fn":
                        cur = name
                    else:
                        callee = name
                    continue
                if line.startswith("calls="):
                    after_call = True
                    continue
                if not line or not (line[0].isdigit() or line[0] in "+-*"):
                    continue
                parts = line.split()
                if len(parts) < 2:
                    continue
                cost = int(parts[1])
                if after_call:
                    # The line after calls= carries the callee's inclusive cost.
                    if callee != cur:
                        calls[(cur, callee)] += cost
                    after_call = False
                else:
                    own[cur] += cost
    return own, calls


# First matching rule wins; tested against the function name with leading '<' / '&' removed.
GROUPS = [
    ("Portico", ("portico::",)),
    ("pingora", ("pingora",)),
    ("http, httparse (headers, parsing)", ("http::", "httparse::")),
    ("tokio (runtime, I/O, channels)", ("tokio::", "mio::")),
    ("allocator (mimalloc)", ("mi_", "_mi_", "mimalloc")),
    ("memcpy / memmove / memset", ("__mem",)),
    ("bytes", ("bytes::",)),
    ("Rust std (fmt, collections, hash)", ("core::", "alloc::", "std::", "hashbrown::")),
]


def group_of(name):
    n = name.lstrip("<&")
    for label, prefixes in GROUPS:
        if n.startswith(prefixes):
            return label
    return "other"


def portico_callbacks(calls):
    """Inclusive instructions of each Portico function entered from outside Portico (the
    ProxyHttp callbacks pingora polls), including the pingora/http work they ask for."""
    out = collections.Counter()
    for (caller, callee), cost in calls.items():
        if callee.lstrip("<&").startswith("portico::") and "portico::" not in caller:
            out[callee] += cost
    return out


def short(name, width=110):
    n = re.sub(r"<portico::proxy::Gateway as pingora_proxy::proxy_trait::ProxyHttp>::", "Gateway::", name)
    n = n.replace("::{{closure}}", " (async body)")
    return n if len(n) <= width else n[: width - 1] + "…"
