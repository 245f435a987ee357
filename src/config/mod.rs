//! Configuration: schema (serde structs with Istio's names), load (files, includes, Istio
//! YAML manifests), compile (Document → Snapshot), convert (back to TOML). Never touches a
//! listening socket.

pub mod compile;
pub mod convert;
pub mod duration;
pub mod error;
pub mod istio;
pub mod load;
pub mod schema;
mod yaml;

pub use compile::{compile, compile_cached, Compiled, Options};
pub use error::{ConfigError, ConfigErrors};
pub use load::{load, load_sources, Document, Sources};

/// Loads and compiles in one step.
pub fn build(path: &std::path::Path, opts: &Options) -> Result<Compiled, Vec<ConfigError>> {
    let doc = load(path)?;
    compile(&doc, opts)
}

/// What one build keeps for the next: parsed files and compiled routes (see
/// `load::Cache` and `compile::Cache`).
#[derive(Default)]
pub struct Cache {
    load: load::Cache,
    compile: compile::Cache,
}

/// `build_sources` that re-parses only changed files and recompiles only what they
/// changed; the Reloader keeps one Cache for its whole life. `stamps` are the files' stamps
/// taken before this build (see `load::Stamps`); files not in it are stamped as needed.
pub fn build_cached(
    sources: &Sources,
    opts: &Options,
    cache: &mut Cache,
    stamps: &load::Stamps,
) -> Result<Compiled, Vec<ConfigError>> {
    let started = std::time::Instant::now();
    let doc = load::load_cached(sources, &mut cache.load, stamps)?;
    let loaded = started.elapsed();
    let compiled = compile::compile_cached(&doc, opts, &mut cache.compile, stamps.clone());
    let compiled_at = started.elapsed();
    drop(doc);
    tracing::debug!(
        load_ms = loaded.as_millis() as u64,
        compile_ms = (compiled_at - loaded).as_millis() as u64,
        drop_ms = (started.elapsed() - compiled_at).as_millis() as u64,
        "config built"
    );
    compiled
}

/// Loads and compiles a config file and Istio manifests in one step.
pub fn build_sources(sources: &Sources, opts: &Options) -> Result<Compiled, Vec<ConfigError>> {
    let doc = load_sources(sources)?;
    compile(&doc, opts)
}
