//! Real `concord run` processes on 127.0.0.1, driven through their HTTP
//! APIs: three nodes in a line and in hub and spoke converge after writes on
//! every node; a node SIGKILLed during writes and restarted loses nothing it
//! acknowledged; an untrusted node is refused and learns no document id.
//! Every wait is bounded and every process is killed on the way out.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use support::{Concord, agent, http, init};

const WAIT: Duration = Duration::from_secs(60);

/// A running node and a client of its API.
struct Proc {
    node: Concord,
    agent: ureq::Agent,
}

impl Proc {
    fn start(dir: &std::path::Path, args: &[String]) -> Self {
        Self {
            node: Concord::start(dir, args),
            agent: agent(),
        }
    }

    /// Status code and JSON answer; `None` if the node cannot be reached.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, Value)> {
        let url = format!("http://{}{path}", self.node.api);
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, bytes) = http(&self.agent, method, &url, body, &[])?;
        Some((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, value) = self.call(method, path, body).expect("node reachable");
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {value}"
        );
        value
    }

    fn create(&self, value: Value) -> String {
        let created = self.ok("POST", "/v1/docs", Some(&json!({ "value": value })));
        created["id"].as_str().expect("id").to_string()
    }

    fn set(&self, doc: &str, key: &str, value: Value) -> Option<(u16, Value)> {
        let ops = json!({"ops": [{"op": "set", "path": [key], "value": value}]});
        self.call("PATCH", &format!("/v1/docs/{doc}"), Some(&ops))
    }

    /// The document's value, or `None` while this node does not hold it.
    fn value(&self, doc: &str) -> Option<Value> {
        match self.call("GET", &format!("/v1/docs/{doc}"), None)? {
            (200, body) => Some(body["value"].clone()),
            _ => None,
        }
    }

    fn heads(&self, doc: &str) -> Option<Value> {
        match self.call("GET", &format!("/v1/docs/{doc}"), None)? {
            (200, body) => Some(body["heads"].clone()),
            _ => None,
        }
    }

    fn peer_flag(&self, id: &str) -> String {
        self.node.peer_flag(id)
    }
}

fn trust(id: &str) -> String {
    format!("--trust={id}")
}

