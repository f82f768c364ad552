//! Edits as data: the ops of Concord's HTTP API (`PATCH /v1/docs/{id}`,
//! `POST /v1/tx`) and the JSON value of a new document, applied to an
//! automerge transaction.
//!
//! An op names its target with a [path](Prop) from the document root and is
//! checked before automerge sees it: every element of the path but the last
//! must name an existing map or list, indexes must be in bounds and the
//! target must have the right type. A failed check is an [`OpError`] saying
//! which op failed and why; automerge's own errors and panics are contained
//! and reported as [`OpError::Automerge`]. On any error the caller discards
//! the whole automerge transaction, so ops applied before the failing one
//! never reach the document.
//!
//! JSON values become automerge values as follows: `null`, booleans and
//! strings become scalars; integers that fit an `i64` become `Int`, larger
//! ones `Uint`, other numbers `F64`; arrays become lists and objects maps,
//! recursively. Two objects with exactly one key are special:
//! `{"$counter": N}` (N an integer that fits an `i64`) is a counter and
//! `{"$text": "…"}` a text object with that content. Objects nest at most
//! [`MAX_DEPTH`] levels below the document root. [`crate::json::to_json`]
//! reads them back as plain JSON: counters as numbers, text as strings.
//!
//! ```
//! use concord_core::automerge::AutoCommit;
//! use concord_core::ops::{Op, apply_ops, write_root};
//!
//! let mut doc = AutoCommit::new();
//! write_root(&mut doc, &serde_json::json!({"todos": [], "views": {"$counter": 0}}))?;
//! let ops: Vec<Op> = serde_json::from_value(serde_json::json!([
//!     {"op": "insert", "path": ["todos", 0], "value": {"title": "milk", "done": false}},
//!     {"op": "set", "path": ["todos", 0, "done"], "value": true},
//!     {"op": "increment", "path": ["views"], "by": 2},
//! ]))?;
//! apply_ops(&mut doc, &ops)?;
//! assert_eq!(
//!     concord_core::json::to_json(&doc, None),
//!     serde_json::json!({"todos": [{"title": "milk", "done": true}], "views": 2}),
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::contain::contained;

/// How many levels of maps, lists and text objects a write may nest below
/// the document root: an object directly under the root is at level 1. A
/// value that would nest deeper is refused with [`OpError::InvalidValue`],
/// so that no request can build a document too deep to read back.
pub const MAX_DEPTH: usize = 64;

/// One element of a path: a map key or a list index.
///
/// In JSON a key is a string and an index a non-negative integer; any other
/// JSON value (a negative or fractional number, `null`, …) fails to
/// deserialize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prop {
    /// An index into a list, counted from 0.
    Index(usize),
    /// A key of a map.
    Key(String),
}

impl From<usize> for Prop {
    fn from(index: usize) -> Self {
        Self::Index(index)
    }
}

impl From<&str> for Prop {
    fn from(key: &str) -> Self {
        Self::Key(key.to_string())
    }
}

impl From<String> for Prop {
    fn from(key: String) -> Self {
        Self::Key(key)
    }
}

impl<'de> Deserialize<'de> for Prop {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PropVisitor;

        impl serde::de::Visitor<'_> for PropVisitor {
            type Value = Prop;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path element: a map key (a string) or a list index (an integer ≥ 0)")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Prop, E> {
                usize::try_from(v)
                    .map(Prop::Index)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Prop, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Prop, E> {
                Ok(Prop::Key(v.to_string()))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Prop, E> {
                Ok(Prop::Key(v))
            }
        }

        deserializer.deserialize_any(PropVisitor)
    }
}

/// An edit to a document: one row of the ops table of the HTTP API.
///
/// In JSON, an object whose `op` field names the variant in snake case, e.g.
/// `{"op":"set","path":["todos",0,"done"],"value":true}`. Unknown ops and
/// unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Op {
    /// Sets a map key (new or existing) or replaces a list element (the index
    /// must be below the list's length). JSON objects and arrays become new
    /// nested maps and lists.
    Set {
        /// The key or element to set; not empty.
        path: Vec<Prop>,
        /// The new value.
        value: Json,
    },
    /// Inserts into a list before the element at the index (the index may be
    /// the list's length, to append).
    Insert {
        /// The path of the list followed by the index.
        path: Vec<Prop>,
        /// The value to insert.
        value: Json,
    },
    /// Deletes an existing map key or list element.
    Delete {
        /// The key or element to delete; not empty.
        path: Vec<Prop>,
    },
    /// Adds to an existing counter.
    Increment {
        /// The path of the counter.
        path: Vec<Prop>,
        /// How much to add (negative to subtract).
        by: i64,
    },
    /// Edits a text object: deletes `delete` characters at `pos`, then
    /// inserts `insert` there.
    ///
    /// Positions and lengths are counted in the units of automerge's
    /// [`ReadDoc::text_encoding`], the same units [`ReadDoc::length`] reports
    /// for text. In this build that is Unicode code points (Rust `char`s,
    /// automerge's default without its `utf8-indexing` or `utf16-indexing`
    /// features): `"é"` and `"😀"` each count as one.
    SpliceText {
        /// The path of the text object.
        path: Vec<Prop>,
        /// Where to edit; at most the text's length.
        pos: usize,
        /// How many characters to delete from `pos`; `pos + delete` is at
        /// most the text's length. 0 if absent.
        #[serde(default)]
        delete: usize,
        /// What to insert at `pos`. Empty if absent.
        #[serde(default)]
        insert: String,
    },
}

/// Why an op failed. `op` is the index of the failing op in the request (0
/// for [`write_root`]); paths are rendered as JSON arrays, e.g.
/// `["todos",0,"done"]`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// The path cannot name a target of this op (for example the empty path,
    /// which names the document root, for `set` or `delete`).
    #[error("op {op}: invalid path: {reason}")]
    InvalidPath {
        /// The index of the op.
        op: usize,
        /// What is wrong with the path.
        reason: String,
    },
    /// A map key along the path, or the key that `delete` or `increment`
    /// targets, does not exist.
    #[error("op {op}: the document has no value at {path}")]
    PathNotFound {
        /// The index of the op.
        op: usize,
        /// The path up to and including the missing key.
        path: String,
    },
    /// The value at `path` has the wrong type for the op: descending into a
    /// scalar or text, a key on a list, an index on a map, inserting into a
    /// map, incrementing a non-counter, splicing a non-text.
    #[error("op {op}: expected {expected} at {path}, found {found}")]
    WrongType {
        /// The index of the op.
        op: usize,
        /// Where the value of the wrong type is.
        path: String,
        /// What the op needs there, e.g. `"a list"`.
        expected: &'static str,
        /// What is there, e.g. `"a map"` or `"a string"`.
        found: String,
    },
    /// An index or text position beyond the end of a list or text.
    #[error("op {op}: index {index} is out of range for {path}, which has length {len}")]
    IndexOutOfBounds {
        /// The index of the op.
        op: usize,
        /// The path of the list or text object.
        path: String,
        /// The index asked for (for `splice_text`, `pos` or `pos + delete`).
        index: usize,
        /// The length of the list or text.
        len: usize,
    },
    /// The value cannot be written: a malformed `{"$counter": …}` or
    /// `{"$text": …}`, a new document's value that is not a JSON object,
    /// nesting deeper than [`MAX_DEPTH`], or an increment that would
    /// overflow the counter.
    #[error("op {op}: invalid value: {reason}")]
    InvalidValue {
        /// The index of the op.
        op: usize,
        /// What is wrong with the value.
        reason: String,
    },
    /// automerge returned an error or panicked (the panic was contained).
    /// Checks before each call should prevent this; the transaction must be
    /// discarded.
    #[error("op {op}: automerge could not apply the op: {reason}")]
    Automerge {
        /// The index of the op.
        op: usize,
        /// automerge's error or panic message.
        reason: String,
    },
}

