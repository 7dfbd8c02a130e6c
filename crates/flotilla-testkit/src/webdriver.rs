//! Headless Chromium for end-to-end tests of the dashboard: Debian's `chromedriver` as a child
//! process, driven over the W3C WebDriver HTTP protocol with reqwest. Only the handful of
//! commands the tests need.

use std::{
    io::{Read, Write},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::Context;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{Process, free_port, wait_until};

const INSTALL_HINT: &str = "apt-get install chromium chromium-driver";

/// The key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A found element (its WebDriver reference).
#[derive(Debug, Clone)]
pub struct Element(String);

/// One browser session on its own chromedriver. Dropping it shuts chromedriver down, which
/// closes the browser; [`Browser::quit`] does the same cleanly.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`
    session: String,
    /// Held for its Drop.
    _driver: Driver,
}

struct Driver {
    process: Process,
    port: u16,
    /// Chromedriver's log and the browser profile; removed on drop.
    dir: TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session. Fails, saying
    /// what to install, when chromedriver or Chromium is missing.
    pub async fn start() -> anyhow::Result<Browser> {
        let chromedriver = find_chromedriver()?;
        let dir = tempfile::Builder::new()
            .prefix("flotilla-chromium-")
            .tempdir()?;
        let port = free_port();
        let mut command = Command::new(&chromedriver);
        command.arg(format!("--port={port}"));
        // Its own process group, so that whatever the browser leaves behind can be killed
        // with it (see Drop).
        command.process_group(0);
        let process = Process::spawn_command(
            "chromedriver",
            command,
            &dir.path().join("chromedriver.log"),
        )?;
        let driver = Driver { process, port, dir };
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        wait_until(Duration::from_secs(20), "chromedriver to be ready", || {
            let http = &http;
            let base = &base;
            async move {
                let status: Value = http
                    .get(format!("{base}/status"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (status["value"]["ready"] == true).then_some(())
            }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nchromedriver log:\n{}", driver.process.log()))?;

        let profile = driver.dir.path().join("profile");
        let mut options = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        });
        // Debian's chromedriver looks for the browser itself; name it when it is where Debian
        // puts it, so a stray Chrome elsewhere on PATH is not picked up instead.
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": options }
            }
        });
        let created = command_result(
            http.post(format!("{base}/session"))
                .json(&capabilities)
                .send()
                .await,
        )
        .await
        .with_context(|| {
            format!(
                "cannot start headless Chromium ({INSTALL_HINT}?)\nchromedriver log:\n{}",
                driver.process.log()
            )
        })?;
        let session_id = created["sessionId"]
            .as_str()
            .context("no sessionId in the new-session answer")?;
        Ok(Browser {
            http,
            session: format!("{base}/session/{session_id}"),
            _driver: driver,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        // Only POST commands take a body; chromedriver rejects one on GET and DELETE.
        if method == reqwest::Method::POST {
            request = request.json(&body);
        }
        command_result(request.send().await)
            .await
            .with_context(|| format!("webdriver {method} {path}"))
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await
            .map(drop)
    }

    /// The first element matching a CSS selector (an error when there is none).
    pub async fn find(&self, css: &str) -> anyhow::Result<Element> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await?;
        element_of(&found)
    }

    pub async fn send_keys(&self, element: &Element, text: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/value", element.0),
            json!({ "text": text }),
        )
        .await
        .map(drop)
    }

    pub async fn clear(&self, element: &Element) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/clear", element.0),
            json!({}),
        )
        .await
        .map(drop)
    }

    pub async fn click(&self, element: &Element) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/click", element.0),
            json!({}),
        )
        .await
        .map(drop)
    }

    /// The element's rendered text, as a user would see it.
    pub async fn text(&self, element: &Element) -> anyhow::Result<String> {
        let text = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{}/text", element.0),
                Value::Null,
            )
            .await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// The text of the first element matching `css`, or None while there is none.
    pub async fn text_of(&self, css: &str) -> Option<String> {
        let element = self.find(css).await.ok()?;
        self.text(&element).await.ok()
    }

    /// Runs `script` as a function body in the page (`arguments` holds `args`); returns its
    /// value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Ends the session (closing the browser) and stops chromedriver.
    pub async fn quit(self) -> anyhow::Result<()> {
        self.call(reqwest::Method::DELETE, "", Value::Null)
            .await
            .map(drop)
    }
}

/// The `value` of a WebDriver answer, or its error and message.
async fn command_result(
    response: Result<reqwest::Response, reqwest::Error>,
) -> anyhow::Result<Value> {
    let response = response.context("chromedriver does not answer")?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .context("undecodable webdriver answer")?;
    let value = body.get("value").cloned().unwrap_or(Value::Null);
    if !status.is_success() {
        anyhow::bail!(
            "{}: {}",
            value["error"].as_str().unwrap_or("error"),
            value["message"].as_str().unwrap_or_default()
        );
    }
    Ok(value)
}

fn element_of(value: &Value) -> anyhow::Result<Element> {
    value[ELEMENT_KEY]
        .as_str()
        .map(|id| Element(id.to_owned()))
        .with_context(|| format!("not an element reference: {value}"))
}

fn find_chromedriver() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromedriver"))
        .chain([PathBuf::from("/usr/lib/chromium/chromedriver")])
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("chromedriver not found on PATH: {INSTALL_HINT}"))
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver's /shutdown closes every browser it started, then exits. It is sent
        // with a blocking socket because Drop cannot await.
        let _ = shutdown(self.port);
        self.process.terminate_and_wait(Duration::from_secs(5));
        // Anything of the browser still alive in chromedriver's group (a crashed session).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.process.pid())])
            .output();
    }
}

fn shutdown(port: u16) -> std::io::Result<()> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(())
}