/// Waits until every node holds `doc` with identical heads and `check`
/// holds for its value.
fn converge(nodes: &[&Proc], doc: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let heads: Vec<Option<Value>> = nodes.iter().map(|n| n.heads(doc)).collect();
        let values: Vec<Option<Value>> = nodes.iter().map(|n| n.value(doc)).collect();
        if heads.iter().all(|h| h.is_some() && *h == heads[0])
            && values
                .iter()
                .all(|v| v.as_ref().is_some_and(&check) && *v == values[0])
            && let Some(value) = values[0].clone()
        {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence on {doc} within {WAIT:?}: {values:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Dirs {
    _tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
    ids: Vec<String>,
}

fn dirs(n: usize) -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs: Vec<PathBuf> = (0..n).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let ids = dirs.iter().map(|d| init(d)).collect();
    Dirs {
        _tmp: tmp,
        dirs,
        ids,
    }
}

/// Each node writes its own key into a shared document and creates one of
/// its own; all must end with everything.
fn write_everywhere_and_converge(nodes: &[&Proc]) {
    let shared = nodes[0].create(json!({"origin": 0}));
    converge(nodes, &shared, |_| true);
    let mut own = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for round in 0..5 {
            let (status, body) = node
                .set(&shared, &format!("n{i}_{round}"), json!(round))
                .expect("reachable");
            assert_eq!(status, 200, "{body}");
        }
        own.push(node.create(json!({"by": i})));
    }
    let value = converge(nodes, &shared, |v| {
        (0..nodes.len()).all(|i| v.get(format!("n{i}_4")).is_some())
    });
    assert_eq!(value.as_object().expect("map").len(), 1 + 5 * nodes.len());
    for (i, doc) in own.iter().enumerate() {
        converge(nodes, doc, |v| v["by"] == i);
    }
}

#[test]
fn three_processes_in_a_line_converge() {
    let d = dirs(3);
    // a — b — c: a and c reach each other only through b.
    let a = Proc::start(&d.dirs[0], &[trust(&d.ids[1])]);
    let b = Proc::start(&d.dirs[1], &[a.peer_flag(&d.ids[0]), trust(&d.ids[2])]);
    let c = Proc::start(&d.dirs[2], &[b.peer_flag(&d.ids[1])]);
    write_everywhere_and_converge(&[&a, &b, &c]);
}

#[test]
fn three_processes_in_hub_and_spoke_converge() {
    let d = dirs(3);
    let hub = Proc::start(&d.dirs[0], &[trust(&d.ids[1]), trust(&d.ids[2])]);
    let one = Proc::start(&d.dirs[1], &[hub.peer_flag(&d.ids[0])]);
    let two = Proc::start(&d.dirs[2], &[hub.peer_flag(&d.ids[0])]);
    // Spokes first, so the hub relays in both directions.
    write_everywhere_and_converge(&[&one, &two, &hub]);
}

#[test]
fn a_node_killed_during_writes_loses_nothing_it_acknowledged() {
    let d = dirs(2);
    let a = Proc::start(&d.dirs[0], &[trust(&d.ids[1])]);
    let args = [a.peer_flag(&d.ids[0])];
    let mut b = Proc::start(&d.dirs[1], &args);
    let doc = b.create(json!({}));
    converge(&[&a, &b], &doc, |_| true);

    // b takes writes from a writer thread; it is SIGKILLed mid-stream three
    // times and restarted. Only writes b answered 200 to count as
    // acknowledged.
    let mut acknowledged: Vec<String> = Vec::new();
    let mut n = 0u32;
    for round in 0..3 {
        let api = b.node.api.clone();
        let doc_path = format!("/v1/docs/{doc}");
        let first = n;
        let writer = std::thread::spawn(move || {
            let agent = agent();
            let mut acked = Vec::new();
            for i in first..first + 10_000 {
                let key = format!("k{i}");
                let ops = json!({"ops": [{"op": "set", "path": [key], "value": i}]});
                let url = format!("http://{api}{doc_path}");
                match http(
                    &agent,
                    "PATCH",
                    &url,
                    Some(ops.to_string().into_bytes()),
                    &[],
                ) {
                    Some((200, _)) => acked.push(key),
                    _ => break,
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(300 + 200 * round));
        b.node.kill();
        let acked = writer.join().expect("writer");
        assert!(
            !acked.is_empty(),
            "round {round}: no write was acknowledged"
        );
        n += acked.len() as u32 + 1;
        acknowledged.extend(acked);
        // Meanwhile a writes too.
        let (status, _) = a
            .set(&doc, &format!("a{round}"), json!(round))
            .expect("a up");
        assert_eq!(status, 200);
        // Everything acknowledged survived the kill on b's own disk: look
        // with the network off, so nothing can come back from a.
        b = Proc::start(&d.dirs[1], &["--offline".to_string()]);
        let value = b.value(&doc).expect("b holds the document after restart");
        for key in &acknowledged {
            assert!(value.get(key).is_some(), "acknowledged {key} lost");
        }
        assert!(
            value.get(format!("a{round}")).is_none(),
            "b synced while offline"
        );
        b.node.kill();
        b = Proc::start(&d.dirs[1], &args);
    }
    let value = converge(&[&a, &b], &doc, |v| {
        v.get("a2").is_some() && acknowledged.iter().all(|k| v.get(k).is_some())
    });
    assert!(value.as_object().expect("map").len() >= acknowledged.len() + 3);
}

#[test]
fn an_untrusted_process_is_refused_and_learns_no_document_id() {
    let d = dirs(2);
    let a = Proc::start(&d.dirs[0], &[]);
    let secret = a.create(json!({"secret": 42}));
    // The stranger trusts a and dials it; a trusts nobody.
    let stranger = Proc::start(&d.dirs[1], &[a.peer_flag(&d.ids[0])]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let status = stranger.ok("GET", "/v1/status", None);
        assert_eq!(status["peers"][0]["connected"], false, "{status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let docs = stranger.ok("GET", "/v1/docs", None);
    assert_eq!(docs["docs"], json!([]));
    assert!(stranger.value(&secret).is_none());
    let feed = stranger.ok("GET", "/v1/changes?since=0", None);
    assert_eq!(feed["changes"], json!([]));
    // a lists no peer: nothing about the stranger was kept.
    assert_eq!(a.ok("GET", "/v1/status", None)["peers"], json!([]));
}