impl OpError {
    /// The error code for the HTTP API's `{"error":{"code",…}}`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidPath { .. } => "invalid_path",
            Self::PathNotFound { .. } => "path_not_found",
            Self::WrongType { .. } => "wrong_type",
            Self::IndexOutOfBounds { .. } => "index_out_of_bounds",
            Self::InvalidValue { .. } => "invalid_value",
            Self::Automerge { .. } => "invalid_op",
        }
    }

    /// The index of the failing op in the request.
    pub fn op(&self) -> usize {
        match self {
            Self::InvalidPath { op, .. }
            | Self::PathNotFound { op, .. }
            | Self::WrongType { op, .. }
            | Self::IndexOutOfBounds { op, .. }
            | Self::InvalidValue { op, .. }
            | Self::Automerge { op, .. } => *op,
        }
    }

    /// The same error with its op index moved by `offset`: for ops applied
    /// in runs that start part-way through a request.
    pub fn at_op(mut self, offset: usize) -> Self {
        match &mut self {
            Self::InvalidPath { op, .. }
            | Self::PathNotFound { op, .. }
            | Self::WrongType { op, .. }
            | Self::IndexOutOfBounds { op, .. }
            | Self::InvalidValue { op, .. }
            | Self::Automerge { op, .. } => *op += offset,
        }
        self
    }
}

/// Applies `ops` in order to an automerge transaction (or anything
/// implementing [`Transactable`], such as [`automerge::AutoCommit`]).
///
/// Stops at the first error and returns it. Ops before the failing one stay
/// applied, so on `Err` the caller must discard the whole transaction (roll
/// it back); if the error is [`OpError::Automerge`], the document the
/// transaction works on should be discarded too, since automerge may have
/// panicked halfway through a change.
pub fn apply_ops(tx: &mut impl Transactable, ops: &[Op]) -> Result<(), OpError> {
    for (index, op) in ops.iter().enumerate() {
        match contained(|| apply_op(tx, index, op)) {
            Ok(result) => result?,
            Err(reason) => return Err(OpError::Automerge { op: index, reason }),
        }
    }
    Ok(())
}

/// Writes `value`, which must be a JSON object, into the document's root map:
/// each key as by a `set` of that key (existing keys are replaced, others
/// left alone). Used to create a document from `{"value":{…}}`. Errors
/// report op 0.
pub fn write_root(tx: &mut impl Transactable, value: &Json) -> Result<(), OpError> {
    const OP: usize = 0;
    let Json::Object(entries) = value else {
        return Err(OpError::InvalidValue {
            op: OP,
            reason: format!(
                "a document's value must be a JSON object, not {}",
                json_kind(value)
            ),
        });
    };
    if let Some((special, _)) = Special::of(value) {
        return Err(OpError::InvalidValue {
            op: OP,
            reason: format!(
                "a document's root is a map, it cannot be {}",
                special.describe()
            ),
        });
    }
    let nodes = entries
        .iter()
        .map(|(key, value)| Ok((key.as_str(), Node::from_json(OP, value, 1)?)))
        .collect::<Result<Vec<_>, OpError>>()?;
    match contained(|| {
        nodes
            .iter()
            .try_for_each(|(key, node)| write(tx, &ROOT, Place::Key(key), node))
    }) {
        Ok(result) => result.map_err(|e| automerge_error(OP, e)),
        Err(reason) => Err(OpError::Automerge { op: OP, reason }),
    }
}

fn apply_op(tx: &mut impl Transactable, op: usize, edit: &Op) -> Result<(), OpError> {
    match edit {
        Op::Set { path, value } => {
            let (last, container_path) = split_last(op, "set", path)?;
            let container = resolve(tx, op, path, container_path.len(), expects(last))?;
            let place = match (container.kind, last) {
                (ObjType::Map | ObjType::Table, Prop::Key(key)) => Place::Key(key),
                (ObjType::List, Prop::Index(index)) => {
                    let len = tx.length(&container.id);
                    if *index >= len {
                        return Err(out_of_bounds(op, container_path, *index, len));
                    }
                    Place::Index(*index)
                }
                _ => return Err(wrong_container(op, container_path, container.kind, last)),
            };
            let node = Node::from_json(op, value, path.len())?;
            write(tx, &container.id, place, &node).map_err(|e| automerge_error(op, e))
        }
        Op::Insert { path, value } => {
            let (last, container_path) = split_last(op, "insert", path)?;
            let container = resolve(tx, op, path, container_path.len(), "a list")?;
            let index = match (container.kind, last) {
                (ObjType::List, Prop::Index(index)) => *index,
                (ObjType::List, Prop::Key(_)) => {
                    return Err(wrong_container(op, container_path, container.kind, last));
                }
                (kind, _) => {
                    return Err(OpError::WrongType {
                        op,
                        path: render(container_path),
                        expected: "a list",
                        found: object_kind(kind).to_string(),
                    });
                }
            };
            let len = tx.length(&container.id);
            if index > len {
                return Err(out_of_bounds(op, container_path, index, len));
            }
            let node = Node::from_json(op, value, path.len())?;
            write(tx, &container.id, Place::Insert(index), &node)
                .map_err(|e| automerge_error(op, e))
        }
        Op::Delete { path } => {
            let (last, container_path) = split_last(op, "delete", path)?;
            let container = resolve(tx, op, path, container_path.len(), expects(last))?;
            // Checks that the target exists (and the container's type).
            step(tx, op, &container, path, container_path.len())?;
            match last {
                Prop::Key(key) => tx.delete(&container.id, key.as_str()),
                Prop::Index(index) => tx.delete(&container.id, *index),
            }
            .map_err(|e| automerge_error(op, e))
        }
        Op::Increment { path, by } => {
            let (last, container_path) = split_last(op, "increment", path)?;
            let container = resolve(tx, op, path, container_path.len(), expects(last))?;
            let current = match step(tx, op, &container, path, container_path.len())? {
                Found::Scalar(ScalarValue::Counter(counter)) => i64::from(&counter),
                other => {
                    return Err(OpError::WrongType {
                        op,
                        path: render(path),
                        expected: "a counter",
                        found: other.describe(),
                    });
                }
            };
            if current.checked_add(*by).is_none() {
                return Err(OpError::InvalidValue {
                    op,
                    reason: format!(
                        "adding {by} to the counter at {} (now {current}) would overflow a \
                         64-bit integer",
                        render(path)
                    ),
                });
            }
            match last {
                Prop::Key(key) => tx.increment(&container.id, key.as_str(), *by),
                Prop::Index(index) => tx.increment(&container.id, *index, *by),
            }
            .map_err(|e| automerge_error(op, e))
        }
        Op::SpliceText {
            path,
            pos,
            delete,
            insert,
        } => {
            let text = resolve(tx, op, path, path.len(), "a text object")?;
            if text.kind != ObjType::Text {
                return Err(OpError::WrongType {
                    op,
                    path: render(path),
                    expected: "a text object",
                    found: object_kind(text.kind).to_string(),
                });
            }
            let len = tx.length(&text.id);
            if *pos > len {
                return Err(out_of_bounds(op, path, *pos, len));
            }
            let end = pos.saturating_add(*delete);
            let del = match isize::try_from(*delete) {
                Ok(del) if end <= len => del,
                _ => return Err(out_of_bounds(op, path, end, len)),
            };
            tx.splice_text(&text.id, *pos, del, insert)
                .map_err(|e| automerge_error(op, e))
        }
    }
}

