//! Replays the inputs committed under `fuzz/regressions/` (crashers found by
//! fuzzing, fixed, and kept) through the same checks the fuzz targets make.

#[path = "replay/cases.rs"]
mod cases;

use std::path::Path;

fn replay(target: &str, case: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut count = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).expect("read input");
        eprintln!("replaying {}", path.display());
        case(&data);
        count += 1;
    }
    count
}

#[test]
fn frame_regressions_replay() {
    assert!(replay("frame", cases::frame_case) > 0);
}

#[test]
fn session_regressions_replay() {
    assert!(replay("session", cases::session_case) > 0);
}

#[test]
fn compressed_session_regressions_replay() {
    assert!(replay("compressed", cases::compressed_session_case) > 0);
}
