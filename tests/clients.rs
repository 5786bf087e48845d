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
