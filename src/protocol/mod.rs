//! Codecs: Portico's own HTTP/1.1 and h2 codecs (`fast`, the front every HTTP and HTTPS
//! listener connection meets), their HTTP/1.1 framing (`h1`), and how a connection is lent
//! to pingora's request cycle (`lend`; pingora's own codecs stay in pingora). What a request
//! may do is decided in `proxy` (the request core, `proxy::request`); codecs move bytes.

pub mod fast;
pub mod h1;
pub mod lend;
