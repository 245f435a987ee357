//! Where a field path is written in a multi-document YAML text, for error locations.
//! Used only on the error path. Reads block-style YAML, as Kubernetes manifests are
//! written; inside a flow collection (`{...}`, `[...]`) it stops at the deepest key it
//! found, as the TOML locator does.

use super::error::{split_path, Segment};

/// One non-blank, non-comment line (or the part of a line after `- `): its byte offset in
/// the text, its column and its content.
#[derive(Clone, Copy, Debug)]
struct Line<'a> {
    offset: usize,
    col: usize,
    s: &'a str,
}

/// The lines of each document of a YAML stream, as serde_yaml numbers the documents:
/// `---` starts one; text before the first `---` is one only if it holds content.
fn documents(text: &str) -> Vec<Vec<Line<'_>>> {
    let mut docs: Vec<Vec<Line<'_>>> = Vec::new();
    let mut current: Vec<Line<'_>> = Vec::new();
    let mut explicit = false;
    let mut offset = 0;
    for raw in text.split_inclusive('\n') {
        let line = raw.trim_end_matches(['\n', '\r']);
        let start = offset;
        offset += raw.len();
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            if explicit || !current.is_empty() {
                docs.push(std::mem::take(&mut current));
            }
            explicit = true;
            continue;
        }
        let trimmed = line.trim_start_matches(' ');
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let col = line.len() - trimmed.len();
        current.push(Line {
            offset: start + col,
            col,
            s: trimmed.trim_end(),
        });
    }
    if !current.is_empty() {
        docs.push(current);
    }
    docs
}

/// The byte offset in `text` of `path` in document `doc` (0-based), e.g.
/// `spec.http[0].route[1].weight`, or of the deepest part of it that exists.
pub fn locate(text: &str, doc: usize, path: &str) -> Option<usize> {
    let docs = documents(text);
    let lines = docs.get(doc)?;
    let mut region: Vec<Line<'_>> = lines.clone();
    let mut best = region.first().map(|l| l.offset);
    let segments = split_path(path);
    for segment in &segments {
        let found = match segment {
            Segment::Key(k) => key(&region, k),
            Segment::Index(i) => item(&region, *i),
        };
        let Some((at, child)) = found else { break };
        best = Some(at);
        region = child;
        if region.is_empty() {
            break;
        }
    }
    best
}

/// `key:` at the region's indentation: its offset and the lines of its value.
fn key<'a>(region: &[Line<'a>], k: &str) -> Option<(usize, Vec<Line<'a>>)> {
    let indent = region.first()?.col;
    for (i, l) in region.iter().enumerate() {
        if l.col != indent {
            continue;
        }
        let Some(rest) = strip_key(l.s, k) else {
            continue;
        };
        let value = rest.trim_start();
        if !value.is_empty() && !value.starts_with('#') {
            // An inline value (a scalar or a flow collection) is not descended into.
            return Some((l.offset, Vec::new()));
        }
        let child: Vec<Line<'a>> = region[i + 1..]
            .iter()
            .take_while(|c| c.col > indent || (c.col == indent && is_item(c.s)))
            .copied()
            .collect();
        return Some((l.offset, child));
    }
    None
}

/// `rest` after `k:` when the line is that key (plain, or in single or double quotes).
fn strip_key<'a>(s: &'a str, k: &str) -> Option<&'a str> {
    for (open, close) in [("", ""), ("\"", "\""), ("'", "'")] {
        let Some(rest) = s.strip_prefix(open) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix(k) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix(close) else {
            continue;
        };
        let rest = rest.trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix(':') {
            if after.is_empty() || after.starts_with([' ', '\t']) {
                return Some(after);
            }
        }
    }
    None
}

fn is_item(s: &str) -> bool {
    s == "-" || s.starts_with("- ")
}

/// Item `i` of a block sequence: its offset and its lines, the first one starting after
/// the `- `.
fn item<'a>(region: &[Line<'a>], i: usize) -> Option<(usize, Vec<Line<'a>>)> {
    let first = region.first()?;
    if !is_item(first.s) {
        return None;
    }
    let indent = first.col;
    let starts: Vec<usize> = region
        .iter()
        .enumerate()
        .filter(|(_, l)| l.col == indent && is_item(l.s))
        .map(|(n, _)| n)
        .collect();
    let start = *starts.get(i)?;
    let end = starts.get(i + 1).copied().unwrap_or(region.len());
    let head = region[start];
    let after_dash = &head.s[1..];
    let content = after_dash.trim_start_matches(' ');
    let mut lines = Vec::new();
    if !content.is_empty() && !content.starts_with('#') {
        let skipped = head.s.len() - content.len();
        lines.push(Line {
            offset: head.offset + skipped,
            col: head.col + skipped,
            s: content,
        });
    }
    lines.extend(region[start + 1..end].iter().copied());
    Some((head.offset, lines))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::line_col;

    const TEXT: &str = "# leading comment\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  servers:\n  - port:\n      number: 80\n    hosts:\n    - \"*\"\n---\nkind: VirtualService\nspec:\n  hosts: [a, b]\n  http:\n    - match:\n        - headers:\n            end-user:\n              exact: jason\n      route:\n      - destination:\n          host: reviews\n        weight: 50\n---\n";

    fn at(doc: usize, path: &str) -> (usize, usize) {
        line_col(TEXT, locate(TEXT, doc, path).expect("located"))
    }

    #[test]
    fn finds_keys_items_and_nested_values() {
        assert_eq!(at(0, "spec.servers[0].port.number"), (9, 7));
        assert_eq!(at(0, "spec.servers[0].hosts[0]"), (11, 5));
        assert_eq!(at(0, "metadata.name"), (5, 3));
        assert_eq!(
            at(1, "spec.http[0].match[0].headers.end-user.exact"),
            (20, 15)
        );
        assert_eq!(at(1, "spec.http[0].route[0].weight"), (24, 9));
        assert_eq!(at(1, "spec.http[0].route[0].destination.host"), (23, 11));
    }

    #[test]
    fn stops_at_the_deepest_existing_part() {
        assert_eq!(at(1, "spec.http[0].route[0].destination.port"), (22, 9));
        assert_eq!(at(1, "spec.hosts[1]"), (15, 3));
        assert_eq!(at(0, "spec.servers[3]"), (7, 3));
        assert!(locate(TEXT, 2, "spec").is_none(), "the empty last document");
    }
}
