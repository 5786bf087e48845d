//! The clients people use, against the real server: rookery-cli's script modes and its
//! interactive mode driven through a pseudo-terminal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

/// A running rookery-cli (or a `script` wrapping one) whose stdout and stderr are collected.
struct Cli {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let into = text.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = from.read(&mut buffer) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    text
}

impl Cli {
    fn spawn(mut command: Command) -> Cli {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Cli {
            child,
            stdout,
            stderr,
        }
    }

    /// rookery-cli `args` against `server` as `user`, with `password` as ROOKERY_PASSWORD.
    fn start(server: &TestServer, user: &str, password: &str, args: &[&str]) -> Cli {
        Cli::spawn(cli_command(server, user, password, args))
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn write(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Types `text` a key at a time, as a person does. (rustyline 18 with an external printer
    /// takes one key per read of the terminal, so bytes written at once would wait: its
    /// issue 976.)
    async fn type_keys(&mut self, text: &str) {
        for c in text.chars() {
            self.write(c.encode_utf8(&mut [0; 4]));
            actix_rt::time::sleep(Duration::from_millis(15)).await;
        }
    }

    /// Waits until stdout holds `needle` `times` times.
    async fn wait_for_n(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + WAIT;
        while self.stdout().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the output:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_for(&self, needle: &str) {
        self.wait_for_n(needle, 1).await;
    }

    async fn wait_for_stderr(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr:\n{}",
                self.stderr()
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the exit; returns its status code.
    async fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads take the last output.
                actix_rt::time::sleep(Duration::from_millis(50)).await;
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "rookery-cli did not exit:\n{}\n{}",
                self.stdout(),
                self.stderr()
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli_command(server: &TestServer, user: &str, password: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rookery-cli"));
    command
        .args(args)
        .args(["--url", &server.ws_url(), "--user", user])
        .env("ROOKERY_PASSWORD", password);
    command
}

/// Runs rookery-cli to its end (on a thread, so the in-process server keeps serving).
async fn run_cli(server: &TestServer, user: &str, password: &str, args: &[&str]) -> Cli {
    let mut cli = Cli::start(server, user, password, args);
    cli.exit_code().await;
    cli
}

#[actix_rt::test]
async fn a_script_send_is_seen_by_tail_and_history_prints_json() {
    let server = TestServer::start().await;
    let [_ann] = server.public_room("general", ["ann"]).await;

    let tail = Cli::start(&server, "ann", PASSWORD, &["tail", "--room", "general"]);
    tail.wait_for_stderr("tailing #general after seq 0").await;

    let mut send = Cli::start(
        &server,
        "ann",
        PASSWORD,
        &["send", "--room", "general", "hello <b>from</b> a script"],
    );
    assert_eq!(send.exit_code().await, 0, "{}", send.stderr());
    assert_eq!(send.stdout().trim(), "1", "send prints the stored seq");

    tail.wait_for("a script").await;
    let line = tail.stdout().lines().next().unwrap().to_string();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["type"], "message");
    assert_eq!(event["seq"], 1);
    assert_eq!(event["from"], "ann");
    assert_eq!(event["body"], "hello <b>from</b> a script");

    for n in 2..=3 {
        run_cli(
            &server,
            "ann",
            PASSWORD,
            &["send", "--room", "general", &format!("m{n}")],
        )
        .await;
    }
    let history = run_cli(
        &server,
        "ann",
        PASSWORD,
        &["history", "--room", "general", "--limit", "2", "--json"],
    )
    .await;
    let page: serde_json::Value = serde_json::from_str(history.stdout().trim()).unwrap();
    let seqs: Vec<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(page["has_more"], true);
    tail.wait_for("\"m3\"").await;
    assert_eq!(tail.stdout().lines().count(), 3, "each message once");
}

#[actix_rt::test]
async fn script_modes_exit_non_zero_with_the_server_s_error_code() {
    let server = TestServer::start().await;
    let [_ann] = server.public_room("general", ["ann"]).await;

    let mut wrong = Cli::start(
        &server,
        "ann",
        "not-the-password",
        &["send", "--room", "general", "x"],
    );
    assert_ne!(wrong.exit_code().await, 0);
    assert!(
        wrong.stderr().contains("invalid_credentials"),
        "{}",
        wrong.stderr()
    );

    let mut unknown = Cli::start(&server, "ann", PASSWORD, &["history", "--room", "nowhere"]);
    assert_ne!(unknown.exit_code().await, 0);
    assert!(
        unknown.stderr().contains("not_found"),
        "{}",
        unknown.stderr()
    );

    let mut bad_name = Cli::start(&server, "ann", PASSWORD, &["send", "--room", "No!", "x"]);
    assert_ne!(bad_name.exit_code().await, 0);
    assert!(
        bad_name.stderr().contains("room must be"),
        "{}",
        bad_name.stderr()
    );
    assert_eq!(server.stored("general").len(), 0, "nothing was stored");
}

#[actix_rt::test]
async fn over_wss_the_server_s_certificate_is_trusted_with_ca_or_insecure() {
    let server = TestServer::start_with(|config| config.tls.enabled = true).await;
    let [_ann] = server.public_room("general", ["ann"]).await;
    let cert = server.data_dir.0.join("tls").join("cert.pem");
    assert!(cert.exists(), "the development certificate is at {cert:?}");

    let mut untrusted = Cli::start(
        &server,
        "ann",
        PASSWORD,
        &["send", "--room", "general", "x"],
    );
    assert_ne!(untrusted.exit_code().await, 0);
    assert!(
        untrusted.stderr().contains("certificate"),
        "{}",
        untrusted.stderr()
    );

    let ca = cert.to_str().unwrap();
    let mut trusted = Cli::start(
        &server,
        "ann",
        PASSWORD,
        &["send", "--ca", ca, "--room", "general", "with ca"],
    );
    assert_eq!(trusted.exit_code().await, 0, "{}", trusted.stderr());
    let mut insecure = Cli::start(
        &server,
        "ann",
        PASSWORD,
        &["send", "--insecure", "--room", "general", "insecure"],
    );
    assert_eq!(insecure.exit_code().await, 0, "{}", insecure.stderr());
    assert_eq!(server.stored("general").len(), 2);
}

/// rookery-cli connect under a pseudo-terminal (util-linux `script`), as a person uses it.
fn interactive(server: &TestServer, user: &str) -> Cli {
    let command = cli_command(server, user, PASSWORD, &["connect"]);
    let line = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| format!("'{}'", part.to_str().unwrap()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("script");
    script
        .args(["-qfec", &line, "/dev/null"])
        .env("ROOKERY_PASSWORD", PASSWORD)
        .env("TERM", "xterm");
    Cli::spawn(script)
}

#[actix_rt::test]
async fn the_interactive_client_registers_joins_sends_and_shows_messages_above_a_half_typed_line() {
    let server = TestServer::start().await;
    let [mut bob] = server.public_room("general", ["bob"]).await;

    let mut carol = interactive(&server, "carol");
    carol.wait_for("invalid_credentials").await;
    carol.wait_for("carol> ").await;
    carol.type_keys("/register\r").await;
    carol.wait_for("logged in as carol").await;
    carol.type_keys("/join general\r").await;
    carol.wait_for("joined #general").await;
    bob.next_event_of("joined").await;

    carol.type_keys("hello there\r").await;
    carol.wait_for("carol: hello there").await;
    let echoed = bob.next_event_of("message").await;
    assert_eq!(echoed["body"], "hello there");

    carol.type_keys("half").await;
    carol.wait_for("half").await;
    bob.ok(req::send("general", "bob says hi")).await;
    assert_eq!(bob.next_event_of("message").await["body"], "bob says hi");
    carol.wait_for("bob: bob says hi").await;
    // The half-typed line is drawn again below the message, still being edited.
    let deadline = Instant::now() + WAIT;
    loop {
        let screen = carol.stdout();
        let (_, below) = screen.rsplit_once("bob: bob says hi").unwrap();
        if below.contains("half") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the line was not redrawn: {screen:?}"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    carol.type_keys(" typed\r").await;
    carol.wait_for("carol: half typed").await;
    assert_eq!(bob.next_event_of("message").await["body"], "half typed");

    carol.type_keys("/who\r").await;
    carol.wait_for("online in #general: bob, carol").await;
    carol.type_keys("/quit\r").await;
    assert_eq!(carol.exit_code().await, 0, "{}", carol.stdout());
    let page = bob.ok(req::history("general", None, Some(10))).await;
    let bodies: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["hello there", "bob says hi", "half typed"]);
}

#[actix_rt::test]
async fn the_interactive_client_reconnects_by_itself_and_fetches_what_it_missed() {
    let server = TestServer::start().await;
    let [mut bob] = server.public_room("general", ["bob"]).await;
    let proxy = PgProxy::to(server.addr.port());
    // Without a terminal (stdin is a pipe): lines are read as they come.
    let mut dan = {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rookery-cli"));
        let url = format!("ws://127.0.0.1:{}/ws", proxy.port);
        command
            .args(["connect", "--url", &url, "--user", "dan"])
            .env("ROOKERY_PASSWORD", PASSWORD);
        let mut registered = server.connect().await;
        registered.register("dan").await;
        Cli::spawn(command)
    };
    dan.wait_for("logged in as dan").await;
    dan.write("/join general\n");
    dan.wait_for("joined #general").await;

    proxy.cut();
    dan.wait_for("reconnecting").await;
    for n in 1..=3 {
        bob.ok(req::send("general", format!("while away {n}")))
            .await;
    }
    proxy.restore();
    dan.wait_for("back, 3 missed messages fetched").await;
    for n in 1..=3 {
        dan.wait_for(&format!("bob: while away {n}")).await;
    }
    bob.ok(req::send("general", "live again")).await;
    dan.wait_for("bob: live again").await;
    assert_eq!(
        dan.stdout().matches("while away 2").count(),
        1,
        "{}",
        dan.stdout()
    );
    dan.write("/quit\n");
    assert_eq!(dan.exit_code().await, 0);
}

/// A browser session driven over WebDriver (chromedriver's HTTP API).
struct Browser {
    http: awc::Client,
    base: String,
}

/// chromedriver on a free port with its browsers; killed on drop.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver: install Debian's chromium and chromium-driver (.ci/run does)");
        let driver = Chromedriver { child, port };
        let deadline = Instant::now() + WAIT;
        loop {
            let status = awc::Client::default()
                .get(format!("http://127.0.0.1:{port}/status"))
                .send()
                .await;
            if let Ok(mut response) = status {
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                if body["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new headless Chromium window.
    async fn browser(&self) -> Browser {
        let http = awc::Client::builder()
            .timeout(Duration::from_secs(60))
            .finish();
        let capabilities = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--ignore-certificate-errors", "--window-size=1100,800"]
            }
        }}});
        let mut response = http
            .post(format!("http://127.0.0.1:{}/session", self.port))
            .send_json(&capabilities)
            .await
            .unwrap();
        let body: serde_json::Value = response.json().limit(1 << 20).await.unwrap();
        let session = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {body}"));
        Browser {
            http,
            base: format!("http://127.0.0.1:{}/session/{session}", self.port),
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn command(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url),
        };
        let mut response = if method == "POST" {
            request.send_json(&body).await
        } else {
            request.send().await
        }
        .unwrap();
        let reply: serde_json::Value = response.json().limit(1 << 24).await.unwrap();
        assert!(
            response.status().is_success(),
            "webdriver {method} {path}: {reply}"
        );
        reply["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command("POST", "/url", serde_json::json!({ "url": url }))
            .await;
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .command(
                "POST",
                "/element",
                serde_json::json!({"using": "css selector", "value": css}),
            )
            .await;
        found["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css).await;
        self.command(
            "POST",
            &format!("/element/{element}/clear"),
            serde_json::json!({}),
        )
        .await;
        self.command(
            "POST",
            &format!("/element/{element}/value"),
            serde_json::json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.element(css).await;
        self.command(
            "POST",
            &format!("/element/{element}/click"),
            serde_json::json!({}),
        )
        .await;
    }

    async fn eval(&self, script: &str) -> serde_json::Value {
        self.command(
            "POST",
            "/execute/sync",
            serde_json::json!({"script": script, "args": []}),
        )
        .await
    }

    /// Waits until `script` returns true in the page.
    async fn wait_until(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.eval(script).await == true {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not so after 20 s; the page shows:\n{}",
                self.eval("return document.body.innerText").await
            );
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The bodies of the current room's messages, in page order.
    async fn bodies(&self) -> Vec<String> {
        let bodies = self
            .eval("return [...document.querySelectorAll('#messages .msg .body')].map(b => b.textContent)")
            .await;
        serde_json::from_value(bodies).unwrap()
    }

    async fn register(&self, url: &str, name: &str) {
        self.open(url).await;
        self.type_into("#username", name).await;
        self.type_into("#password", PASSWORD).await;
        self.click("#register-btn").await;
        self.wait_until(
            "logged in",
            &format!("return window.rookery.state().user === '{name}' && !document.querySelector('#chat').hidden"),
        )
        .await;
    }

    async fn send(&self, text: &str) {
        self.type_into("#composer", text).await;
        self.click("#send-btn").await;
    }

    async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let png = self
            .command("GET", "/screenshot", serde_json::json!({}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    async fn quit(&self) {
        self.command("DELETE", "", serde_json::json!({})).await;
    }
}

fn in_current_room(room: &str) -> String {
    format!(
        "return window.rookery.state().current === '{room}' && window.rookery.state().connected"
    )
}

#[actix_rt::test]
async fn two_browsers_chat_page_back_through_history_and_survive_a_cut_connection() {
    let server = TestServer::start_with(|config| config.tls.enabled = true).await;
    // Ann's browser reaches the server through a proxy the test cuts; Bob's directly.
    let proxy = PgProxy::to(server.addr.port());
    let ann_url = format!("https://127.0.0.1:{}/", proxy.port);
    let bob_url = format!("https://127.0.0.1:{}/", server.addr.port());
    let driver = Chromedriver::start().await;
    let (ann, bob) = (driver.browser().await, driver.browser().await);

    ann.register(&ann_url, "ann").await;
    bob.register(&bob_url, "bob").await;
    ann.type_into("#create-name", "lobby").await;
    ann.click("#create-btn").await;
    ann.wait_until("ann in lobby", &in_current_room("lobby"))
        .await;

    // Sixty messages from a protocol client, so that the page has history to page through.
    let mut carol = server.user("carol").await;
    carol.join("lobby").await;
    for n in 1..=60 {
        carol.ok(req::send("lobby", format!("old {n}"))).await;
    }
    bob.type_into("#join-name", "lobby").await;
    bob.click("#join-btn").await;
    bob.wait_until("bob in lobby", &in_current_room("lobby"))
        .await;
    bob.wait_until(
        "the latest page",
        "return document.querySelectorAll('#messages .msg').length >= 50",
    )
    .await;
    assert!(!bob.bodies().await.contains(&"old 1".to_string()));
    // Older messages come with the button, or by themselves when the view is scrolled to the top.
    bob.wait_until(
        "a way back",
        "return !document.querySelector('#older-btn').hidden || document.querySelectorAll('#messages .msg').length === 60",
    )
    .await;
    // (Clicked from the page: WebDriver's scroll to the button would itself reach the top.)
    bob.eval(
        "const older = document.querySelector('#older-btn'); if (!older.hidden) older.click();",
    )
    .await;
    bob.wait_until(
        "the oldest message after scrolling back",
        "return [...document.querySelectorAll('#messages .msg .body')].some(b => b.textContent === 'old 1')",
    )
    .await;
    let bodies = bob.bodies().await;
    let expected: Vec<String> = (1..=60).map(|n| format!("old {n}")).collect();
    assert_eq!(bodies, expected, "each message once, in order");

    // A body with markup shows as text.
    let hostile = "<img src=x onerror=\"window.pwned=1\"> <b>bold?</b>";
    ann.send(hostile).await;
    bob.wait_until(
        "ann's message",
        &format!("return [...document.querySelectorAll('#messages .msg .body')].some(b => b.textContent === {})", serde_json::json!(hostile)),
    )
    .await;
    assert_eq!(
        bob.eval("return document.querySelectorAll('#messages img, #messages b').length + (window.pwned ? 100 : 0)")
            .await,
        0
    );
    bob.send("hi ann").await;
    ann.wait_until(
        "bob's reply",
        "return [...document.querySelectorAll('#messages .msg .body')].some(b => b.textContent === 'hi ann')",
    )
    .await;

    // The network drops: a banner, a send typed meanwhile, messages sent meanwhile.
    proxy.cut();
    ann.wait_until(
        "the reconnecting banner",
        "return document.querySelector('#banner').dataset.state === 'reconnecting'",
    )
    .await;
    ann.send("typed while offline").await;
    bob.send("while you were away").await;
    carol.ok(req::send("lobby", "also while away")).await;
    actix_rt::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    ann.wait_until(
        "back online",
        "return document.querySelector('#banner').dataset.state === 'online' && document.querySelector('#banner').textContent.includes('Back online')",
    )
    .await;
    ann.wait_until(
        "the offline send acked",
        "return window.rookery.state().outbox === 0",
    )
    .await;
    let seen = ann.bodies().await;
    for body in [
        "while you were away",
        "also while away",
        "typed while offline",
    ] {
        assert_eq!(
            seen.iter().filter(|b| *b == body).count(),
            1,
            "{body:?} once in {seen:?}"
        );
    }
    bob.wait_until(
        "ann's offline message",
        "return [...document.querySelectorAll('#messages .msg .body')].some(b => b.textContent === 'typed while offline')",
    )
    .await;
    let stored = server.stored("lobby");
    assert_eq!(stored.len(), 60 + 5, "each message stored once");
    let seqs: Vec<i64> = ann
        .eval("return [...document.querySelectorAll('#messages .msg')].map(m => Number(m.dataset.seq))")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_i64().unwrap())
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seqs, sorted, "in seq order, each once");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-chat.png");
    ann.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("screenshot of the web chat: {}", shot.display());
    ann.quit().await;
    bob.quit().await;
}
