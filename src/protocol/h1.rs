//! HTTP/1.1 framing, as Portico's codecs read and write it: where a head ends, how a
//! body is framed and where it ends, which fields are about the connection. Pure
//! functions on bytes: never touches sockets (the fuzz targets in `fuzz/` drive them).

use super::super::proxy::check::{self, BodyFraming, Refusal};
use crate::routing::HeaderOps;

/// Header fields a request or response head may have (Envoy's `max_headers_count`
/// default): more gets 431 from a client, 502 from an upstream.
pub const MAX_HEADERS: usize = 100;
/// The largest upstream response head (Envoy's `max_response_headers_kb` default): more is
/// an invalid response, 502.
pub const MAX_RESPONSE_HEAD: usize = 60 * 1024;

/// Where the head in `buf` ends (after its empty line), looking from `from` on: `Err` at a
/// line ended by a bare LF, which Portico refuses (RFC 9112 lets a recipient refuse it,
/// and two parsers that disagree on where a head ends are how requests are smuggled).
pub fn head_end(buf: &[u8], from: usize) -> Option<Result<usize, ()>> {
    let start = from.saturating_sub(3);
    for i in memchr::memchr_iter(b'\n', &buf[start..]).map(|i| start + i) {
        if i == 0 || buf[i - 1] != b'\r' {
            return Some(Err(()));
        }
        if i >= 3 && buf[i - 2] == b'\n' && buf[i - 3] == b'\r' {
            return Some(Ok(i + 1));
        }
    }
    None
}

/// RFC 3986's characters of a path and query (unreserved, sub-delims, `:@/?%`). Targets
/// with anything else (a fragment, quotes, braces, non-ASCII) go to pingora, which parses
/// them into a URI and answers or normalizes them its way.
pub fn uri_char(b: u8) -> bool {
    URI_CHARS.has(b)
}

static URI_CHARS: ByteSet = ByteSet::alphanumeric_and(b"-._~!$&'()*+,;=:@/?%");

/// A set of bytes as a table: the per-byte checks of a request's target and host are one
/// load each, where searching a list of punctuation (`b"...".contains(&b)`) was a
/// `memchr` call per byte, whose cost moved with the compiler's inlining.
pub struct ByteSet([bool; 256]);

impl ByteSet {
    /// ASCII letters and digits, and `extra`.
    pub const fn alphanumeric_and(extra: &[u8]) -> ByteSet {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            t[b] = (b as u8).is_ascii_alphanumeric();
            b += 1;
        }
        let mut i = 0;
        while i < extra.len() {
            t[extra[i] as usize] = true;
            i += 1;
        }
        ByteSet(t)
    }

    #[inline]
    pub fn has(&self, b: u8) -> bool {
        self.0[b as usize]
    }
}

/// Hop-by-hop headers: about one connection, never passed on.
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

pub fn dropped_response_header(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|d| name.eq_ignore_ascii_case(d))
}

/// A response with both `Transfer-Encoding` and `Content-Length`: the length is dropped.
pub fn has_two_framings(headers: &[httparse::Header<'_>]) -> bool {
    let has = |n: &str| headers.iter().any(|h| h.name.eq_ignore_ascii_case(n));
    has("transfer-encoding") && has("content-length")
}

pub fn dropped_response_header_or_length(name: &str) -> bool {
    dropped_response_header(name) || name.eq_ignore_ascii_case("content-length")
}

/// Writes `headers` less those `ops` (route's, then destination's) remove or set, then the
/// operations' own.
pub fn write_headers<'a>(
    out: &mut Vec<u8>,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ops: [&HeaderOps; 2],
    drop: fn(&str) -> bool,
) {
    // Whether a set or remove in `ops[from..]` replaces header `name`: a later operation
    // wins, as with pingora's header map.
    let replaced_in = |from: usize, name: &[u8]| {
        ops[from..].iter().any(|o| {
            o.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
                || o.remove
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        })
    };
    for (name, value) in headers {
        if drop(name) || replaced_in(0, name.as_bytes()) {
            continue;
        }
        put(out, name.as_bytes(), value);
    }
    for (i, o) in ops.iter().enumerate() {
        for (name, value) in o.set.iter().chain(&o.add) {
            if !replaced_in(i + 1, name) {
                put(out, name, value.as_bytes());
            }
        }
    }
}

