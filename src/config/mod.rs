//! Configuration: schema (serde structs with Istio's names), load (files, includes, Istio
//! YAML manifests), compile (Document → Snapshot), convert (back to TOML). Never touches a
//! listening socket.

pub mod compile;
pub mod convert;
pub mod duration;
mod egress;
pub mod error;
pub mod istio;
pub mod load;
pub mod schema;
mod yaml;

pub use compile::{compile, Compiled, Options};
pub use error::{ConfigError, ConfigErrors};
pub use load::{load, load_sources, Document, Sources};

/// Loads and compiles in one step.
pub fn build(path: &std::path::Path, opts: &Options) -> Result<Compiled, Vec<ConfigError>> {
    let doc = load(path)?;
    compile(&doc, opts)
}

/// Loads and compiles a config file and Istio manifests in one step.
pub fn build_sources(sources: &Sources, opts: &Options) -> Result<Compiled, Vec<ConfigError>> {
    let doc = load_sources(sources)?;
    compile(&doc, opts)
}
