//! The parsed TOML document with its source spans, used to point every configuration problem at
//! a line and a dotted key path.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One step of a [`KeyPath`]: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// Dotted path of a key in the document, e.g. `class.web.shadows` or `protect[1].match`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The document root.
    pub(super) fn root() -> Self {
        Self::default()
    }

    /// This path extended by a table key.
    pub(super) fn key(&self, key: &str) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.to_owned()));
        next
    }

    /// This path extended by an array index (0-based, as in most path notations).
    pub(super) fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }
}

/// A key can be written bare in TOML (and so in our messages) only if it uses these characters.
fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    if is_bare_key(key) {
                        f.write_str(key)?;
                    } else {
                        // Debug quoting escapes like a TOML basic string for printable text.
                        write!(f, "{key:?}")?;
                    }
                }
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A syntactically valid TOML document with the spans of every key and value.
pub(super) struct Document<'i> {
    root: DeTable<'i>,
    /// Byte offset at which each line starts; `line_starts[0] == 0`.
    line_starts: Vec<usize>,
    len: usize,
}

/// 1-based line and column of a byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Position {
    pub(super) line: usize,
    pub(super) column: usize,
}

impl<'i> Document<'i> {
    /// Parses `text` as TOML; fails on the first syntax error (duplicate keys included).
    pub(super) fn parse(text: &'i str) -> Result<Self, toml::de::Error> {
        Ok(Self {
            root: DeTable::parse(text)?.into_inner(),
            line_starts: line_starts(text),
            len: text.len(),
        })
    }

    /// Position of byte `offset` in `text`, for a text that did not parse.
    pub(super) fn position_in(text: &str, offset: usize) -> Position {
        position(&line_starts(text), text.len(), offset)
    }

    /// The top-level table.
    pub(super) fn root(&self) -> &DeTable<'i> {
        &self.root
    }

    /// The 1-based line holding byte `offset`.
    pub(super) fn line_of(&self, offset: usize) -> usize {
        position(&self.line_starts, self.len, offset).line
    }

    /// Line of the key at `path`; if the key is absent (a default applies), the line of its
    /// nearest ancestor present in the file, or 1 for the top level.
    pub(super) fn line_for(&self, path: &KeyPath) -> usize {
        let mut offset = 0;
        // `None` stands for the root table, which is not wrapped in a `DeValue`.
        let mut current: Option<&DeValue<'i>> = None;
        for segment in &path.0 {
            // A table entry is located by its key, an array element by its value.
            let found = match (segment, current) {
                (Segment::Key(key), None) => self
                    .root
                    .get_key_value(key.as_str())
                    .map(|(k, v)| (k.span().start, v)),
                (Segment::Key(key), Some(DeValue::Table(table))) => table
                    .get_key_value(key.as_str())
                    .map(|(k, v)| (k.span().start, v)),
                (Segment::Index(index), Some(DeValue::Array(items))) => {
                    items.get(*index).map(|v| (v.span().start, v))
                }
                _ => None,
            };
            let Some((start, value)) = found else { break };
            offset = start;
            current = Some(value.get_ref());
        }
        self.line_of(offset)
    }

    /// Dotted path of the deepest key whose key or value span holds byte `offset`.
    pub(super) fn path_at(&self, offset: usize) -> Option<KeyPath> {
        find_in_table(self.root(), offset, &KeyPath::root())
    }
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end
}

fn find_in_table(table: &DeTable<'_>, offset: usize, base: &KeyPath) -> Option<KeyPath> {
    table.iter().find_map(|(key, value)| {
        let path = base.key(key.get_ref());
        // Header tables' spans do not always enclose their keys, so always look inside first.
        find_in_value(value, offset, &path)
            .or_else(|| contains(&key.span(), offset).then(|| path.clone()))
    })
}

fn find_in_value(value: &Spanned<DeValue<'_>>, offset: usize, path: &KeyPath) -> Option<KeyPath> {
    let inner = match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, offset, path),
        DeValue::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_in_value(item, offset, &path.index(i))),
        _ => None,
    };
    inner.or_else(|| contains(&value.span(), offset).then(|| path.clone()))
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

fn position(line_starts: &[usize], len: usize, offset: usize) -> Position {
    let offset = offset.min(len);
    // Number of lines starting at or before `offset`; at least 1 since line 1 starts at 0.
    let line = line_starts.partition_point(|&start| start <= offset).max(1);
    let column = offset - line_starts[line - 1] + 1;
    Position { line, column }
}