/// An object found along a path.
struct Obj {
    id: ObjId,
    kind: ObjType,
}

/// What a path element names: an object or a scalar.
enum Found {
    Object(Obj),
    Scalar(ScalarValue),
}

impl Found {
    fn describe(&self) -> String {
        match self {
            Self::Object(obj) => object_kind(obj.kind).to_string(),
            Self::Scalar(value) => scalar_kind(value).to_string(),
        }
    }
}

/// Splits off the last element of a path that must not be empty.
fn split_last<'p>(
    op: usize,
    name: &str,
    path: &'p [Prop],
) -> Result<(&'p Prop, &'p [Prop]), OpError> {
    path.split_last().ok_or_else(|| OpError::InvalidPath {
        op,
        reason: format!(
            "`{name}` needs the path of a map key or list element, not the empty path \
             (the document root)"
        ),
    })
}

/// What a container must be for `last` to name something in it.
fn expects(last: &Prop) -> &'static str {
    match last {
        Prop::Key(_) => "a map",
        Prop::Index(_) => "a list",
    }
}

/// Follows the first `depth` elements of `path` from the root; each must
/// name an object. If the last of them names a scalar, the error says the
/// op expected `then` there.
fn resolve(
    doc: &impl ReadDoc,
    op: usize,
    path: &[Prop],
    depth: usize,
    then: &'static str,
) -> Result<Obj, OpError> {
    let mut current = Obj {
        id: ROOT,
        kind: ObjType::Map,
    };
    for at in 0..depth {
        current = match step(doc, op, &current, path, at)? {
            Found::Object(obj) => obj,
            Found::Scalar(value) => {
                let expected = path
                    .get(at + 1)
                    .filter(|_| at + 1 < depth)
                    .map_or(then, expects);
                return Err(OpError::WrongType {
                    op,
                    path: render(&path[..=at]),
                    expected,
                    found: scalar_kind(&value).to_string(),
                });
            }
        };
    }
    Ok(current)
}

/// Looks up `path[at]` in `container` (the object at `path[..at]`): the key
/// must exist in a map, the index must be in bounds in a list.
fn step(
    doc: &impl ReadDoc,
    op: usize,
    container: &Obj,
    path: &[Prop],
    at: usize,
) -> Result<Found, OpError> {
    let container_path = &path[..at];
    let element = &path[at];
    let value = match (container.kind, element) {
        (ObjType::Map | ObjType::Table, Prop::Key(key)) => doc.get(&container.id, key.as_str()),
        (ObjType::List, Prop::Index(index)) => {
            let len = doc.length(&container.id);
            if *index >= len {
                return Err(out_of_bounds(op, container_path, *index, len));
            }
            doc.get(&container.id, *index)
        }
        (kind, _) => return Err(wrong_container(op, container_path, kind, element)),
    };
    match value.map_err(|e| automerge_error(op, e))? {
        Some((Value::Object(kind), id)) => Ok(Found::Object(Obj { id, kind })),
        Some((Value::Scalar(value), _)) => Ok(Found::Scalar(value.into_owned())),
        None => Err(OpError::PathNotFound {
            op,
            path: render(&path[..=at]),
        }),
    }
}

/// The error for a key on a list, an index on a map, or anything on a text.
fn wrong_container(op: usize, container_path: &[Prop], kind: ObjType, element: &Prop) -> OpError {
    OpError::WrongType {
        op,
        path: render(container_path),
        expected: expects(element),
        found: object_kind(kind).to_string(),
    }
}

fn out_of_bounds(op: usize, path: &[Prop], index: usize, len: usize) -> OpError {
    OpError::IndexOutOfBounds {
        op,
        path: render(path),
        index,
        len,
    }
}

fn automerge_error(op: usize, error: AutomergeError) -> OpError {
    OpError::Automerge {
        op,
        reason: error.to_string(),
    }
}

/// A path as a JSON array: `["todos",0,"done"]`.
fn render(path: &[Prop]) -> String {
    let mut out = String::from("[");
    for (i, element) in path.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match element {
            Prop::Index(index) => out.push_str(&index.to_string()),
            // Display of a JSON string quotes and escapes it.
            Prop::Key(key) => out.push_str(&Json::from(key.as_str()).to_string()),
        }
    }
    out.push(']');
    out
}

fn object_kind(kind: ObjType) -> &'static str {
    match kind {
        ObjType::Map => "a map",
        ObjType::Table => "a table",
        ObjType::List => "a list",
        ObjType::Text => "a text object",
    }
}

fn scalar_kind(value: &ScalarValue) -> &'static str {
    match value {
        ScalarValue::Bytes(_) => "bytes",
        ScalarValue::Str(_) => "a string",
        ScalarValue::Int(_) | ScalarValue::Uint(_) | ScalarValue::F64(_) => "a number",
        ScalarValue::Counter(_) => "a counter",
        ScalarValue::Timestamp(_) => "a timestamp",
        ScalarValue::Boolean(_) => "a boolean",
        ScalarValue::Null => "null",
        ScalarValue::Unknown { .. } => "a value of an unknown type",
    }
}

fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// The special one-key objects `{"$counter": N}` and `{"$text": "…"}`.
#[derive(Clone, Copy)]
enum Special {
    Counter,
    Text,
}

impl Special {
    /// Which special object `value` is, with the value of its one key.
    fn of(value: &Json) -> Option<(Self, &Json)> {
        match value {
            Json::Object(map) if map.len() == 1 => match map.iter().next() {
                Some((key, inner)) if key == "$counter" => Some((Self::Counter, inner)),
                Some((key, inner)) if key == "$text" => Some((Self::Text, inner)),
                _ => None,
            },
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Counter => "a counter",
            Self::Text => "a text object",
        }
    }
}

