//! Reading configuration files: the main file, its `include`s (TOML, or Istio YAML
//! manifests and folders of them), parse errors with locations. Reads files; never opens
//! sockets and never judges what the settings mean.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::de::DeserializeOwned;

use super::error::{at, line_col, ConfigError};
use super::istio;
use super::schema::{
    self, AccessList, AuthorizationPolicy, DestinationRule, Gateway, Mesh, RateLimitPolicy,
    RequestAuthentication, ServiceEntry, VirtualService,
};

/// How a file is written: Portico's TOML, or Istio YAML manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
}

impl Format {
    /// By the file name: `.yaml` and `.yml` are Istio manifests, anything else TOML.
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Format::Yaml,
            _ => Format::Toml,
        }
    }
}

/// A file that went into a Document, kept so errors found later can be located in it.
#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
    pub format: Format,
}

impl SourceFile {
    /// An error at field `path` of this file. In YAML the path starts with the document:
    /// `documents[2].spec.http[0]`.
    pub fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        if self.format == Format::Toml {
            return at(&self.path, &self.text, path, message);
        }
        let (line, column) = yaml_location(&self.text, path)
            .map(|offset| line_col(&self.text, offset))
            .unwrap_or((1, 1));
        ConfigError {
            file: self.path.clone(),
            line,
            column,
            path: path.to_string(),
            message: message.into(),
        }
    }

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
        self.file.error(&format!("{}{}", self.path, sub), message)
    }
}

/// A resource with its origin.
#[derive(Debug, Clone)]
pub struct Item<T> {
    /// Shared with the load `Cache`: an unchanged file's items are the same `Arc`s.
    pub spec: Arc<T>,
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
    pub rate_limits: Vec<Item<RateLimitPolicy>>,
    pub access_lists: Vec<Item<AccessList>>,
    pub request_authentications: Vec<Item<RequestAuthentication>>,
    pub authorization_policies: Vec<Item<AuthorizationPolicy>>,
    /// Notes found while reading: skipped manifests, unsupported fields in YAML.
    pub warnings: Vec<ConfigError>,
}

/// What to load: a Portico config file, Istio YAML files or folders, or both.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML config (`run -c`). A `.yaml`/`.yml` file or a folder here is read as Istio
    /// manifests with the default mesh settings.
    pub config: Option<PathBuf>,
    /// `--istio` files and folders, read as if the config included them.
    pub istio: Vec<PathBuf>,
}

impl Sources {
    pub fn config(path: &Path) -> Sources {
        Sources {
            config: Some(path.to_path_buf()),
            istio: Vec::new(),
        }
    }

    /// The paths given, for watching and messages.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.config.iter().chain(&self.istio).cloned().collect()
    }
}

impl std::fmt::Display for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let roots: Vec<String> = self
            .roots()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        f.write_str(&roots.join(", "))
    }
}

/// A file's modification time, length and inode: what tells, without reading it, that a
/// file may have changed.
pub(crate) type FileStamp = (Option<SystemTime>, u64, u64);

pub(crate) fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks, so a swapped Kubernetes `..data` link changes the inode.
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len(), m.ino()))
}

/// Stamps taken once, before a build reads anything, by path. Each stage that checks
/// whether a file changed (load, the compile cache, certificate pairs) looks its stamp up
/// here instead of taking it again: a config with a thousand certificates watches a few
/// thousand files. A path not in it is stamped when asked for. Clones share the table.
#[derive(Default, Clone)]
pub struct Stamps(Arc<foldhash::HashMap<PathBuf, Option<FileStamp>>>);

impl Stamps {
    pub fn of(&self, path: &Path) -> Option<FileStamp> {
        match self.0.get(path) {
            Some(s) => *s,
            None => stamp(path),
        }
    }
}

impl FromIterator<(PathBuf, Option<FileStamp>)> for Stamps {
    fn from_iter<I: IntoIterator<Item = (PathBuf, Option<FileStamp>)>>(iter: I) -> Self {
        Stamps(Arc::new(iter.into_iter().collect()))
    }
}

