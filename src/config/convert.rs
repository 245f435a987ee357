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
        mesh: main_is_config.then(|| (*doc.mesh.spec).clone()),
        gateways: doc.gateways.iter().map(|i| (*i.spec).clone()).collect(),
        virtual_services: doc
            .virtual_services
            .iter()
            .map(|i| (*i.spec).clone())
            .collect(),
        destination_rules: doc
            .destination_rules
            .iter()
            .map(|i| (*i.spec).clone())
            .collect(),
        service_entries: doc
            .service_entries
            .iter()
            .map(|i| (*i.spec).clone())
            .collect(),
        rate_limits: doc.rate_limits.iter().map(|i| (*i.spec).clone()).collect(),
        access_lists: doc.access_lists.iter().map(|i| (*i.spec).clone()).collect(),
        request_authentications: doc
            .request_authentications
            .iter()
            .map(|i| (*i.spec).clone())
            .collect(),
        authorization_policies: doc
            .authorization_policies
            .iter()
            .map(|i| (*i.spec).clone())
            .collect(),
    };
    let mut value = toml::Value::try_from(&file).map_err(|e| format!("cannot write TOML: {e}"))?;
    prune(&mut value);
    let body = toml::to_string(&value).map_err(|e| format!("cannot write TOML: {e}"))?;
    let mut out = String::from("# Written by `portico convert` from:\n");
    for f in &doc.files {
        out.push_str(&format!("#   {}\n", f.path.display()));
    }
    out.push('\n');
    out.push_str(&body);
    Ok(out)
}

/// Map-valued fields: empty means the same as absent.
const MAPS: [&str; 8] = [
    "selector",
    "labels",
    "headers",
    "withoutHeaders",
    "queryParams",
    "ports",
    "set",
    "add",
];

/// Booleans whose absence means false.
const FALSE_BY_DEFAULT: [&str; 4] = [
    "ignoreUriCase",
    "httpsRedirect",
    "defaultCertificate",
    "invert",
];

/// Drops what the schema fills in when absent (empty lists, empty maps, default falses), so
/// the output reads like a hand-written config. An empty struct is kept: its presence can
/// matter (`outlierDetection = {}` turns outlier detection on).
fn prune(v: &mut toml::Value) {
    match v {
        toml::Value::Table(t) => {
            t.retain(|k, v| {
                prune(v);
                match v {
                    toml::Value::Array(a) => !a.is_empty(),
                    toml::Value::Table(m) => !(m.is_empty() && MAPS.contains(&k)),
                    toml::Value::Boolean(false) => !FALSE_BY_DEFAULT.contains(&k),
                    _ => true,
                }
            });
        }
        toml::Value::Array(a) => a.iter_mut().for_each(prune),
        _ => {}
    }
}