/// httparse's headers as name-value pairs.
pub fn raw<'a>(
    headers: &'a [httparse::Header<'a>],
) -> impl Iterator<Item = (&'a str, &'a [u8])> + Clone {
    headers.iter().map(|h| (h.name, h.value))
}

pub fn put(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How the response body ends.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

/// How an upstream's final response head (`r`, status 200-599) frames its body, and
/// whether the connection closes after it; `None` for a head no response may have (two
/// different lengths, a bad length, a status outside 200-599). `head_only`: the answer to
/// a HEAD.
pub fn response_framing(
    r: &httparse::Response<'_, '_>,
    head_only: bool,
) -> Option<(Framing, bool)> {
    let status = r.code?;
    if !(200..600).contains(&status) {
        return None;
    }
    let mut length: Option<u64> = None;
    // Some(whether chunked is the last coding) when transfer-encoding is sent.
    let mut te: Option<bool> = None;
    // An HTTP/1.0 upstream: no keep-alive assumed.
    let mut upstream_close = r.version == Some(0);
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = h.value.trim_ascii();
            let n = (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
                .then(|| v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(l)) if n == l => {}
                _ => return None,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked when it is the last coding; otherwise the body ends with the
            // connection (RFC 9112 6.3).
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            te = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            upstream_close |= h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    if te.is_some() && length.is_some() {
        // Both (RFC 9112 6.3): the coding wins, the length is not passed on (see
        // `has_two_framings`), and the connection is not used again.
        upstream_close = true;
    }
    let framing = if head_only || status == 204 || status == 304 {
        Framing::Empty
    } else if let Some(chunked) = te {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    Some((framing, upstream_close))
}

/// Finds the end of a chunked body in the bytes passed through it.
#[derive(Default, Debug)]
pub struct ChunkScan {
    pub state: ChunkState,
    size: u64,
    /// Hex digits of the size line so far.
    digits: u8,
    pub done: bool,
    /// The framing was broken (`done` too): the body cannot be told whole.
    pub bad: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Debug)]
pub enum ChunkState {
    #[default]
    Size,
    /// Whitespace after the size: more of it, extensions or the end of the line follow.
    SizeWs,
    /// Chunk extensions up to the end of the size line.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk; `TrailerStart` at the start of a line.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

impl ChunkScan {
    /// Scans `buf` (continuing from the last call); `Some(n)` when the body ends after
    /// `n` bytes of it. Malformed framing also ends it (the connection is then not reused).
    pub fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        self.decode(buf, |_| {})
    }

    /// As [`ChunkScan::scan`], handing each run of chunk data in `buf` to `data`.
    pub fn decode(
        &mut self,
        buf: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Option<usize> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                // `chunk-size = 1*HEXDIG`, at most 16 digits as httparse (and so pingora)
                // reads them; then whitespace, `;` and extensions, or the line's end.
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 16 {
                            return self.broken(i);
                        }
                        self.digits += 1;
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self.size << 4 | d;
                    }
                    _ if self.digits == 0 => return self.broken(i),
                    b';' => self.state = Ext,
                    b' ' | b'\t' => self.state = SizeWs,
                    b'\r' => self.state = SizeLf,
                    _ => return self.broken(i),
                },
                SizeWs => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Ext,
                    b'\r' => self.state = SizeLf,
                    _ => return self.broken(i),
                },
                Ext => {
                    if b == b'\r' {
                        self.state = SizeLf;
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return self.broken(i);
                    }
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let n = ((buf.len() - i) as u64).min(self.size) as usize;
                    data(i..i + n);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return self.broken(i);
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return self.broken(i);
                    }
                    self.state = Size;
                    self.digits = 0;
                }
                // Trailer lines end with CRLF: a bare LF is refused, as in a head (a
                // reader that takes it for a line's end finds another end of the body).
                TrailerStart => match b {
                    b'\r' => self.state = EndLf,
                    b'\n' => return self.broken(i),
                    _ => self.state = Trailer,
                },
                Trailer => match b {
                    b'\r' => self.state = TrailerLf,
                    b'\n' => return self.broken(i),
                    _ => {}
                },
                TrailerLf => match b {
                    b'\n' => self.state = TrailerStart,
                    b'\r' => {}
                    _ => self.state = Trailer,
                },
                EndLf => {
                    if b != b'\n' {
                        return self.broken(i);
                    }
                    self.done = true;
                    return Some(i + 1);
                }
            }
            i += 1;
        }
        None
    }

    /// Broken framing at byte `i`: the scan ends there.
    fn broken(&mut self, i: usize) -> Option<usize> {
        self.done = true;
        self.bad = true;
        Some(i)
    }
}

