//! Codecs: the HTTP/1.1 framing of Portico's own codecs, and how a connection is lent to
//! pingora's (pingora's own codecs stay in pingora). What a request may do is decided in
//! `proxy`; codecs move bytes.

pub mod h1;
pub mod lend;
