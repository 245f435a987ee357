//! Configuration errors that carry their location: file, line, column and field path.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in the configuration, printed as `file:line:col: field.path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// A problem with a file or folder as a whole (cannot be read, holds nothing): at 1:1.
    pub fn whole_file(file: &Path, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
            path: String::new(),
            message: message.into(),
        }
    }
}

/// Several errors, printed one per line.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// 1-based line and column (in characters) of a byte offset in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

/// Finds where a field path such as `virtualServices[2].http[0].route[1].weight` is written
/// in a TOML text: the byte offset of the deepest part of the path that exists there.
/// Used only on the error path, so it re-parses the text.
pub fn locate(text: &str, path: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut node = Node::Table(doc.as_table());
    let mut best = None;
    for segment in split_path(path) {
        let Some((next, span)) = node.child(&segment) else {
            break;
        };
        if let Some(span) = span {
            best = Some(span.start);
        }
        node = next;
    }
    best
}

#[derive(Debug, PartialEq)]
pub(crate) enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

pub(crate) fn split_path(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(end) = rest.find(']') {
            if let Ok(i) = rest[1..end].parse() {
                out.push(Segment::Index(i));
            }
            rest = &rest[end + 1..];
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a toml_edit::Table),
    Tables(&'a toml_edit::ArrayOfTables),
    Value(&'a toml_edit::Value),
}

impl<'a> Node<'a> {
    fn from_item(item: &'a toml_edit::Item) -> Option<Self> {
        match item {
            toml_edit::Item::Table(t) => Some(Node::Table(t)),
            toml_edit::Item::ArrayOfTables(a) => Some(Node::Tables(a)),
            toml_edit::Item::Value(v) => Some(Node::Value(v)),
            toml_edit::Item::None => None,
        }
    }

    fn child(self, segment: &Segment<'_>) -> Option<(Node<'a>, Option<std::ops::Range<usize>>)> {
        match (self, segment) {
            (Node::Table(t), Segment::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                let span = key.span().or_else(|| item.span());
                Some((Node::from_item(item)?, span))
            }
            (Node::Value(toml_edit::Value::InlineTable(t)), Segment::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                let value = item.as_value()?;
                Some((Node::Value(value), key.span().or_else(|| value.span())))
            }
            (Node::Tables(a), Segment::Index(i)) => {
                let t = a.get(*i)?;
                Some((Node::Table(t), t.span()))
            }
            (Node::Value(toml_edit::Value::Array(a)), Segment::Index(i)) => {
                let v = a.get(*i)?;
                Some((Node::Value(v), v.span()))
            }
            _ => None,
        }
    }
}

/// Builds a located error for `path` inside the file `file` whose text is `text`.
pub fn at(file: &Path, text: &str, path: &str, message: impl Into<String>) -> ConfigError {
    let (line, column) = locate(text, path)
        .map(|offset| line_col(text, offset))
        .unwrap_or((1, 1));
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        path: path.to_string(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[mesh]\nadmin = \"x\"\n\n[[virtualServices]]\nname = \"a\"\n[[virtualServices]]\nname = \"b\"\n[[virtualServices.http]]\nroute = [\n  { destination = { host = \"h\" }, weight = 3 },\n  { destination = { host = \"h\" }, weight = -1 },\n]\n";

    #[test]
    fn locates_nested_inline_values() {
        let e = at(
            Path::new("f.toml"),
            TEXT,
            "virtualServices[1].http[0].route[1].weight",
            "bad",
        );
        assert_eq!((e.line, e.column), (11, 35));
        assert_eq!(
            e.to_string(),
            "f.toml:11:35: virtualServices[1].http[0].route[1].weight: bad"
        );
    }

    #[test]
    fn falls_back_to_deepest_existing_part() {
        let e = at(
            Path::new("f.toml"),
            TEXT,
            "virtualServices[1].http[0].missing",
            "bad",
        );
        assert_eq!(e.line, 8);
        let e = at(Path::new("f.toml"), TEXT, "mesh.admin", "bad");
        assert_eq!((e.line, e.column), (2, 1));
    }
}