/// Whether a file with stamp `s`, read at `read_at`, was last modified well before it was
/// read: then an unchanged stamp means unchanged content. (A file rewritten in place with
/// the same length within one timestamp tick of the read keeps its stamp; as git does for
/// its index, such a "racily clean" file is read and compared instead.)
pub(crate) fn settled(s: &Option<FileStamp>, read_at: SystemTime) -> bool {
    matches!(s, Some((Some(mtime), _, _)) if mtime
        .checked_add(std::time::Duration::from_secs(1))
        .is_some_and(|t| t <= read_at))
}

/// One file, parsed into the items a Document holds (a clone shares the specs). The `Cache` hands it out again while
/// the file's text is unchanged: a reload of a large config re-parses only what changed,
/// and the unchanged items keep their `Arc`s (which `compile::Cache` recognises).
#[derive(Clone)]
struct Parsed {
    file: Arc<SourceFile>,
    /// The file's stamp just before it was read, and when that was.
    stamp: Option<FileStamp>,
    read_at: SystemTime,
    mesh: Option<Arc<Mesh>>,
    gateways: Vec<Item<Gateway>>,
    virtual_services: Vec<Item<VirtualService>>,
    destination_rules: Vec<Item<DestinationRule>>,
    service_entries: Vec<Item<ServiceEntry>>,
    rate_limits: Vec<Item<RateLimitPolicy>>,
    access_lists: Vec<Item<AccessList>>,
    request_authentications: Vec<Item<RequestAuthentication>>,
    authorization_policies: Vec<Item<AuthorizationPolicy>>,
    /// TOML `include` patterns.
    includes: Vec<String>,
    warnings: Vec<ConfigError>,
    errors: Vec<ConfigError>,
}

impl Parsed {
    fn toml(file: Arc<SourceFile>, content: schema::File) -> Parsed {
        fn items<T>(file: &Arc<SourceFile>, kind: &str, specs: Vec<T>) -> Vec<Item<T>> {
            specs
                .into_iter()
                .enumerate()
                .map(|(idx, spec)| Item {
                    spec: Arc::new(spec),
                    origin: Origin {
                        file: file.clone(),
                        path: format!("{kind}[{idx}]"),
                    },
                })
                .collect()
        }
        Parsed {
            stamp: None,
            read_at: SystemTime::UNIX_EPOCH,
            mesh: content.mesh.map(Arc::new),
            gateways: items(&file, "gateways", content.gateways),
            virtual_services: items(&file, "virtualServices", content.virtual_services),
            destination_rules: items(&file, "destinationRules", content.destination_rules),
            service_entries: items(&file, "serviceEntries", content.service_entries),
            rate_limits: items(&file, "rateLimits", content.rate_limits),
            access_lists: items(&file, "accessLists", content.access_lists),
            request_authentications: items(
                &file,
                "requestAuthentications",
                content.request_authentications,
            ),
            authorization_policies: items(
                &file,
                "authorizationPolicies",
                content.authorization_policies,
            ),
            includes: content.include,
            warnings: Vec::new(),
            errors: Vec::new(),
            file,
        }
    }

    fn yaml(file: Arc<SourceFile>, r: istio::Resources) -> Parsed {
        fn items<T>(file: &Arc<SourceFile>, specs: Vec<(String, T)>) -> Vec<Item<T>> {
            specs
                .into_iter()
                .map(|(path, spec)| Item {
                    spec: Arc::new(spec),
                    origin: Origin {
                        file: file.clone(),
                        path,
                    },
                })
                .collect()
        }
        Parsed {
            stamp: None,
            read_at: SystemTime::UNIX_EPOCH,
            mesh: None,
            gateways: items(&file, r.gateways),
            virtual_services: items(&file, r.virtual_services),
            destination_rules: items(&file, r.destination_rules),
            service_entries: items(&file, r.service_entries),
            rate_limits: items(&file, r.rate_limits),
            access_lists: items(&file, r.access_lists),
            request_authentications: items(&file, r.request_authentications),
            authorization_policies: items(&file, r.authorization_policies),
            includes: Vec::new(),
            warnings: r.warnings,
            errors: r.errors,
            file,
        }
    }
}

