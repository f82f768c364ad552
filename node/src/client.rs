//! The CLI's client of a running node's HTTP API: `concord status` and the
//! `concord doc` commands. The node is found through `DIR/run.json`, or the
//! `--api` URL.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

/// How long one request may take (long enough for a durable commit on a
/// slow disk, short enough that a hung node is noticed).
const TIMEOUT: Duration = Duration::from_secs(30);

/// A running node's API.
pub(crate) struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// The API at `url` when given, else the one `DIR/run.json` names.
    pub(crate) fn find(
        data_dir: &Path,
        url: Option<&str>,
        token: Option<String>,
    ) -> anyhow::Result<Self> {
        let base = match url {
            Some(url) if url.contains("://") => url.trim_end_matches('/').to_string(),
            Some(addr) => format!("http://{addr}"),
            None => {
                let path = data_dir.join(crate::RUN_FILE);
                let text = std::fs::read_to_string(&path).map_err(|_| {
                    anyhow!(
                        "no node is running in {} (no run.json): start one with `concord run`, or pass --api URL",
                        data_dir.display()
                    )
                })?;
                let run: Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not valid JSON", path.display()))?;
                let addr = run["api_addr"].as_str().ok_or_else(|| {
                    anyhow!("the node in {} serves no HTTP API", data_dir.display())
                })?;
                format!("http://{addr}")
            }
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into();
        Ok(Self { base, token, agent })
    }

    /// Sends a request and returns the JSON answer, or the API's error as a
    /// one-line message.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: ureq::Error| {
            anyhow!(
                "cannot reach the node's API at {}: {e} (is `concord run` still running?)",
                self.base
            )
        };
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Content-Type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let invalid = || format!("{method} {url}");
        let mut response = match body {
            Some(body) => self
                .agent
                .run(request.body(body.to_string()).with_context(invalid)?),
            None => self.agent.run(request.body(()).with_context(invalid)?),
        }
        .map_err(unreachable)?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer from {url}"))?;
        let value: Value = serde_json::from_str(&text).with_context(|| {
            format!("the node answered {status} with something that is not JSON")
        })?;
        if status.is_success() {
            return Ok(value);
        }
        let error = &value["error"];
        match (error["message"].as_str(), error["code"].as_str()) {
            (Some(message), Some(code)) => bail!("{message} ({code})"),
            _ => bail!("the node answered {status}: {text}"),
        }
    }
}