/// A JSON value checked and converted, ready to write. Building it first
/// means a bad value is refused before anything of it is written.
enum Node<'a> {
    Scalar(ScalarValue),
    Text(&'a str),
    List(Vec<Node<'a>>),
    Map(Vec<(&'a str, Node<'a>)>),
}

impl<'a> Node<'a> {
    /// Converts `value`, which would be written `depth` levels below the
    /// root (1 for a key of the root map).
    fn from_json(op: usize, value: &'a Json, depth: usize) -> Result<Self, OpError> {
        let invalid = |reason: String| OpError::InvalidValue { op, reason };
        let nests = matches!(value, Json::Array(_) | Json::Object(_));
        if nests && depth > MAX_DEPTH {
            return Err(invalid(format!(
                "objects and arrays may nest at most {MAX_DEPTH} levels below the document root"
            )));
        }
        Ok(match value {
            Json::Null => Node::Scalar(ScalarValue::Null),
            Json::Bool(b) => Node::Scalar(ScalarValue::Boolean(*b)),
            Json::String(s) => Node::Scalar(ScalarValue::Str(s.as_str().into())),
            Json::Number(n) => Node::Scalar(if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else if let Some(f) = n.as_f64() {
                ScalarValue::F64(f)
            } else {
                return Err(invalid(format!("the number {n} cannot be stored")));
            }),
            Json::Array(items) => Node::List(
                items
                    .iter()
                    .map(|item| Node::from_json(op, item, depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
            Json::Object(map) => match Special::of(value) {
                Some((Special::Counter, n)) => match n.as_i64() {
                    Some(n) => Node::Scalar(ScalarValue::counter(n)),
                    None => {
                        return Err(invalid(format!(
                            "{{\"$counter\": N}} needs an integer N that fits in 64 bits, \
                                 not {n}"
                        )));
                    }
                },
                Some((Special::Text, text)) => match text {
                    Json::String(s) => Node::Text(s),
                    other => {
                        return Err(invalid(format!(
                            "{{\"$text\": …}} needs a string, not {}",
                            json_kind(other)
                        )));
                    }
                },
                None => Node::Map(
                    map.iter()
                        .map(|(key, item)| {
                            Ok((key.as_str(), Node::from_json(op, item, depth + 1)?))
                        })
                        .collect::<Result<_, OpError>>()?,
                ),
            },
        })
    }
}

/// Where to write a node in its container.
#[derive(Clone, Copy)]
enum Place<'a> {
    /// Put a map key.
    Key(&'a str),
    /// Replace a list element.
    Index(usize),
    /// Insert into a list.
    Insert(usize),
}

/// Writes `node` at `place` in `obj`, creating nested objects as needed.
/// Recursion is bounded by [`MAX_DEPTH`], checked when the node was built.
fn write(
    tx: &mut impl Transactable,
    obj: &ObjId,
    place: Place<'_>,
    node: &Node<'_>,
) -> Result<(), AutomergeError> {
    let kind = match node {
        Node::Scalar(value) => {
            let value = value.clone();
            return match place {
                Place::Key(key) => tx.put(obj, key, value),
                Place::Index(index) => tx.put(obj, index, value),
                Place::Insert(index) => tx.insert(obj, index, value),
            };
        }
        Node::Text(_) => ObjType::Text,
        Node::List(_) => ObjType::List,
        Node::Map(_) => ObjType::Map,
    };
    let id = match place {
        Place::Key(key) => tx.put_object(obj, key, kind)?,
        Place::Index(index) => tx.put_object(obj, index, kind)?,
        Place::Insert(index) => tx.insert_object(obj, index, kind)?,
    };
    match node {
        Node::Scalar(_) => Ok(()),
        Node::Text("") => Ok(()),
        Node::Text(text) => tx.splice_text(&id, 0, 0, text),
        Node::List(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(index, item)| write(tx, &id, Place::Insert(index), item)),
        Node::Map(entries) => entries
            .iter()
            .try_for_each(|(key, item)| write(tx, &id, Place::Key(key), item)),
    }
}

#[cfg(test)]
mod tests {
    use automerge::{AutoCommit, Automerge};
    use serde_json::json;

    use super::*;
    use crate::json::to_json;

    // Test helpers: a fixture they cannot take fails the test, naming it.
    fn new_doc(value: Json) -> AutoCommit {
        let mut doc = AutoCommit::new();
        if let Err(e) = write_root(&mut doc, &value) {
            panic!("fixture document {value}: {e}");
        }
        doc
    }

    fn parse(ops: Json) -> Vec<Op> {
        serde_json::from_value(ops.clone()).unwrap_or_else(|e| panic!("fixture ops {ops}: {e}"))
    }

    fn apply(doc: &mut AutoCommit, ops: Json) -> Result<(), OpError> {
        apply_ops(doc, &parse(ops))
    }

    /// Applies one op and returns its error, which must occur.
    fn fails(initial: Json, op: Json) -> OpError {
        let mut doc = new_doc(initial);
        apply(&mut doc, json!([op])).unwrap_err()
    }

    fn read(doc: &AutoCommit) -> Json {
        to_json(doc, None)
    }

    fn scalar_at(doc: &AutoCommit, key: &str) -> ScalarValue {
        match doc.get(ROOT, key).unwrap() {
            Some((Value::Scalar(s), _)) => s.into_owned(),
            other => panic!("expected a scalar at {key}, got {other:?}"),
        }
    }

    // ---- set ----

    #[test]
    fn set_adds_and_replaces_map_keys() {
        let mut doc = new_doc(json!({"a": 1}));
        apply(
            &mut doc,
            json!([
                {"op": "set", "path": ["a"], "value": "one"},
                {"op": "set", "path": ["b"], "value": null},
                {"op": "set", "path": ["c"], "value": false},
            ]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"a": "one", "b": null, "c": false}));
    }

    #[test]
    fn set_creates_nested_maps_and_lists() {
        let mut doc = new_doc(json!({}));
        let value = json!({"todos": [{"title": "milk", "tags": ["a", "b"]}, 2], "meta": {}});
        apply(
            &mut doc,
            json!([{"op": "set", "path": ["data"], "value": value}]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"data": value}));
        let (kind, _) = doc.get(ROOT, "data").unwrap().unwrap();
        assert_eq!(kind, Value::Object(ObjType::Map));
    }

    #[test]
    fn set_on_nested_paths_through_maps_and_lists() {
        let mut doc = new_doc(json!({"todos": [{"done": false}, {"done": false}]}));
        apply(
            &mut doc,
            json!([{"op": "set", "path": ["todos", 1, "done"], "value": true}]),
        )
        .unwrap();
        assert_eq!(
            read(&doc),
            json!({"todos": [{"done": false}, {"done": true}]})
        );
    }

    #[test]
    fn set_replaces_a_list_element() {
        let mut doc = new_doc(json!({"l": [1, 2, 3]}));
        apply(
            &mut doc,
            json!([
                {"op": "set", "path": ["l", 0], "value": "x"},
                {"op": "set", "path": ["l", 2], "value": [4]},
            ]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"l": ["x", 2, [4]]}));
    }

    #[test]
    fn set_past_the_end_of_a_list_is_out_of_bounds() {
        let err = fails(
            json!({"todos": [1, 2, 3]}),
            json!({"op": "set", "path": ["todos", 3], "value": 0}),
        );
        assert_eq!(
            err,
            OpError::IndexOutOfBounds {
                op: 0,
                path: r#"["todos"]"#.into(),
                index: 3,
                len: 3
            }
        );
        assert_eq!(err.code(), "index_out_of_bounds");
        assert_eq!(
            err.to_string(),
            r#"op 0: index 3 is out of range for ["todos"], which has length 3"#
        );
    }

    #[test]
    fn set_with_an_empty_path_is_an_invalid_path() {
        let err = fails(json!({}), json!({"op": "set", "path": [], "value": {}}));
        assert!(matches!(err, OpError::InvalidPath { op: 0, .. }), "{err:?}");
        assert_eq!(err.code(), "invalid_path");
        assert!(err.to_string().contains("`set`"), "{err}");
    }

    #[test]
    fn numbers_become_int_uint_or_f64() {
        let mut doc = new_doc(json!({
            "neg": -5,
            "small": 7,
            "big": u64::MAX,
            "float": 1.5,
        }));
        assert_eq!(scalar_at(&doc, "neg"), ScalarValue::Int(-5));
        assert_eq!(scalar_at(&doc, "small"), ScalarValue::Int(7));
        assert_eq!(scalar_at(&doc, "big"), ScalarValue::Uint(u64::MAX));
        assert_eq!(scalar_at(&doc, "float"), ScalarValue::F64(1.5));
        apply(
            &mut doc,
            json!([{"op": "set", "path": ["small"], "value": i64::MAX}]),
        )
        .unwrap();
        assert_eq!(scalar_at(&doc, "small"), ScalarValue::Int(i64::MAX));
        assert_eq!(read(&doc)["big"], json!(u64::MAX));
    }

    // ---- insert ----

    #[test]
    fn insert_at_start_middle_and_end() {
        let mut doc = new_doc(json!({"l": ["b", "d"]}));
        apply(
            &mut doc,
            json!([
                {"op": "insert", "path": ["l", 0], "value": "a"},
                {"op": "insert", "path": ["l", 2], "value": "c"},
                {"op": "insert", "path": ["l", 4], "value": {"e": [1]}},
            ]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"l": ["a", "b", "c", "d", {"e": [1]}]}));
    }

    #[test]
    fn insert_into_an_empty_nested_list() {
        let mut doc = new_doc(json!({"m": {"l": []}}));
        apply(
            &mut doc,
            json!([{"op": "insert", "path": ["m", "l", 0], "value": {"$text": "hi"}}]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"m": {"l": ["hi"]}}));
    }

    #[test]
    fn insert_past_the_end_is_out_of_bounds() {
        let err = fails(
            json!({"l": [1]}),
            json!({"op": "insert", "path": ["l", 2], "value": 0}),
        );
        assert_eq!(
            err,
            OpError::IndexOutOfBounds {
                op: 0,
                path: r#"["l"]"#.into(),
                index: 2,
                len: 1
            }
        );
    }

    #[test]
    fn insert_into_a_map_is_a_wrong_type() {
        let err = fails(
            json!({"m": {}}),
            json!({"op": "insert", "path": ["m", "k"], "value": 0}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["m"]"#.into(),
                expected: "a list",
                found: "a map".into()
            }
        );
        assert_eq!(err.code(), "wrong_type");
        assert_eq!(
            err.to_string(),
            r#"op 0: expected a list at ["m"], found a map"#
        );
        // Into the root map, with an index.
        let err = fails(json!({}), json!({"op": "insert", "path": [0], "value": 0}));
        assert!(
            matches!(&err, OpError::WrongType { path, expected: "a list", found, .. }
                if path == "[]" && found == "a map"),
            "{err:?}"
        );
    }

    #[test]
    fn insert_with_a_key_into_a_list_is_a_wrong_type() {
        let err = fails(
            json!({"l": []}),
            json!({"op": "insert", "path": ["l", "x"], "value": 0}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["l"]"#.into(),
                expected: "a map",
                found: "a list".into()
            }
        );
    }

    #[test]
    fn insert_into_a_scalar_is_a_wrong_type() {
        let err = fails(
            json!({"s": "str"}),
            json!({"op": "insert", "path": ["s", 0], "value": 0}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["s"]"#.into(),
                expected: "a list",
                found: "a string".into()
            }
        );
    }

    // ---- delete ----

    #[test]
    fn delete_map_keys_and_list_elements() {
        let mut doc = new_doc(json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2, 3]}));
        apply(
            &mut doc,
            json!([
                {"op": "delete", "path": ["a"]},
                {"op": "delete", "path": ["b", "c"]},
                {"op": "delete", "path": ["l", 1]},
                {"op": "delete", "path": ["l", 1]},
            ]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"b": {"d": 3}, "l": [1]}));
    }

    #[test]
    fn delete_of_a_missing_key_is_path_not_found() {
        let err = fails(
            json!({"b": {"c": 2}}),
            json!({"op": "delete", "path": ["b", "x"]}),
        );
        assert_eq!(
            err,
            OpError::PathNotFound {
                op: 0,
                path: r#"["b","x"]"#.into()
            }
        );
        assert_eq!(err.code(), "path_not_found");
        assert_eq!(
            err.to_string(),
            r#"op 0: the document has no value at ["b","x"]"#
        );
    }

    #[test]
    fn delete_past_the_end_is_out_of_bounds() {
        let err = fails(json!({"l": []}), json!({"op": "delete", "path": ["l", 0]}));
        assert_eq!(
            err,
            OpError::IndexOutOfBounds {
                op: 0,
                path: r#"["l"]"#.into(),
                index: 0,
                len: 0
            }
        );
    }

    #[test]
    fn delete_of_the_root_is_an_invalid_path() {
        let err = fails(json!({"a": 1}), json!({"op": "delete", "path": []}));
        assert!(matches!(err, OpError::InvalidPath { op: 0, .. }), "{err:?}");
    }

    #[test]
    fn delete_inside_text_is_a_wrong_type() {
        let err = fails(
            json!({"t": {"$text": "abc"}}),
            json!({"op": "delete", "path": ["t", 0]}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["t"]"#.into(),
                expected: "a list",
                found: "a text object".into()
            }
        );
    }

    // ---- increment ----

    #[test]
    fn increment_counters_in_maps_and_lists() {
        let mut doc = new_doc(json!({"n": {"$counter": 10}, "l": [{"$counter": -1}]}));
        apply(
            &mut doc,
            json!([
                {"op": "increment", "path": ["n"], "by": 5},
                {"op": "increment", "path": ["n"], "by": -2},
                {"op": "increment", "path": ["l", 0], "by": 3},
            ]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"n": 13, "l": [2]}));
        assert!(matches!(scalar_at(&doc, "n"), ScalarValue::Counter(_)));
    }

    #[test]
    fn increment_of_a_non_counter_is_a_wrong_type() {
        let err = fails(
            json!({"m": {"n": 1}}),
            json!({"op": "increment", "path": ["m", "n"], "by": 1}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["m","n"]"#.into(),
                expected: "a counter",
                found: "a number".into()
            }
        );
        let err = fails(
            json!({"m": {}}),
            json!({"op": "increment", "path": ["m"], "by": 1}),
        );
        assert!(
            matches!(&err, OpError::WrongType { expected: "a counter", found, .. } if found == "a map"),
            "{err:?}"
        );
    }

    #[test]
    fn increment_of_a_missing_value_fails() {
        let err = fails(
            json!({}),
            json!({"op": "increment", "path": ["n"], "by": 1}),
        );
        assert_eq!(
            err,
            OpError::PathNotFound {
                op: 0,
                path: r#"["n"]"#.into()
            }
        );
        let err = fails(
            json!({"l": []}),
            json!({"op": "increment", "path": ["l", 0], "by": 1}),
        );
        assert_eq!(err.code(), "index_out_of_bounds");
        let err = fails(json!({}), json!({"op": "increment", "path": [], "by": 1}));
        assert_eq!(err.code(), "invalid_path");
    }

    #[test]
    fn increment_that_would_overflow_is_refused() {
        let err = fails(
            json!({"n": {"$counter": i64::MAX}}),
            json!({"op": "increment", "path": ["n"], "by": 1}),
        );
        assert!(
            matches!(err, OpError::InvalidValue { op: 0, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("overflow"), "{err}");
    }

    // ---- splice_text ----

    #[test]
    fn splice_text_inserts_deletes_and_replaces() {
        let mut doc = new_doc(json!({"note": {"body": {"$text": "hello world"}}}));
        apply(
            &mut doc,
            json!([
                {"op": "splice_text", "path": ["note", "body"], "pos": 0, "delete": 5, "insert": "goodbye"},
                {"op": "splice_text", "path": ["note", "body"], "pos": 13, "insert": "!"},
                {"op": "splice_text", "path": ["note", "body"], "pos": 7, "delete": 1},
            ]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"note": {"body": "goodbyeworld!"}}));
    }

    #[test]
    fn splice_text_counts_unicode_code_points() {
        let mut doc = new_doc(json!({"t": {"$text": "héllo😀"}}));
        let (_, id) = doc.get(ROOT, "t").unwrap().unwrap();
        assert_eq!(doc.length(&id), 6);
        apply(
            &mut doc,
            json!([
                {"op": "splice_text", "path": ["t"], "pos": 6, "insert": "!"},
                {"op": "splice_text", "path": ["t"], "pos": 1, "delete": 1, "insert": "e"},
                {"op": "splice_text", "path": ["t"], "pos": 5, "delete": 1},
            ]),
        )
        .unwrap();
        assert_eq!(read(&doc), json!({"t": "hello!"}));
        let err = fails(
            json!({"t": {"$text": "😀😀"}}),
            json!({"op": "splice_text", "path": ["t"], "pos": 3}),
        );
        assert_eq!(
            err,
            OpError::IndexOutOfBounds {
                op: 0,
                path: r#"["t"]"#.into(),
                index: 3,
                len: 2
            }
        );
    }

    #[test]
    fn splice_text_past_the_end_is_out_of_bounds() {
        let err = fails(
            json!({"t": {"$text": "abc"}}),
            json!({"op": "splice_text", "path": ["t"], "pos": 2, "delete": 2}),
        );
        assert_eq!(
            err,
            OpError::IndexOutOfBounds {
                op: 0,
                path: r#"["t"]"#.into(),
                index: 4,
                len: 3
            }
        );
        let err = fails(
            json!({"t": {"$text": "abc"}}),
            json!({"op": "splice_text", "path": ["t"], "pos": 1, "delete": usize::MAX}),
        );
        assert_eq!(err.code(), "index_out_of_bounds");
    }

    #[test]
    fn splice_text_on_a_non_text_is_a_wrong_type() {
        let err = fails(
            json!({"s": "plain string"}),
            json!({"op": "splice_text", "path": ["s"], "pos": 0, "insert": "x"}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["s"]"#.into(),
                expected: "a text object",
                found: "a string".into()
            }
        );
        let err = fails(
            json!({"l": []}),
            json!({"op": "splice_text", "path": ["l"], "pos": 0}),
        );
        assert!(
            matches!(&err, OpError::WrongType { expected: "a text object", found, .. } if found == "a list"),
            "{err:?}"
        );
        let err = fails(
            json!({}),
            json!({"op": "splice_text", "path": [], "pos": 0}),
        );
        assert!(
            matches!(&err, OpError::WrongType { path, found, .. } if path == "[]" && found == "a map"),
            "{err:?}"
        );
    }

    // ---- paths ----

    #[test]
    fn descending_into_a_scalar_is_a_wrong_type() {
        let err = fails(
            json!({"a": {"b": 5}}),
            json!({"op": "set", "path": ["a", "b", "c", 0], "value": 1}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["a","b"]"#.into(),
                expected: "a map",
                found: "a number".into()
            }
        );
        let err = fails(
            json!({"a": true}),
            json!({"op": "set", "path": ["a", 0], "value": 1}),
        );
        assert!(
            matches!(&err, OpError::WrongType { expected: "a list", found, .. } if found == "a boolean"),
            "{err:?}"
        );
    }

    #[test]
    fn descending_into_text_is_a_wrong_type() {
        let err = fails(
            json!({"t": {"$text": "abc"}}),
            json!({"op": "set", "path": ["t", 0], "value": "x"}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["t"]"#.into(),
                expected: "a list",
                found: "a text object".into()
            }
        );
    }

    #[test]
    fn keys_on_lists_and_indexes_on_maps_are_wrong_types() {
        let err = fails(
            json!({"l": [{}]}),
            json!({"op": "set", "path": ["l", "x", "y"], "value": 1}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["l"]"#.into(),
                expected: "a map",
                found: "a list".into()
            }
        );
        let err = fails(
            json!({"m": {"0": 1}}),
            json!({"op": "set", "path": ["m", 0], "value": 1}),
        );
        assert_eq!(
            err,
            OpError::WrongType {
                op: 0,
                path: r#"["m"]"#.into(),
                expected: "a list",
                found: "a map".into()
            }
        );
    }

    #[test]
    fn missing_keys_and_indexes_along_the_path() {
        let err = fails(
            json!({"a": {}}),
            json!({"op": "set", "path": ["a", "b", "c"], "value": 1}),
        );
        assert_eq!(
            err,
            OpError::PathNotFound {
                op: 0,
                path: r#"["a","b"]"#.into()
            }
        );
        let err = fails(
            json!({"todos": [{}, {}, {}]}),
            json!({"op": "set", "path": ["todos", 5, "done"], "value": true}),
        );
        assert_eq!(
            err,
            OpError::IndexOutOfBounds {
                op: 0,
                path: r#"["todos"]"#.into(),
                index: 5,
                len: 3
            }
        );
    }

    #[test]
    fn paths_render_as_escaped_json() {
        let err = fails(
            json!({}),
            json!({"op": "delete", "path": ["quote\"and\\slash\n"]}),
        );
        assert_eq!(
            err,
            OpError::PathNotFound {
                op: 0,
                path: r#"["quote\"and\\slash\n"]"#.into()
            }
        );
    }

    #[test]
    fn the_error_names_the_failing_op() {
        let mut doc = new_doc(json!({"todos": [1, 2, 3]}));
        let err = apply(
            &mut doc,
            json!([
                {"op": "set", "path": ["a"], "value": 1},
                {"op": "insert", "path": ["todos", 0], "value": 0},
                {"op": "delete", "path": ["todos", 5]},
                {"op": "set", "path": ["never"], "value": 1},
            ]),
        )
        .unwrap_err();
        assert_eq!(
            err,
            OpError::IndexOutOfBounds {
                op: 2,
                path: r#"["todos"]"#.into(),
                index: 5,
                len: 4
            }
        );
        assert_eq!(err.op(), 2);
        assert_eq!(
            err.to_string(),
            r#"op 2: index 5 is out of range for ["todos"], which has length 4"#
        );
        assert!(doc.get(ROOT, "never").unwrap().is_none());
    }

    // ---- special values ----

    #[test]
    fn counters_and_text_read_back_as_numbers_and_strings() {
        let value = json!({
            "views": {"$counter": 3},
            "title": {"$text": "Hello"},
            "empty": {"$text": ""},
            "nested": [{"$counter": -7}, {"$text": "x"}, {"deep": {"$text": "y"}}],
        });
        let mut doc = new_doc(value);
        apply(
            &mut doc,
            json!([
                {"op": "set", "path": ["more"], "value": {"$counter": 0}},
                {"op": "increment", "path": ["more"], "by": 9},
                {"op": "set", "path": ["nested", 1], "value": {"$text": "replaced"}},
                {"op": "splice_text", "path": ["empty"], "pos": 0, "insert": "filled"},
            ]),
        )
        .unwrap();
        assert_eq!(
            read(&doc),
            json!({
                "views": 3,
                "title": "Hello",
                "empty": "filled",
                "nested": [-7, "replaced", {"deep": "y"}],
                "more": 9,
            })
        );
        let (kind, _) = doc.get(ROOT, "title").unwrap().unwrap();
        assert_eq!(kind, Value::Object(ObjType::Text));
        // The document survives a save and load.
        let loaded = Automerge::load(&doc.save()).unwrap();
        assert_eq!(to_json(&loaded, None), read(&doc));
    }

    #[test]
    fn objects_with_more_keys_are_plain_maps() {
        let value = json!({"a": {"$counter": 1, "x": 2}, "b": {"$other": 1}});
        let doc = new_doc(value.clone());
        assert_eq!(read(&doc), value);
        let (kind, _) = doc.get(ROOT, "a").unwrap().unwrap();
        assert_eq!(kind, Value::Object(ObjType::Map));
    }

    #[test]
    fn malformed_special_values_are_invalid() {
        for bad in [
            json!({"$counter": "x"}),
            json!({"$counter": 1.5}),
            json!({"$counter": u64::MAX}),
            json!({"$counter": null}),
            json!({"$text": 5}),
            json!({"$text": ["a"]}),
            json!([1, {"deep": {"$text": {}}}]),
        ] {
            let err = fails(json!({}), json!({"op": "set", "path": ["k"], "value": bad}));
            assert!(
                matches!(err, OpError::InvalidValue { op: 0, .. }),
                "{bad}: {err:?}"
            );
            assert_eq!(err.code(), "invalid_value");
        }
        let err = fails(
            json!({}),
            json!({"op": "set", "path": ["k"], "value": {"$counter": "x"}}),
        );
        assert!(err.to_string().contains("$counter"), "{err}");
    }

    #[test]
    fn an_invalid_value_writes_nothing_of_itself() {
        let mut doc = new_doc(json!({}));
        let err = apply(
            &mut doc,
            json!([{"op": "set", "path": ["k"], "value": {"a": 1, "z": {"$text": 1}}}]),
        )
        .unwrap_err();
        assert_eq!(err.code(), "invalid_value");
        assert_eq!(read(&doc), json!({}));
    }

    // ---- write_root ----

    #[test]
    fn write_root_writes_every_key() {
        let mut doc = new_doc(json!({"keep": 1, "replace": 2}));
        write_root(&mut doc, &json!({"replace": [3], "new": {"$text": "t"}})).unwrap();
        assert_eq!(read(&doc), json!({"keep": 1, "replace": [3], "new": "t"}));
        write_root(&mut doc, &json!({})).unwrap();
        assert_eq!(read(&doc)["keep"], 1);
    }

    #[test]
    fn write_root_needs_a_plain_object() {
        for bad in [
            json!(null),
            json!(5),
            json!("s"),
            json!([1]),
            json!({"$counter": 1}),
            json!({"$text": "t"}),
        ] {
            let mut doc = AutoCommit::new();
            let err = write_root(&mut doc, &bad).unwrap_err();
            assert!(
                matches!(err, OpError::InvalidValue { op: 0, .. }),
                "{bad}: {err:?}"
            );
            assert!(
                err.to_string().starts_with("op 0: invalid value: "),
                "{err}"
            );
        }
    }

    // ---- depth ----

    /// `levels` arrays nested inside each other around `inner`.
    fn nested(levels: usize, inner: Json) -> Json {
        (0..levels).fold(inner, |v, _| json!([v]))
    }

    #[test]
    fn nesting_is_bounded_by_max_depth() {
        // A key of the root is level 1: MAX_DEPTH arrays fit, one more does not.
        let mut doc = new_doc(json!({}));
        let deepest = nested(MAX_DEPTH, json!(1));
        apply(
            &mut doc,
            json!([{"op": "set", "path": ["k"], "value": deepest}]),
        )
        .unwrap();
        assert_eq!(read(&doc)["k"], deepest);

        let too_deep = nested(MAX_DEPTH + 1, json!(1));
        let err = fails(
            json!({}),
            json!({"op": "set", "path": ["k"], "value": too_deep}),
        );
        assert!(
            matches!(err, OpError::InvalidValue { op: 0, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("64"), "{err}");
        // Text is an object too.
        let err = fails(
            json!({}),
            json!({"op": "set", "path": ["k"], "value": nested(MAX_DEPTH, json!({"$text": "x"}))}),
        );
        assert_eq!(err.code(), "invalid_value");
        let mut doc = AutoCommit::new();
        let err = write_root(&mut doc, &json!({ "k": too_deep })).unwrap_err();
        assert_eq!(err.code(), "invalid_value");
    }

    #[test]
    fn depth_counts_from_the_document_root() {
        // The list at ["a"] is level 1; a value set at ["a", 0] starts at level 2.
        let mut doc = new_doc(json!({"a": [0]}));
        let fits = nested(MAX_DEPTH - 1, json!(1));
        apply(
            &mut doc,
            json!([{"op": "set", "path": ["a", 0], "value": fits}]),
        )
        .unwrap();
        let err = apply(
            &mut doc,
            json!([{"op": "insert", "path": ["a", 0], "value": nested(MAX_DEPTH, json!(1))}]),
        )
        .unwrap_err();
        assert_eq!(err.code(), "invalid_value");
        // Scalars may sit at any depth.
        let path: Vec<Json> = std::iter::once(json!("a"))
            .chain(std::iter::repeat_n(json!(0), MAX_DEPTH))
            .collect();
        apply(
            &mut doc,
            json!([{"op": "set", "path": path, "value": "leaf"}]),
        )
        .unwrap();
    }

    // ---- deserialization ----

    #[test]
    fn ops_deserialize_from_the_documented_json() {
        let ops = parse(json!([
            {"op": "set", "path": ["todos", 0, "done"], "value": true},
            {"op": "insert", "path": ["l", 3], "value": {"a": 1}},
            {"op": "delete", "path": ["k"]},
            {"op": "increment", "path": ["n"], "by": -4},
            {"op": "splice_text", "path": ["t"], "pos": 1, "delete": 2, "insert": "xy"},
            {"op": "splice_text", "path": ["t"], "pos": 1},
        ]));
        assert_eq!(
            ops,
            vec![
                Op::Set {
                    path: vec!["todos".into(), 0.into(), "done".into()],
                    value: json!(true)
                },
                Op::Insert {
                    path: vec![Prop::Key("l".into()), Prop::Index(3)],
                    value: json!({"a": 1})
                },
                Op::Delete {
                    path: vec!["k".into()]
                },
                Op::Increment {
                    path: vec!["n".into()],
                    by: -4
                },
                Op::SpliceText {
                    path: vec!["t".into()],
                    pos: 1,
                    delete: 2,
                    insert: "xy".into()
                },
                Op::SpliceText {
                    path: vec!["t".into()],
                    pos: 1,
                    delete: 0,
                    insert: String::new()
                },
            ]
        );
    }

    #[test]
    fn malformed_ops_fail_to_deserialize() {
        for (bad, says) in [
            (json!({"op": "frobnicate", "path": []}), "frobnicate"),
            (json!({"path": ["a"], "value": 1}), "op"),
            (
                json!({"op": "set", "path": ["a"], "value": 1, "extra": 2}),
                "extra",
            ),
            (json!({"op": "delete", "path": ["a"], "value": 1}), "value"),
            (json!({"op": "set", "path": ["a"]}), "value"),
            (json!({"op": "set", "value": 1}), "path"),
            (json!({"op": "increment", "path": ["a"]}), "by"),
            (json!({"op": "increment", "path": ["a"], "by": 1.5}), "1.5"),
            (json!({"op": "splice_text", "path": ["t"]}), "pos"),
            (json!({"op": "splice_text", "path": ["t"], "pos": -1}), "-1"),
            (json!({"op": "set", "path": ["a", -1], "value": 1}), "-1"),
            (json!({"op": "set", "path": ["a", 1.5], "value": 1}), "1.5"),
            (json!({"op": "set", "path": [null], "value": 1}), "null"),
            (
                json!({"op": "set", "path": [["a"]], "value": 1}),
                "sequence",
            ),
            (json!({"op": "set", "path": "a", "value": 1}), "a"),
            (json!({"op": "Set", "path": ["a"], "value": 1}), "Set"),
        ] {
            let err = serde_json::from_value::<Op>(bad.clone()).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn path_elements_deserialize_from_strings_and_non_negative_integers() {
        let path: Vec<Prop> =
            serde_json::from_str(r#"["a", 0, "0", 18446744073709551615]"#).unwrap();
        assert_eq!(
            path,
            vec![
                Prop::Key("a".into()),
                Prop::Index(0),
                Prop::Key("0".into()),
                Prop::Index(usize::MAX)
            ]
        );
        let err = serde_json::from_str::<Prop>("-3").unwrap_err();
        assert!(err.to_string().contains("list index"), "{err}");
        assert!(serde_json::from_str::<Prop>("2.0").is_err());
        assert!(serde_json::from_str::<Prop>("true").is_err());
    }

    // ---- transactions and codes ----

    #[test]
    fn works_on_an_automerge_transaction() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        write_root(&mut tx, &json!({"todos": []})).unwrap();
        apply_ops(
            &mut tx,
            &parse(json!([{"op": "insert", "path": ["todos", 0], "value": "milk"}])),
        )
        .unwrap();
        tx.commit();
        assert_eq!(to_json(&doc, None), json!({"todos": ["milk"]}));

        // A failing batch is rolled back by the caller: nothing of it stays.
        let heads = doc.get_heads();
        let mut tx = doc.transaction();
        let err = apply_ops(
            &mut tx,
            &parse(json!([
                {"op": "insert", "path": ["todos", 1], "value": "eggs"},
                {"op": "delete", "path": ["missing"]},
            ])),
        )
        .unwrap_err();
        assert_eq!(err.op(), 1);
        tx.rollback();
        assert_eq!(doc.get_heads(), heads);
        assert_eq!(to_json(&doc, None), json!({"todos": ["milk"]}));
    }

    #[test]
    fn every_error_has_its_code() {
        let cases = [
            (
                OpError::InvalidPath {
                    op: 1,
                    reason: "r".into(),
                },
                "invalid_path",
            ),
            (
                OpError::PathNotFound {
                    op: 1,
                    path: "[]".into(),
                },
                "path_not_found",
            ),
            (
                OpError::WrongType {
                    op: 1,
                    path: "[]".into(),
                    expected: "a list",
                    found: "a map".into(),
                },
                "wrong_type",
            ),
            (
                OpError::IndexOutOfBounds {
                    op: 1,
                    path: "[]".into(),
                    index: 1,
                    len: 0,
                },
                "index_out_of_bounds",
            ),
            (
                OpError::InvalidValue {
                    op: 1,
                    reason: "r".into(),
                },
                "invalid_value",
            ),
            (
                OpError::Automerge {
                    op: 1,
                    reason: "automerge panicked: boom".into(),
                },
                "invalid_op",
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code);
            assert_eq!(err.op(), 1);
            assert!(err.to_string().starts_with("op 1: "), "{err}");
        }
    }

    #[test]
    fn an_empty_batch_changes_nothing() {
        let mut doc = new_doc(json!({"a": 1}));
        apply_ops(&mut doc, &[]).unwrap();
        assert_eq!(read(&doc), json!({"a": 1}));
    }
}