/// The files the last load parsed, by path. Passing the same Cache to every
/// `load_cached` makes a reload parse only the files whose text changed; it holds the
/// parsed items of the whole config (memory for speed: see bench/RESULTS.md).
#[derive(Default)]
pub struct Cache {
    files: HashMap<PathBuf, Arc<Parsed>>,
}

/// Loads the main file and everything it includes. Every file that can be read is parsed,
/// so one run reports the first error of each broken file.
pub fn load(main: &Path) -> Result<Document, Vec<ConfigError>> {
    load_sources(&Sources::config(main))
}

/// Loads a config file and Istio manifests. Without a TOML config the mesh settings are
/// the defaults and relative paths in them (the credentials folder) are relative to the
/// current directory.
pub fn load_sources(sources: &Sources) -> Result<Document, Vec<ConfigError>> {
    load_cached(sources, &mut Cache::default(), &Stamps::default())
}

/// `load_sources` that re-parses only the files whose text differs from what `cache` holds,
/// and leaves in `cache` the files read this time. `stamps` were taken before this load.
pub fn load_cached(
    sources: &Sources,
    cache: &mut Cache,
    stamps: &Stamps,
) -> Result<Document, Vec<ConfigError>> {
    let mut r = Reader {
        stamps,
        old: std::mem::take(&mut cache.files),
        fresh: HashMap::new(),
        seen: HashSet::new(),
        parsed: Vec::new(),
        include_dirs: Vec::new(),
        errors: Vec::new(),
    };
    let result = r.load(sources);
    cache.files = r.fresh;
    result
}

struct Reader<'s> {
    stamps: &'s Stamps,
    old: HashMap<PathBuf, Arc<Parsed>>,
    fresh: HashMap<PathBuf, Arc<Parsed>>,
    seen: HashSet<PathBuf>,
    parsed: Vec<Arc<Parsed>>,
    include_dirs: Vec<PathBuf>,
    errors: Vec<ConfigError>,
}

