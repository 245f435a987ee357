//! Reads the server name (SNI) out of a TLS ClientHello without terminating TLS. Works on
//! the bytes peeked so far and says how many it needs when they are not enough, so a
//! ClientHello split over several TLS records or several reads is handled. Never touches a
//! socket; never panics on any input.

/// The largest ClientHello Portico reads before giving up. Real ones are a few hundred
/// bytes (about 2 KiB with post-quantum key shares); 16 KiB is the TLS record limit.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// The most bytes `parse` ever asks for: a largest ClientHello plus room for the headers
/// of the records it may be split into.
pub const MAX_PEEK: usize = MAX_CLIENT_HELLO + 1024;

/// The record layer's own limit on a plaintext fragment (RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete ClientHello: its server name, lower-cased, if it sent one.
    Hello { sni: Option<String> },
    /// Not enough bytes yet: peek until the buffer holds this many in total.
    NeedBytes(usize),
    /// Not a TLS ClientHello, or a malformed one.
    Invalid(&'static str),
}

/// Parses the TLS records at the start of `buf` as far as the first handshake message.
pub fn parse(buf: &[u8]) -> Parsed {
    // The handshake message may span records: gather the fragments of each record into
    // one message, reading record headers as they come.
    let mut message: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        if at + RECORD_HEADER > MAX_PEEK {
            return Parsed::Invalid("ClientHello too large");
        }
        let Some(header) = buf.get(at..at + RECORD_HEADER) else {
            return Parsed::NeedBytes(at + RECORD_HEADER);
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Parsed::Invalid(if at == 0 {
                "not a TLS handshake"
            } else {
                "a non-handshake record inside the ClientHello"
            });
        }
        if header[1] != 3 {
            return Parsed::Invalid("unsupported TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Parsed::Invalid("bad TLS record length");
        }
        let body_start = at + RECORD_HEADER;
        let end = body_start + len;
        if end > MAX_PEEK {
            return Parsed::Invalid("ClientHello too large");
        }
        let Some(fragment) = buf.get(body_start..end) else {
            return Parsed::NeedBytes(end);
        };
        at = end;
        // Almost every ClientHello fits one record: parse it in place, copying only when
        // the message continues in the next record.
        let whole = if message.is_empty() {
            fragment
        } else {
            message.extend_from_slice(fragment);
            &message
        };
        match handshake_message(whole) {
            Some(done) => return done,
            None if message.is_empty() => message.extend_from_slice(fragment),
            None => {}
        }
    }
}

/// The ClientHello in `message` (handshake header included), or `None` while incomplete.
fn handshake_message(message: &[u8]) -> Option<Parsed> {
    if message.len() < 4 {
        return None;
    }
    if message[0] != HANDSHAKE_CLIENT_HELLO {
        return Some(Parsed::Invalid(
            "the first handshake message is not a ClientHello",
        ));
    }
    let hello_len =
        (usize::from(message[1]) << 16) | (usize::from(message[2]) << 8) | usize::from(message[3]);
    if hello_len > MAX_CLIENT_HELLO {
        return Some(Parsed::Invalid("ClientHello too large"));
    }
    let body = message.get(4..4 + hello_len)?;
    Some(match client_hello(body) {
        Ok(sni) => Parsed::Hello { sni },
        Err(why) => Parsed::Invalid(why),
    })
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.data.len() < n {
            return Err("truncated ClientHello");
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], &'static str> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Result<&'a [u8], &'static str> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// The body of a ClientHello (RFC 8446 §4.1.2): finds the server_name extension.
fn client_hello(body: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { data: body };
    let version = r.u16()?;
    if version >> 8 != 3 {
        return Err("unsupported ClientHello version");
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err("session id longer than 32 bytes");
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("bad cipher suite list");
    }
    if r.vec8()?.is_empty() {
        return Err("no compression methods");
    }
    if r.data.is_empty() {
        // A ClientHello without extensions (TLS 1.0 era) has no SNI.
        return Ok(None);
    }
    let mut exts = Reader { data: r.vec16()? };
    if !r.data.is_empty() {
        return Err("bytes after the extensions");
    }
    let mut sni = None;
    while !exts.data.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind == EXT_SERVER_NAME {
            if sni.is_some() {
                return Err("two server_name extensions");
            }
            sni = server_name(data)?;
        }
    }
    Ok(sni)
}

