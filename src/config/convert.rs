//! `portico convert`: a loaded Document written back as one Portico TOML file, with Istio
//! YAML manifests in their resolved form (namespaces kept, short names made full, sidecar-
//! only rules left out), so that compiling the output gives the same Snapshot. Pure: no
//! files, no sockets.

use super::load::{Document, Format};
use super::schema;

/// The Document as a TOML config file. Includes are flattened into it; relative file paths
/// (certificates, `credentialsDir`) are kept as written, so write the output beside its
/// inputs.
pub fn to_toml(doc: &Document) -> Result<String, String> {
    let main_is_config = doc.main.format == Format::Toml && !doc.main.text.is_empty();
    let file = schema::File {
        include: Vec::new(),
        mesh: main_is_config.then(|| doc.mesh.spec.clone()),
        gateways: doc.gateways.iter().map(|i| i.spec.clone()).collect(),
        virtual_services: doc.virtual_services.iter().map(|i| i.spec.clone()).collect(),
        destination_rules: doc
            .destination_rules
            .iter()
            .map(|i| i.spec.clone())
            .collect(),
        service_entries: doc.service_entries.iter().map(|i| i.spec.clone()).collect(),
    };
    let body = toml::to_string(&file).map_err(|e| format!("cannot write TOML: {e}"))?;
    let mut out = String::from("# Written by `portico convert` from:\n");
    for f in &doc.files {
        out.push_str(&format!("#   {}\n", f.path.display()));
    }
    out.push('\n');
    out.push_str(&body);
    Ok(out)
}
