//! The interactive client's IO: the line editor on a thread of its own (rustyline: history,
//! Ctrl-C clears the line, Ctrl-D quits), lines printed above the prompt without breaking the
//! line being typed, the connection, and the timers; `chat` decides what each of them means.

use rookery::client::{ClientError, Connection, Connector};
use rustyline::error::ReadlineError;
use rustyline::{DefaultEditor, ExternalPrinter};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::chat::{Chat, Effect};
use crate::{CliError, ServerArgs};

/// What the editor thread reports.
enum Input {
    Line(String),
    /// Ctrl-D, or the input ended.
    End,
}

type Printer = Box<dyn ExternalPrinter + Send>;

/// How long the next prompt may wait for the login or the reply that changes its room.
const SETTLE_WAIT: Duration = Duration::from_secs(12);

/// Where lines for the user go: above the prompt while the editor reads, or plain stdout.
struct Screen {
    printer: Option<Printer>,
    prompt: Arc<Mutex<String>>,
}

impl Screen {
    fn print(&mut self, text: String) {
        if let Some(printer) = &mut self.printer {
            if printer.print(format!("{text}\n")).is_ok() {
                return;
            }
        }
        println!("{text}");
    }

    fn set_prompt(&self, prompt: String) {
        if let Ok(mut shared) = self.prompt.lock() {
            *shared = prompt;
        }
    }
}

/// The terminal's settings at start, put back on the way out: the editor thread may be in
/// the middle of a line (its terminal in raw mode) when the session ends.
struct SavedTerminal(Option<libc::termios>);

impl SavedTerminal {
    fn save() -> SavedTerminal {
        let mut settings = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr writes a termios through the pointer when it returns 0.
        let saved = unsafe {
            (libc::tcgetattr(libc::STDIN_FILENO, settings.as_mut_ptr()) == 0)
                .then(|| settings.assume_init())
        };
        SavedTerminal(saved)
    }

    fn restore(&self) {
        if let Some(settings) = &self.0 {
            // SAFETY: `settings` is a termios tcgetattr filled in.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, settings);
            }
        }
    }
}

fn read_lines(
    prompt: Arc<Mutex<String>>,
    lines: mpsc::UnboundedSender<Input>,
    printers: std_mpsc::Sender<Option<Printer>>,
    go_on: std_mpsc::Receiver<()>,
) {
    let Ok(mut editor) = DefaultEditor::new() else {
        let _ = printers.send(None);
        let _ = lines.send(Input::End);
        return;
    };
    let printer = editor
        .create_external_printer()
        .ok()
        .map(|p| Box::new(p) as Printer);
    let _ = printers.send(printer);
    // The first prompt waits for the login.
    if go_on.recv().is_err() {
        return;
    }
    loop {
        let shown = prompt.lock().map(|p| p.clone()).unwrap_or_default();
        match editor.readline(&shown) {
            Ok(line) => {
                let _ = editor.add_history_entry(line.as_str());
                // Wait until the line is handled: the next prompt then shows its effect, and the
                // terminal is not in raw mode when a /quit ends the process.
                if lines.send(Input::Line(line)).is_err() || go_on.recv().is_err() {
                    return;
                }
            }
            Err(ReadlineError::Interrupted) => {}
            Err(_) => {
                let _ = lines.send(Input::End);
                return;
            }
        }
    }
}

async fn recv(conn: &mut Option<Connection>) -> Result<Value, ClientError> {
    match conn {
        Some(conn) => conn.recv().await,
        None => std::future::pending().await,
    }
}

pub async fn run(server: &ServerArgs) -> Result<(), CliError> {
    let user = server.username()?;
    let password = crate::password(&user)?;
    let connector = Connector::new(&server.connect_options())?;
    let saved = SavedTerminal::save();
    let mut chat = Chat::new(user, password);
    let prompt = Arc::new(Mutex::new(chat.prompt()));
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let (printers_tx, printers) = std_mpsc::channel();
    let (go_on, go_on_rx) = std_mpsc::channel();
    let shared = prompt.clone();
    std::thread::spawn(move || read_lines(shared, lines_tx, printers_tx, go_on_rx));
    let mut screen = Screen {
        printer: printers.recv().ok().flatten(),
        prompt,
    };
    let outcome = serve(
        server,
        &connector,
        &mut chat,
        &mut screen,
        &mut lines,
        &go_on,
    )
    .await;
    saved.restore();
    outcome
}

async fn serve(
    server: &ServerArgs,
    connector: &Connector,
    chat: &mut Chat,
    screen: &mut Screen,
    lines: &mut mpsc::UnboundedReceiver<Input>,
    go_on: &std_mpsc::Sender<()>,
) -> Result<(), CliError> {
    let mut conn: Option<Connection> = None;
    let mut connect_at = Some(tokio::time::Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Ticks missed while a connection attempt ran are not made up at once (they count
    // the seconds of `/quit`'s wait).
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    screen.print(format!("connecting to {}…", server.url));
    // A line whose next prompt waits for a reply (see `Chat::settling`), and until when.
    let mut held_line = Some(Instant::now() + SETTLE_WAIT);
    let mut input_open = true;
    loop {
        let mut line_handled = false;
        let effects = tokio::select! {
            frame = recv(&mut conn), if conn.is_some() => match frame {
                Ok(frame) => chat.on_frame(frame, Instant::now()),
                Err(error) => {
                    let reason = conn.as_ref().and_then(|c| c.close_reason()).map(str::to_string);
                    conn = None;
                    let code = match error {
                        ClientError::Closed(code) => code,
                        _ => None,
                    };
                    chat.on_closed(code, reason.as_deref())
                }
            },
            input = lines.recv(), if input_open => {
                line_handled = true;
                match input {
                    Some(Input::Line(line)) => chat.on_line(&line),
                    Some(Input::End) | None => {
                        input_open = false;
                        chat.on_line("/quit")
                    }
                }
            },
            _ = tokio::time::sleep_until(connect_at.unwrap_or_else(tokio::time::Instant::now)),
                if conn.is_none() && connect_at.is_some() =>
            {
                connect_at = None;
                match connector.connect(&server.url).await {
                    Ok(opened) => {
                        conn = Some(opened);
                        chat.on_connected(Instant::now())
                    }
                    Err(error) => chat.on_connect_failed(error),
                }
            },
            _ = tick.tick() => chat.on_tick(Instant::now()),
        };
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Send(frame) => {
                    let sent = match &mut conn {
                        Some(open) => open.send_text(frame).await.is_ok(),
                        None => false,
                    };
                    if !sent && conn.take().is_some() {
                        queue.extend(chat.on_closed(None, None));
                    }
                }
                Effect::Print(text) => screen.print(text),
                Effect::Prompt(prompt) => screen.set_prompt(prompt),
                Effect::Drop(why) => {
                    if let Some(mut lost) = conn.take() {
                        lost.abandon();
                        queue.extend(chat.on_closed(None, Some(why)));
                    }
                }
                Effect::Connect(after) => {
                    connect_at = Some(tokio::time::Instant::now() + after);
                }
                Effect::Exit(outcome) => {
                    if let Some(mut open) = conn.take() {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), open.send_close()).await;
                    }
                    return outcome;
                }
            }
        }
        if line_handled {
            held_line = Some(Instant::now() + SETTLE_WAIT);
        }
        if held_line.is_some_and(|until| !chat.settling() || Instant::now() >= until) {
            held_line = None;
            screen.set_prompt(chat.prompt());
            let _ = go_on.send(());
        }
    }
}