impl Reader<'_> {
    fn load(&mut self, sources: &Sources) -> Result<Document, Vec<ConfigError>> {
        let mut istio_roots: Vec<&Path> = sources.istio.iter().map(PathBuf::as_path).collect();
        let main_file = match &sources.config {
            Some(main) if Format::of(main) == Format::Toml && !main.is_dir() => {
                self.read_tree(main, None);
                if !self.errors.is_empty() {
                    return Err(std::mem::take(&mut self.errors));
                }
                match self.parsed.first() {
                    Some(p) => p.file.clone(),
                    None => {
                        return Err(vec![ConfigError::whole_file(
                            main,
                            "no configuration loaded",
                        )])
                    }
                }
            }
            other => {
                if let Some(p) = other {
                    istio_roots.insert(0, p.as_path());
                }
                // The defaults stand in for a main file; its folder is the current directory.
                Arc::new(SourceFile {
                    path: PathBuf::from("portico-defaults.toml"),
                    text: String::new(),
                    format: Format::Toml,
                })
            }
        };
        for root in istio_roots {
            self.read_istio(root);
        }
        let mut errors = std::mem::take(&mut self.errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut doc = Document {
            main: main_file.clone(),
            files: Vec::new(),
            include_dirs: std::mem::take(&mut self.include_dirs),
            mesh: Item {
                spec: Arc::new(Mesh::default()),
                origin: Origin {
                    file: main_file.clone(),
                    path: "mesh".into(),
                },
            },
            gateways: Vec::new(),
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            service_entries: Vec::new(),
            rate_limits: Vec::new(),
            access_lists: Vec::new(),
            request_authentications: Vec::new(),
            authorization_policies: Vec::new(),
            warnings: Vec::new(),
        };
        for (i, p) in self.parsed.iter().enumerate() {
            if let Some(mesh) = &p.mesh {
                if i == 0 && Arc::ptr_eq(&p.file, &main_file) {
                    doc.mesh.spec = mesh.clone();
                } else {
                    errors.push(at(
                        &p.file.path,
                        &p.file.text,
                        "mesh",
                        "[mesh] may only be set in the main config file",
                    ));
                }
            }
            doc.gateways.extend(p.gateways.iter().cloned());
            doc.virtual_services
                .extend(p.virtual_services.iter().cloned());
            doc.destination_rules
                .extend(p.destination_rules.iter().cloned());
            doc.service_entries
                .extend(p.service_entries.iter().cloned());
            doc.rate_limits.extend(p.rate_limits.iter().cloned());
            doc.access_lists.extend(p.access_lists.iter().cloned());
            doc.request_authentications
                .extend(p.request_authentications.iter().cloned());
            doc.authorization_policies
                .extend(p.authorization_policies.iter().cloned());
            doc.warnings.extend(p.warnings.iter().cloned());
            errors.extend(p.errors.iter().cloned());
            doc.files.push(p.file.clone());
        }
        if errors.is_empty() {
            Ok(doc)
        } else {
            Err(errors)
        }
    }

    /// The cached parse of `path` when the file is certainly unchanged without reading it:
    /// the same, settled stamp.
    fn unchanged(&mut self, path: &Path, now: &Option<FileStamp>) -> Option<Arc<Parsed>> {
        let p = self.old.get(path)?;
        if now.is_none() || p.stamp != *now || !settled(&p.stamp, p.read_at) {
            return None;
        }
        let p = p.clone();
        self.fresh.insert(path.to_path_buf(), p.clone());
        Some(p)
    }

    /// The parsed file at `path` with `text`: the cached one when the text is the same.
    fn parse(
        &mut self,
        path: &Path,
        text: String,
        stamp: Option<FileStamp>,
        read_at: SystemTime,
    ) -> Result<Arc<Parsed>, Vec<ConfigError>> {
        if let Some(p) = self.old.get(path).filter(|p| p.file.text == text) {
            // Same text: keep the parse, and the new stamp, so the next load may skip reading.
            let mut p = p.clone();
            if p.stamp != stamp {
                let mut fresh = Parsed::clone(&p);
                fresh.stamp = stamp;
                fresh.read_at = read_at;
                p = Arc::new(fresh);
            }
            self.fresh.insert(path.to_path_buf(), p.clone());
            return Ok(p);
        }
        let file = Arc::new(SourceFile {
            path: path.to_path_buf(),
            text,
            format: Format::of(path),
        });
        let mut parsed = if file.format == Format::Yaml {
            let resources = istio::read(&file);
            Parsed::yaml(file, resources)
        } else {
            let content = parse_toml_checked(&file)?;
            Parsed::toml(file, content)
        };
        parsed.stamp = stamp;
        parsed.read_at = read_at;
        let parsed = Arc::new(parsed);
        self.fresh.insert(path.to_path_buf(), parsed.clone());
        Ok(parsed)
    }

    fn read_tree(&mut self, path: &Path, included_from: Option<(&SourceFile, usize)>) {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if !self.seen.insert(canonical) {
            return; // included twice, or an include cycle: each file counts once
        }
        let (stamp, read_at) = (self.stamps.of(path), SystemTime::now());
        if let Some(parsed) = self.unchanged(path, &stamp) {
            self.push_parsed(parsed);
            return;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.errors.push(match included_from {
                    Some((parent, idx)) => at(
                        &parent.path,
                        &parent.text,
                        &format!("include[{idx}]"),
                        format!("cannot read included file {}: {e}", path.display()),
                    ),
                    None => ConfigError::whole_file(path, format!("cannot read config file: {e}")),
                });
                return;
            }
        };
        match self.parse(path, text, stamp, read_at) {
            Ok(p) => self.push_parsed(p),
            Err(e) => self.errors.extend(e),
        }
    }

    /// Takes a parsed file, and reads what it includes.
    fn push_parsed(&mut self, parsed: Arc<Parsed>) {
        self.parsed.push(parsed.clone());
        let file = &parsed.file;
        for (idx, pattern) in parsed.includes.iter().enumerate() {
            let full = file.resolve(pattern);
            let full_str = full.to_string_lossy();
            let is_glob = pattern.contains(['*', '?', '[']);
            if is_glob {
                if let Some(dir) = full.parent() {
                    self.include_dirs.push(dir.to_path_buf());
                }
            }
            let mut matches: Vec<PathBuf> = match glob::glob(&full_str) {
                Ok(paths) => paths.filter_map(Result::ok).collect(),
                Err(e) => {
                    self.errors.push(at(
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
                if m.is_dir() {
                    self.read_istio(&m);
                    continue;
                }
                self.read_tree(&m, Some((file, idx)));
            }
        }
    }

    /// Reads Istio manifests: a YAML file, or every `.yaml`/`.yml` file directly in a
    /// folder (in name order, as `kubectl apply -f DIR` does; subfolders are not read).
    fn read_istio(&mut self, path: &Path) {
        if !path.is_dir() {
            self.read_tree(path, None);
            return;
        }
        // A file added to or removed from the folder changes its mtime: watched for reload.
        self.include_dirs.push(path.to_path_buf());
        let mut files: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && Format::of(p) == Format::Yaml)
                .collect(),
            Err(e) => {
                self.errors.push(ConfigError::whole_file(
                    path,
                    format!("cannot read folder: {e}"),
                ));
                return;
            }
        };
        files.sort();
        for f in files {
            self.read_tree(&f, None);
        }
    }
}

