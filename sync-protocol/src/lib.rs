//! Concord's wire format and sans-IO peer session state machine.
//!
//! Not built yet: this crate is a placeholder in the workspace layout and
//! exposes no API. See `DESIGN.md` in the project for what it will hold.
