#!/usr/bin/env python3
"""Summarise a dhat heap profile (dhat-heap.json, from a `--features dhat-heap` build) by
allocation site: the bytes live at the heap's peak (dhat's "t-gmax") per call stack.

    dhat_sites.py PROFILE [--per N] [--top K] [--frames F] [--by portico]

--per N divides by N (e.g. the idle connections held at the peak) to give bytes per
connection. --by portico groups the stacks by their first frame in Portico's own code
(`portico::`), which says which of our calls the memory hangs from.
"""

import argparse
import json
import re
import sys

# Frames that only say "an allocation happened": the allocator, dhat, std's alloc glue.
NOISE = re.compile(
    r"(dhat::|alloc::alloc::|alloc::raw_vec::|__rust_alloc|__rust_realloc|__rdl_|"
    r"core::alloc::|std::alloc::|<alloc::alloc::Global|alloc::boxed::Box<T>::new|"
    r"alloc::sync::Arc<T>::new|alloc::vec::Vec<T,A>::with_capacity|RawVec|"
    r"alloc::alloc::exchange_malloc|\[root\]|\(dhat-[0-9.]+/|\(alloc/src/alloc\.rs|"
    r"stable/alloc/|^alloc_impl|^box_new_uninit|^allocate \(|^alloc \()"
)


def short(frame):
    # "0x55..: name (file:line:col)" -> "name (file:line)"
    frame = re.sub(r"^0x[0-9a-f]+: ", "", frame)
    frame = re.sub(r"\(/[^)]*/(src/[^)]*?)(:\d+)?\)$", r"(\1)", frame)
    frame = re.sub(r"\(/[^)]*/registry/src/[^/]+/([^)]*?)(:\d+)?\)$", r"(\1)", frame)
    frame = re.sub(r"\(/rustc/[0-9a-f]+/library/([^)]*?)(:\d+)?\)$", r"(std \1)", frame)
    return frame


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--per", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--by", choices=["stack", "portico"], default="stack")
    ap.add_argument("--field", default="gb", help="gb: live at the peak; eb: live at the end")
    a = ap.parse_args()
    d = json.load(open(a.profile))
    ftbl = d["ftbl"]
    total = sum(p[a.field] for p in d["pps"])
    blocks = sum(p[a.field.replace("b", "bk")] if a.field != "tb" else 0 for p in d["pps"])
    print(f"{a.profile}: {d.get('cmd', '')}")
    print(f"live at {'the peak (t-gmax)' if a.field == 'gb' else a.field}: {total} bytes in {blocks} blocks;"
          f" per {a.per:g}: {total / a.per:.0f} B")
    groups = {}
    for p in d["pps"]:
        b = p[a.field]
        if not b:
            continue
        frames = [short(ftbl[i]) for i in p["fs"]]
        frames = [f for f in frames if not NOISE.search(f)]
        if a.by == "portico":
            ours = next((f for f in frames if f.startswith("portico::") or "<portico::" in f), None)
            key = (ours or "(no portico frame) " + (frames[0] if frames else "?"),)
        else:
            key = tuple(frames[: a.frames])
        g = groups.setdefault(key, [0, 0])
        g[0] += b
        g[1] += p[a.field.replace("b", "bk")]
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    for key, (b, n) in rows[: a.top]:
        print(f"\n{b / a.per:9.1f} B per {a.per:g} ({b} B, {n} blocks, {100 * b / max(total, 1):.1f} %)")
        for f in key:
            print(f"      {f[:200]}")


if __name__ == "__main__":
    sys.exit(main())