/// Walks a response body framed by `framing` through the buffers read from the upstream:
/// which bytes of each belong to the body, which of those are body data, and where the
/// body ends. What every reader of an upstream body on the fast path (the HTTP/1.1 and h2
/// codecs, the mirror) needs, so that they cannot disagree on where a body ends.
#[derive(Debug)]
pub struct BodyWalk {
    framing: Framing,
    /// Bytes still to come of a body with a length.
    remaining: u64,
    chunks: ChunkScan,
}

impl BodyWalk {
    pub fn new(framing: Framing) -> BodyWalk {
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        BodyWalk {
            framing,
            remaining,
            chunks: ChunkScan::default(),
        }
    }

    /// Takes `buf` (the bytes after those of the last step): how many of them belong to
    /// the body, and whether the body ends with them. `data` gets each run of body data in
    /// `buf` (a chunked body's without its framing). A `Close` body ends only with the
    /// connection, which the reader sees. After a broken chunked framing ([`broken`]) the
    /// walk says the body ended where the framing broke.
    ///
    /// [`broken`]: BodyWalk::broken
    #[inline]
    pub fn step(
        &mut self,
        buf: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> (usize, bool) {
        match self.framing {
            Framing::Empty => (0, true),
            Framing::Length(_) => {
                let take = (buf.len() as u64).min(self.remaining) as usize;
                self.remaining -= take as u64;
                if take > 0 {
                    data(0..take);
                }
                (take, self.remaining == 0)
            }
            Framing::Chunked => {
                let end = self.chunks.decode(buf, data);
                (end.unwrap_or(buf.len()), self.chunks.done)
            }
            Framing::Close => {
                if !buf.is_empty() {
                    data(0..buf.len());
                }
                (buf.len(), false)
            }
        }
    }

    /// The upstream broke its chunked framing: the body cannot be told whole, and the
    /// connection is not usable again.
    pub fn broken(&self) -> bool {
        self.chunks.bad
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Bytes still to come of a body with a length (0 for any other framing).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

/// Where the first request in `buf` ends (head and body), as Portico's front frames it,
/// within `max_head` bytes of head: `Ok(None)` when more bytes are needed, `Err` with the
/// refusal the front answers. The framing the front lends pingora requests by; the
/// differential fuzz target holds it against httparse's.
pub fn request_end(buf: &[u8], max_head: usize) -> Result<Option<usize>, Refusal> {
    let head_len = match head_end(buf, 0) {
        None if buf.len() > max_head => return Err(check::HEAD_TOO_LARGE),
        None => return Ok(None),
        Some(Err(())) => return Err(check::BAD_HEAD),
        Some(Ok(n)) if n > max_head => return Err(check::HEAD_TOO_LARGE),
        Some(Ok(n)) => n,
    };
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    match req.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(n)) if n == head_len => {}
        Err(httparse::Error::TooManyHeaders) => return Err(check::HEAD_TOO_LARGE),
        _ => return Err(check::BAD_HEAD),
    }
    let (Some(target), Some(minor)) = (req.path, req.version) else {
        return Err(check::BAD_HEAD);
    };
    let absolute_form = !target.starts_with('/') && target != "*";
    let checked = check::check_h1(minor, absolute_form, raw(req.headers))?;
    let rest = &buf[head_len..];
    match checked.body {
        BodyFraming::None => Ok(Some(head_len)),
        BodyFraming::Length(n) => Ok((rest.len() as u64 >= n).then(|| head_len + n as usize)),
        BodyFraming::Chunked => {
            let mut scan = ChunkScan::default();
            match scan.scan(rest) {
                Some(_) if scan.bad => Err(check::BAD_HEAD),
                Some(end) => Ok(Some(head_len + end)),
                None => Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_scan_finds_the_end_across_calls() {
        let body = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nTrailer: a\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 1..body.len() {
            let mut s = ChunkScan::default();
            let first = s.scan(&body[..split]);
            let total = match first {
                Some(n) => n,
                None => split + s.scan(&body[split..]).expect("end in the rest"),
            };
            assert_eq!(total, end, "split at {split}");
            assert!(s.done);
        }
        let mut s = ChunkScan::default();
        assert_eq!(s.scan(b"0\r\n\r\n"), Some(5));
    }

    /// Walks `bytes` split at every point: (bytes taken, the data, whether it ended, broken).
    fn walk_split(framing: Framing, bytes: &[u8]) -> Vec<(usize, Vec<u8>, bool, bool)> {
        (1..=bytes.len())
            .map(|split| {
                let mut walk = BodyWalk::new(framing);
                let (mut taken, mut data, mut done) = (0, Vec::new(), false);
                for part in [&bytes[..split], &bytes[split..]] {
                    if done {
                        break;
                    }
                    let (take, end) = walk.step(part, |r| data.extend_from_slice(&part[r]));
                    assert!(take <= part.len());
                    taken += take;
                    done = end;
                }
                (taken, data, done, walk.broken())
            })
            .collect()
    }

    #[test]
    fn body_walk_finds_the_same_end_and_data_however_the_bytes_arrive() {
        let chunked = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nT: a\r\n\r\nNEXT";
        for got in walk_split(Framing::Chunked, chunked) {
            assert_eq!(got, (chunked.len() - 4, b"Wikipedia".to_vec(), true, false));
        }
        for got in walk_split(Framing::Length(5), b"helloNEXT") {
            assert_eq!(got, (5, b"hello".to_vec(), true, false));
        }
        // A body that ends with the connection takes everything and never ends by itself.
        for got in walk_split(Framing::Close, b"all of it") {
            assert_eq!(got, (9, b"all of it".to_vec(), false, false));
        }
        let mut empty = BodyWalk::new(Framing::Empty);
        assert_eq!(empty.step(b"NEXT", |_| panic!("no data")), (0, true));
        // Broken framing ends the walk where it broke, and says so.
        for got in walk_split(Framing::Chunked, b"4\r\nWikiXX0\r\n\r\n") {
            assert_eq!(got, (7, b"Wiki".to_vec(), true, true));
        }
        // Less than the length: not ended, what is left is known (read sizes use it).
        let mut short = BodyWalk::new(Framing::Length(10));
        assert_eq!(short.step(b"abc", |_| {}), (3, false));
        assert_eq!(short.remaining(), 7);
    }

    #[test]
    fn uri_chars_are_rfc_3986_path_and_query_characters() {
        for b in 0..=255u8 {
            let listed = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
            assert_eq!(uri_char(b), listed, "byte {b}");
        }
        assert!(!uri_char(b'#') && !uri_char(b' ') && !uri_char(0x80));
    }

    #[test]
    fn head_end_finds_the_empty_line_and_refuses_bare_lf() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nnext";
        let end = head.len() - 4;
        for from in 0..=end {
            assert_eq!(head_end(head, from), Some(Ok(end)), "from {from}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n", 0), Some(Err(())));
    }

    #[test]
    fn chunk_scan_stops_at_bad_framing() {
        for (body, at) in [
            (&b"zz\r\n"[..], 0),
            (b"5\r\nhello\r\nzz\r\n", 10),
            (b"5\r\nhelloX", 8),
            (b"5\nhello", 1),
            (b"0\r\n\rX", 4),
            (b"fffffffffffffffff\r\n", 16),
        ] {
            let mut s = ChunkScan::default();
            assert_eq!(
                s.scan(body),
                Some(at),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert!(s.done && s.bad);
        }
        let mut s = ChunkScan::default();
        assert_eq!(s.scan(b"0\r\n\r\n"), Some(5));
        assert!(s.done && !s.bad);
    }

    #[test]
    fn request_end_frames_what_the_front_reads() {
        let max = 60 * 1024;
        let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next";
        assert_eq!(request_end(get, max), Ok(Some(get.len() - 9)));
        let post = b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 3\r\n\r\nabcNEXT";
        assert_eq!(request_end(post, max), Ok(Some(post.len() - 4)));
        assert_eq!(request_end(&post[..post.len() - 6], max), Ok(None));
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nX";
        assert_eq!(request_end(chunked, max), Ok(Some(chunked.len() - 1)));
        assert_eq!(
            request_end(b"GET / HTTP/1.1\r\n\r\n", max),
            Err(check::NO_HOST)
        );
        assert_eq!(
            request_end(b"GET / HTTP/1.1\nHost: a\n\n", max),
            Err(check::BAD_HEAD)
        );
        assert_eq!(request_end(&[b'a'; 100], 50), Err(check::HEAD_TOO_LARGE));
    }

    /// Found by the h1_differential fuzz target: HTTP/1.0 with `Transfer-Encoding` was
    /// framed as chunked; a 1.0 hop frames it by its length or as bodiless.
    #[test]
    fn fuzz_http_1_0_with_transfer_encoding_is_refused() {
        let req = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(request_end(req, 1024), Err(check::CODING_IN_HTTP_1_0));
    }

    /// Found by the h1_differential fuzz target: the scanner read a size line without
    /// digits as the last chunk (`4\r\nWiki\r\n\r\npedia...`: the body ended at the
    /// empty line, `pedia` and the rest were taken for trailers), where RFC 9112 has
    /// `chunk-size = 1*HEXDIG`; and it was laxer than httparse, which pingora reads the
    /// lent body with, on the rest of the size line and on trailers.
    #[test]
    fn fuzz_chunk_size_lines_and_trailers_are_read_strictly() {
        let bad: &[(&[u8], usize)] = &[
            (b"\r\n\r\n", 0),
            (b";x\r\n", 0),
            (b" 5\r\nhello\r\n0\r\n\r\n", 0),
            (b"4\r\nWiki\r\n\r\npedia\r\n0\r\n\r\n", 9),
            (b"5 x\r\nhello\r\n", 2),
            (b"5 6\r\nhello\r\n", 2),
            (b"00000000000000005\r\nhello\r\n0\r\n\r\n", 16),
            (b"0\r\n\n", 3),
            (b"0\r\nX: y\n\r\n", 7),
        ];
        for (body, at) in bad {
            let mut s = ChunkScan::default();
            assert_eq!(
                s.scan(body),
                Some(*at),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert!(s.done && s.bad, "{:?}", String::from_utf8_lossy(body));
        }
        let good: &[&[u8]] = &[
            b"5 \t;x=\"y z\"\r\nhello\r\n0\r\n\r\n",
            b"0000000000000005\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"0\r\nX: a\r\r\n\r\n",
        ];
        for body in good {
            let mut s = ChunkScan::default();
            assert_eq!(
                s.scan(body),
                Some(body.len()),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert!(s.done && !s.bad);
        }
        let req = b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n\r\npedia\r\n0\r\nTrailer: a\r\n\r\nNEXT";
        assert_eq!(request_end(req, 1024), Err(check::BAD_HEAD));
    }
}
