//! The `concord` binary: `init`, `id`, `run` (run.json, clean exit on
//! SIGTERM, syncing with another process, on either runtime), and `demo`. Real processes on
//! 127.0.0.1; every wait is bounded and every child is killed on the way out.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Replica};

use support::{BIN, Concord, concord, init, stdout};

#[test]
fn init_and_id_print_the_node_id_and_init_refuses_twice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("node");
    let id = init(&dir);
    assert_eq!(id.len(), 52, "{id}");
    assert_eq!(stdout(&concord(&dir, &["id"])), id);
    let again = concord(&dir, &["init"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let missing = concord(&tmp.path().join("nothing"), &["id"]);
    assert!(!missing.status.success());
}

fn write_doc(dir: &Path, key: &'static str) -> DocId {
    let replica = Replica::open(dir.join("store.redb")).expect("open store");
    let mut tx = replica.begin().expect("begin");
    let (id, ()) = tx
        .create(DEFAULT_SPACE, |d| d.put(ROOT, key, 1))
        .expect("create");
    tx.commit().expect("commit");
    id
}

fn has_doc(dir: &Path, id: DocId) -> bool {
    Replica::open(dir.join("store.redb"))
        .ok()
        .and_then(|r| r.read().ok().map(|s| s.get(id).is_ok()))
        .unwrap_or(false)
}

/// Threads of the process of `run` (its run.json) named as tokio names its
/// runtime's threads ("tokio-rt-worker"): a multi-threaded runtime's
/// workers. A current-thread runtime has none until something asks for a
/// blocking thread (nothing does while a node only syncs).
fn runtime_workers(run: &serde_json::Value) -> usize {
    let pid = run["pid"].as_u64().expect("pid");
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.trim_end() == "tokio-rt-worker")
        })
        .count()
}

#[test]
fn two_processes_sync_and_exit_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a_dir, b_dir): (PathBuf, PathBuf) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a_id, b_id) = (init(&a_dir), init(&b_dir));
    let from_a = write_doc(&a_dir, "from_a");
    let from_b = write_doc(&b_dir, "from_b");

    let a = Concord::start(&a_dir, &[format!("--trust={b_id}")]);
    let run = a.run.clone();
    assert_eq!(run["node_id"], a_id.as_str());
    assert!(run["pid"].as_u64().is_some());
    assert!(
        runtime_workers(&run) >= 1,
        "a is not on a multi-threaded runtime"
    );
    let a_addr = run["quic_addr"].as_str().expect("quic_addr").to_string();
    let peer = format!("{a_id}@{a_addr}");

    // Run b until it holds a's document (checked between runs: the store is
    // locked while a node runs).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // b on the current-thread runtime, a on the default one.
        let b = Concord::start(
            &b_dir,
            &[format!("--peer={peer}"), "--runtime=current-thread".into()],
        );
        assert_eq!(
            runtime_workers(&b.run),
            0,
            "b is on a multi-threaded runtime"
        );
        std::thread::sleep(Duration::from_secs(1));
        let status = b.terminate();
        assert!(status.success(), "b exited with {status}");
        assert!(!b_dir.join("run.json").exists(), "run.json left behind");
        if has_doc(&b_dir, from_a) {
            break;
        }
        assert!(Instant::now() < deadline, "b never received a's document");
    }
    let status = a.terminate();
    assert!(status.success(), "a exited with {status}");
    assert!(has_doc(&a_dir, from_b), "a never received b's document");
}

#[test]
fn the_demo_converges() {
    let output = Command::new(BIN).arg("demo").output().expect("run demo");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed: {output:?}");
    assert!(text.contains("converged"), "{text}");
}

#[test]
fn status_and_document_commands_talk_to_the_running_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("node");
    let id = init(&dir);
    // Before the node runs: a readable one-line error.
    let none = concord(&dir, &["status"]);
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(err.contains("no node is running"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let node = Concord::start(&dir, &[]);
    let json = |output: Output| -> serde_json::Value {
        assert!(output.status.success(), "{output:?}");
        serde_json::from_str(&stdout(&output)).expect("JSON on stdout")
    };
    let status = json(concord(&dir, &["status"]));
    assert_eq!(status["node_id"], id.as_str());
    assert_eq!(status["documents"], 0);

    let created = json(concord(
        &dir,
        &["doc", "create", "--space", "work", r#"{"todos":["milk"]}"#],
    ));
    let doc = created["id"].as_str().expect("id").to_string();
    let first: Vec<String> = serde_json::from_value(created["heads"].clone()).expect("heads");
    let patched = json(concord(
        &dir,
        &[
            "doc",
            "patch",
            &doc,
            r#"[{"op":"insert","path":["todos",1],"value":"eggs"}]"#,
        ],
    ));
    assert_ne!(patched["heads"], created["heads"]);
    let got = json(concord(&dir, &["doc", "get", &doc]));
    assert_eq!(got["value"], serde_json::json!({"todos": ["milk", "eggs"]}));
    assert_eq!(got["space"], "work");
    let then = json(concord(
        &dir,
        &["doc", "get", &doc, "--at", &first.join(",")],
    ));
    assert_eq!(then["value"], serde_json::json!({"todos": ["milk"]}));
    let list = json(concord(&dir, &["doc", "list"]));
    assert_eq!(list["docs"].as_array().expect("docs").len(), 1);

    // The API's errors, one line each.
    for args in [
        vec!["doc", "get", "not-an-id"],
        vec!["doc", "get", "00000000-0000-4000-8000-000000000000"],
        vec![
            "doc",
            "patch",
            &doc,
            r#"[{"op":"increment","path":["todos"],"by":1}]"#,
        ],
        vec!["doc", "patch", &doc, "{not json"],
    ] {
        let output = concord(&dir, &args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("concord: "), "{err}");
    }
    let err = String::from_utf8_lossy(
        &concord(
            &dir,
            &["doc", "get", "00000000-0000-4000-8000-000000000000"],
        )
        .stderr,
    )
    .to_string();
    assert!(err.contains("document_not_found"), "{err}");
    let status = node.terminate();
    assert!(status.success());
}
