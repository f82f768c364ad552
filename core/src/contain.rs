//! Containment of automerge: every place where bytes from disk or from a peer
//! enter automerge goes through here.
//!
//! automerge 0.12 panics on some corrupt inputs with valid checksums, usually
//! leaving the document it was applying to corrupt, and `load_incremental`
//! silently applies a valid prefix of a damaged buffer (FINDINGS.md). So:
//! changes are parsed one by one with [`Change::from_bytes`] (all or nothing),
//! every call runs under `catch_unwind`, and callers apply to a working copy
//! that they drop on any failure.

use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::{Automerge, Change};

use crate::store::describe_panic;

/// Runs `f`, turning a panic into an error message.
pub(crate) fn contained<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|p| format!("automerge panicked: {}", describe_panic(&*p)))
}

/// Parses one change; any error or panic is reported, never propagated.
pub(crate) fn parse_change(bytes: &[u8]) -> Result<Change, String> {
    match contained(|| Change::from_bytes(bytes.to_vec()))? {
        Ok(change) => Ok(change),
        Err(e) => Err(format!("not an automerge change: {e}")),
    }
}

/// Parses a batch of changes; fails as a whole if any one fails.
pub(crate) fn parse_changes<'a>(
    batch: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Change>, String> {
    batch
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| parse_change(bytes).map_err(|e| format!("change {i}: {e}")))
        .collect()
}

/// Loads a saved document (verified heads); errors and panics are reported.
pub(crate) fn load(bytes: &[u8]) -> Result<Automerge, String> {
    match contained(|| Automerge::load(bytes))? {
        Ok(doc) => Ok(doc),
        Err(e) => Err(format!("not an automerge document: {e}")),
    }
}

/// Applies changes to `doc`. On `Err` the document may be damaged and must be
/// dropped by the caller.
pub(crate) fn apply(doc: &mut Automerge, changes: Vec<Change>) -> Result<(), String> {
    match contained(|| doc.apply_changes(changes))? {
        Ok(()) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