/// A field path as serde_ignored reports it, written as the config paths are:
/// `http[0].match[1].sourceLabels`.
pub fn ignored_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => {
            let parent = ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// Where `documents[N].rest` is in a YAML text. A resource's `name` and `namespace` are
/// written in its metadata.
fn yaml_location(text: &str, path: &str) -> Option<usize> {
    let rest = path.strip_prefix("documents[")?;
    let (n, rest) = rest.split_once(']')?;
    let doc: usize = n.parse().ok()?;
    let rest = rest.strip_prefix('.').unwrap_or(rest);
    let rest = match rest {
        "spec.name" => "metadata.name",
        "spec.namespace" => "metadata.namespace",
        other => other,
    };
    super::yaml::locate(text, doc, rest)
}

/// Parses a TOML config file; a field the schema does not have is an error at its place.
fn parse_toml_checked(file: &SourceFile) -> Result<schema::File, Vec<ConfigError>> {
    let mut unknown = Vec::new();
    let content: schema::File =
        parse_toml_with(file, |p| unknown.push(ignored_path(&p))).map_err(|e| vec![e])?;
    if unknown.is_empty() {
        return Ok(content);
    }
    Err(unknown
        .iter()
        .map(|path| {
            let field = path.rsplit('.').next().unwrap_or(path);
            let field = field.split('[').next().unwrap_or(field);
            at(
                &file.path,
                &file.text,
                path,
                format!("unknown field `{field}`"),
            )
        })
        .collect())
}

/// Parses one TOML file into `T`, turning a serde error into a located ConfigError with
/// the field path serde was at; `ignored` hears of every field `T` does not have.
fn parse_toml_with<T: DeserializeOwned>(
    file: &SourceFile,
    mut ignored: impl FnMut(serde_ignored::Path<'_>),
) -> Result<T, ConfigError> {
    let parse =
        || toml::Deserializer::parse(&file.text).map_err(|e| toml_error(file, String::new(), e));
    let first = match T::deserialize(serde_ignored::Deserializer::new(parse()?, &mut ignored)) {
        Ok(content) => return Ok(content),
        Err(e) => e,
    };
    // Again, recording the path serde is at, only to say where the error is: tracking it
    // costs on every key of a file that is fine (a reload of a 230 KB include).
    match serde_path_to_error::deserialize::<_, T>(parse()?) {
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "?" || path == "." {
                String::new()
            } else {
                path
            };
            Err(toml_error(file, path, e.into_inner()))
        }
        Ok(_) => Err(toml_error(file, String::new(), first)),
    }
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
