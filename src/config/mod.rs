//! Configuration: schema (serde structs with Istio's names), load (files, includes),
//! compile (Document → Snapshot). Never touches a listening socket.

pub mod compile;
pub mod duration;
mod egress;
pub mod error;
pub mod load;
pub mod schema;

pub use compile::{compile, Compiled, Options};
pub use error::{ConfigError, ConfigErrors};
pub use load::{load, Document};

/// Loads and compiles in one step.
pub fn build(path: &std::path::Path, opts: &Options) -> Result<Compiled, Vec<ConfigError>> {
    let doc = load(path)?;
    compile(&doc, opts)
}
