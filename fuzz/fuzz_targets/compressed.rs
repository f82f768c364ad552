//! See `sync-protocol/tests/replay/cases.rs` (compressed_session_case): the
//! checks live there so the ordinary test suite replays committed
//! regression inputs.
#![no_main]

#[allow(dead_code)]
#[path = "../../sync-protocol/tests/replay/cases.rs"]
mod cases;

libfuzzer_sys::fuzz_target!(|data: &[u8]| cases::compressed_session_case(data));
