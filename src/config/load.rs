//! Reading configuration files: the main file, its `include`s, parse errors with locations.
//! Reads files; never opens sockets and never judges what the settings mean.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::error::{at, line_col, ConfigError};
use super::schema::{self, DestinationRule, Gateway, Mesh, ServiceEntry, VirtualService};

/// A file that went into a Document, kept so errors found later can be located in it.
#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Resolves a path written in this file: relative paths are relative to the file.
    pub fn resolve(&self, written: &str) -> PathBuf {
        let p = Path::new(written);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir().join(p)
        }
    }
}

/// Where a resource was written: its file and its field path there (`gateways[1]`).
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: Arc<SourceFile>,
    pub path: String,
}

impl Origin {
    /// An error at `self.path` + `sub` (for example `.http[0].timeout`).
    pub fn error(&self, sub: &str, message: impl Into<String>) -> ConfigError {
        at(
            &self.file.path,
            &self.file.text,
            &format!("{}{}", self.path, sub),
            message,
        )
    }
}

/// A resource with its origin.
#[derive(Debug, Clone)]
pub struct Item<T> {
    pub spec: T,
    pub origin: Origin,
}

/// Everything the files say, merged, still in Istio's terms.
#[derive(Debug)]
pub struct Document {
    pub main: Arc<SourceFile>,
    pub files: Vec<Arc<SourceFile>>,
    /// Folders that `include` globs read: a file added there is a change.
    pub include_dirs: Vec<PathBuf>,
    pub mesh: Item<Mesh>,
    pub gateways: Vec<Item<Gateway>>,
    pub virtual_services: Vec<Item<VirtualService>>,
    pub destination_rules: Vec<Item<DestinationRule>>,
    pub service_entries: Vec<Item<ServiceEntry>>,
}

/// Loads the main file and everything it includes. Every file that can be read is parsed,
/// so one run reports the first error of each broken file.
pub fn load(main: &Path) -> Result<Document, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut parsed = Vec::new();
    let mut include_dirs = Vec::new();
    read_tree(
        main,
        None,
        &mut seen,
        &mut parsed,
        &mut include_dirs,
        &mut errors,
    );
    if !errors.is_empty() {
        return Err(errors);
    }
    let main_file = match parsed.first() {
        Some((f, _)) => f.clone(),
        None => {
            return Err(vec![ConfigError {
                file: main.to_path_buf(),
                line: 1,
                column: 1,
                path: String::new(),
                message: "no configuration loaded".into(),
            }])
        }
    };
    let mut doc = Document {
        main: main_file.clone(),
        files: Vec::new(),
        include_dirs,
        mesh: Item {
            spec: Mesh::default(),
            origin: Origin {
                file: main_file.clone(),
                path: "mesh".into(),
            },
        },
        gateways: Vec::new(),
        virtual_services: Vec::new(),
        destination_rules: Vec::new(),
        service_entries: Vec::new(),
    };
    for (i, (file, content)) in parsed.into_iter().enumerate() {
        if let Some(mesh) = content.mesh {
            if i == 0 {
                doc.mesh.spec = mesh;
            } else {
                errors.push(at(
                    &file.path,
                    &file.text,
                    "mesh",
                    "[mesh] may only be set in the main config file",
                ));
            }
        }
        let origin = |kind: &str, idx: usize| Origin {
            file: file.clone(),
            path: format!("{kind}[{idx}]"),
        };
        for (idx, spec) in content.gateways.into_iter().enumerate() {
            doc.gateways.push(Item {
                spec,
                origin: origin("gateways", idx),
            });
        }
        for (idx, spec) in content.virtual_services.into_iter().enumerate() {
            doc.virtual_services.push(Item {
                spec,
                origin: origin("virtualServices", idx),
            });
        }
        for (idx, spec) in content.destination_rules.into_iter().enumerate() {
            doc.destination_rules.push(Item {
                spec,
                origin: origin("destinationRules", idx),
            });
        }
        for (idx, spec) in content.service_entries.into_iter().enumerate() {
            doc.service_entries.push(Item {
                spec,
                origin: origin("serviceEntries", idx),
            });
        }
        doc.files.push(file);
    }
    if errors.is_empty() {
        Ok(doc)
    } else {
        Err(errors)
    }
}

fn read_tree(
    path: &Path,
    included_from: Option<(&SourceFile, usize)>,
    seen: &mut HashSet<PathBuf>,
    parsed: &mut Vec<(Arc<SourceFile>, schema::File)>,
    include_dirs: &mut Vec<PathBuf>,
    errors: &mut Vec<ConfigError>,
) {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if !seen.insert(canonical) {
        return; // included twice, or an include cycle: each file counts once
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(match included_from {
                Some((parent, idx)) => at(
                    &parent.path,
                    &parent.text,
                    &format!("include[{idx}]"),
                    format!("cannot read included file {}: {e}", path.display()),
                ),
                None => ConfigError {
                    file: path.to_path_buf(),
                    line: 1,
                    column: 1,
                    path: String::new(),
                    message: format!("cannot read config file: {e}"),
                },
            });
            return;
        }
    };
    let file = Arc::new(SourceFile {
        path: path.to_path_buf(),
        text,
    });
    let content: schema::File = match parse_toml(&file) {
        Ok(c) => c,
        Err(e) => {
            errors.push(e);
            return;
        }
    };
    let includes = content.include.clone();
    parsed.push((file.clone(), content));
    for (idx, pattern) in includes.iter().enumerate() {
        let full = file.resolve(pattern);
        let full_str = full.to_string_lossy();
        let is_glob = pattern.contains(['*', '?', '[']);
        if is_glob {
            if let Some(dir) = full.parent() {
                include_dirs.push(dir.to_path_buf());
            }
        }
        let mut matches: Vec<PathBuf> = match glob::glob(&full_str) {
            Ok(paths) => paths.filter_map(Result::ok).collect(),
            Err(e) => {
                errors.push(at(
                    &file.path,
                    &file.text,
                    &format!("include[{idx}]"),
                    format!("bad include pattern: {e}"),
                ));
                continue;
            }
        };
        matches.sort();
        if matches.is_empty() && !is_glob {
            matches.push(full.clone());
        }
        for m in matches {
            let ext = m.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == "yaml" || ext == "yml" {
                errors.push(at(
                    &file.path,
                    &file.text,
                    &format!("include[{idx}]"),
                    format!(
                        "{}: Istio YAML manifests are not supported yet; write the resource in TOML",
                        m.display()
                    ),
                ));
                continue;
            }
            read_tree(&m, Some((&file, idx)), seen, parsed, include_dirs, errors);
        }
    }
}

/// Parses one TOML file into `T`, turning a serde error into a located ConfigError with
/// the field path serde was at.
pub fn parse_toml<T: DeserializeOwned>(file: &SourceFile) -> Result<T, ConfigError> {
    let deserializer =
        toml::Deserializer::parse(&file.text).map_err(|e| toml_error(file, String::new(), e))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "?" || path == "." {
            String::new()
        } else {
            path
        };
        toml_error(file, path, e.into_inner())
    })
}

fn toml_error(file: &SourceFile, path: String, inner: toml::de::Error) -> ConfigError {
    {
        let (line, column) = match inner.span() {
            Some(span) => line_col(&file.text, span.start),
            None => {
                let located = at(&file.path, &file.text, &path, "");
                (located.line, located.column)
            }
        };
        ConfigError {
            file: file.path.clone(),
            line,
            column,
            path,
            message: inner.message().trim().to_string(),
        }
    }
}