/// The server_name extension (RFC 6066 §3): the first host_name entry.
fn server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { data };
    let mut list = Reader { data: r.vec16()? };
    if !r.data.is_empty() {
        return Err("bytes after the server name list");
    }
    while !list.data.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind != NAME_TYPE_HOST {
            continue;
        }
        return host_name(name).map(Some);
    }
    Ok(None)
}

/// A DNS name as a client may send it: ASCII letters, digits, `-`, `_` and dots, at most
/// 253 characters once a trailing dot is dropped. Returned lower-cased.
fn host_name(raw: &[u8]) -> Result<String, &'static str> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 253 {
        return Err("bad server name length");
    }
    if !raw
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err("server name is not a DNS name");
    }
    if raw.starts_with(b".") || raw.ends_with(b".") || raw.windows(2).any(|w| w == b"..") {
        return Err("server name has an empty label");
    }
    Ok(raw
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello handshake message (without record header) with the given extensions.
    fn hello_message(extensions: Option<Vec<u8>>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]); // random
        body.push(0); // empty session id
        body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]); // two cipher suites
        body.extend([1, 0]); // null compression
        if let Some(ext) = extensions {
            body.extend((ext.len() as u16).to_be_bytes());
            body.extend(ext);
        }
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    fn sni_extension(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![NAME_TYPE_HOST];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend(entry);
        let mut ext = EXT_SERVER_NAME.to_be_bytes().to_vec();
        ext.extend((list.len() as u16).to_be_bytes());
        ext.extend(list);
        ext
    }

    fn other_extension(kind: u16, len: usize) -> Vec<u8> {
        let mut ext = kind.to_be_bytes().to_vec();
        ext.extend((len as u16).to_be_bytes());
        ext.extend(vec![0xab; len]);
        ext
    }

    /// Wraps a handshake message in records of at most `chunk` bytes each.
    fn records(message: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in message.chunks(chunk) {
            out.extend([CONTENT_HANDSHAKE, 3, 1]);
            out.extend((part.len() as u16).to_be_bytes());
            out.extend(part);
        }
        out
    }

    fn with_sni(name: &str) -> Vec<u8> {
        let mut ext = other_extension(0x000a, 6);
        ext.extend(sni_extension(name.as_bytes()));
        ext.extend(other_extension(0x002b, 3));
        records(&hello_message(Some(ext)), MAX_RECORD)
    }

    #[test]
    fn finds_the_server_name() {
        assert_eq!(
            parse(&with_sni("A.Example.COM")),
            Parsed::Hello {
                sni: Some("a.example.com".into())
            }
        );
        assert_eq!(
            parse(&with_sni("b.example.com.")),
            Parsed::Hello {
                sni: Some("b.example.com".into())
            }
        );
    }

    #[test]
    fn asks_for_exactly_the_bytes_it_needs() {
        let full = with_sni("a.example.com");
        assert_eq!(parse(&[]), Parsed::NeedBytes(5));
        assert_eq!(parse(&full[..3]), Parsed::NeedBytes(5));
        assert_eq!(parse(&full[..5]), Parsed::NeedBytes(full.len()));
        assert_eq!(
            parse(&full[..full.len() - 1]),
            Parsed::NeedBytes(full.len())
        );
        // Whatever follows the ClientHello (early data, say) is not its concern.
        let mut more = full.clone();
        more.extend([23, 3, 3, 0, 1, 0]);
        assert!(matches!(parse(&more), Parsed::Hello { .. }));
    }

    #[test]
    fn reassembles_a_hello_split_over_records() {
        let mut ext = other_extension(0x0015, 700); // padding pushes SNI past a record
        ext.extend(sni_extension(b"split.example.com"));
        let msg = hello_message(Some(ext));
        for chunk in [1, 3, 4, 5, 100, 512] {
            let wire = records(&msg, chunk);
            // Feed it the way peeking does: grow the buffer to what parse asks for.
            let mut have = 0;
            let result = loop {
                match parse(&wire[..have]) {
                    Parsed::NeedBytes(n) => {
                        assert!(n > have && n <= wire.len(), "chunk {chunk}: asked {n}");
                        have = n;
                    }
                    other => break other,
                }
            };
            assert_eq!(
                result,
                Parsed::Hello {
                    sni: Some("split.example.com".into())
                },
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn no_sni_is_a_hello_without_a_name() {
        let wire = records(&hello_message(Some(other_extension(0x000a, 4))), MAX_RECORD);
        assert_eq!(parse(&wire), Parsed::Hello { sni: None });
        let wire = records(&hello_message(None), MAX_RECORD);
        assert_eq!(parse(&wire), Parsed::Hello { sni: None });
    }

    #[test]
    fn rejects_what_is_not_a_client_hello() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Parsed::Invalid("not a TLS handshake")
        );
        // SSLv2-compatible hello.
        assert!(matches!(parse(&[0x80, 0x2e, 1, 3, 1]), Parsed::Invalid(_)));
        // A zero-length record.
        assert!(matches!(parse(&[22, 3, 1, 0, 0]), Parsed::Invalid(_)));
        // A record over the limit.
        assert!(matches!(parse(&[22, 3, 1, 0x48, 0x01]), Parsed::Invalid(_)));
        // A ServerHello.
        let mut msg = hello_message(None);
        msg[0] = 2;
        assert!(matches!(
            parse(&records(&msg, MAX_RECORD)),
            Parsed::Invalid(_)
        ));
        // A ClientHello that claims to be larger than we read.
        let huge = [22, 3, 1, 0, 4, 1, 0x01, 0, 0];
        assert_eq!(parse(&huge), Parsed::Invalid("ClientHello too large"));
    }

    #[test]
    fn rejects_malformed_lengths_and_names() {
        // Extensions length larger than the message.
        let mut msg = hello_message(Some(sni_extension(b"a.test")));
        let ext_len_at = msg.len() - sni_extension(b"a.test").len() - 2;
        msg[ext_len_at + 1] += 1;
        assert_eq!(
            parse(&records(&msg, MAX_RECORD)),
            Parsed::Invalid("truncated ClientHello")
        );
        for bad in [&b"a b.test"[..], b"", b"a..test", b".a.test", b"\xffa.test"] {
            let wire = records(&hello_message(Some(sni_extension(bad))), MAX_RECORD);
            assert!(matches!(parse(&wire), Parsed::Invalid(_)), "{bad:?}");
        }
        let long = vec![b'a'; 300];
        let wire = records(&hello_message(Some(sni_extension(&long))), MAX_RECORD);
        assert!(matches!(parse(&wire), Parsed::Invalid(_)));
        // Two server_name extensions.
        let mut ext = sni_extension(b"a.test");
        ext.extend(sni_extension(b"b.test"));
        let wire = records(&hello_message(Some(ext)), MAX_RECORD);
        assert_eq!(parse(&wire), Parsed::Invalid("two server_name extensions"));
    }

    /// Found by the client_hello fuzz target: `split.example.co..` was read as
    /// `split.example.co.`, a name with an empty label and a trailing dot (only one
    /// trailing dot, the root's, is dropped).
    #[test]
    fn two_trailing_dots_are_an_empty_label() {
        for bad in [&b"split.example.co.."[..], b"a..", b".."] {
            let wire = records(&hello_message(Some(sni_extension(bad))), 16);
            assert_eq!(
                parse(&wire),
                Parsed::Invalid("server name has an empty label"),
                "{bad:?}"
            );
        }
        let wire = records(&hello_message(Some(sni_extension(b"a.test."))), 16);
        assert_eq!(
            parse(&wire),
            Parsed::Hello {
                sni: Some("a.test".into())
            }
        );
    }

    #[test]
    fn every_prefix_and_every_byte_flip_is_handled_without_panicking() {
        let full = with_sni("fuzz.example.com");
        for n in 0..full.len() {
            let _ = parse(&full[..n]);
        }
        for i in 0..full.len() {
            for bit in 0..8 {
                let mut b = full.clone();
                b[i] ^= 1 << bit;
                match parse(&b) {
                    Parsed::NeedBytes(n) => assert!(n <= MAX_PEEK),
                    Parsed::Hello { .. } | Parsed::Invalid(_) => {}
                }
            }
        }
    }
}
