//! The operator's commands against the database, run by the command line while servers may be
//! running: `rookery user list | add | disable | enable | reset-password | revoke-tokens` and
//! `rookery verify`. Calls [`crate::store`] (and [`crate::server::migrate`] for the user
//! commands, which need the current schema); prints the answers on stdout, progress on a
//! terminal's stderr. Servers notice revoked tokens by themselves (`auth.revocation_check_ms`).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use crate::config::{ms, Config};
use crate::crypto::Keyring;
use crate::error::{OperatorError, StartError, StoreError};
use crate::protocol::{check_password, Username};
use crate::secret::Secret;
use crate::store::operator::{self as queries, RoomInventory};
use crate::store::{self, PooledConn};

/// Rows read per query by `verify`.
const VERIFY_PAGE: i64 = 5_000;

/// Missing seqs named one by one per room; beyond, the rest are counted.
const NAMED_GAPS_PER_ROOM: usize = 1_000;

fn connect(config: &Config) -> Result<PooledConn, OperatorError> {
    let pool = store::connect_pool(
        config.database.url.expose(),
        1,
        ms(config.database.connect_timeout_ms),
        Duration::from_secs(3600),
    )?;
    Ok(pool.get().map_err(StoreError::from)?)
}

/// A connection to a database at the current schema (migrating it, as `serve` would).
fn migrated(config: &Config) -> Result<PooledConn, OperatorError> {
    crate::server::migrate(config)?;
    connect(config)
}

fn username(name: &str) -> Result<Username, OperatorError> {
    Username::parse(name).map_err(|e| OperatorError::Invalid(format!("username: {e}")))
}

/// The new password: `ROOKERY_PASSWORD` when set, else asked twice on the terminal without
/// echo.
fn new_password(name: &str) -> Result<Secret, OperatorError> {
    let password = match std::env::var("ROOKERY_PASSWORD") {
        Ok(p) => Secret::new(p),
        Err(_) => {
            let first = rpassword::prompt_password(format!("new password for {name}: "))?;
            let again = rpassword::prompt_password("again: ")?;
            if first != again {
                return Err(OperatorError::Invalid("the passwords differ".into()));
            }
            Secret::new(first)
        }
    };
    check_password(&password).map_err(|r| OperatorError::Invalid(r.message))?;
    Ok(password)
}

fn hash(config: &Config, password: &Secret) -> Result<String, OperatorError> {
    bcrypt::hash(password.expose(), config.database.bcrypt_cost).map_err(|e| {
        OperatorError::Start(StartError::Store(StoreError::Unavailable(format!(
            "bcrypt: {e}"
        ))))
    })
}

fn found(name: &str, revoked: Option<usize>) -> Result<usize, OperatorError> {
    revoked.ok_or_else(|| OperatorError::UnknownUser(name.to_string()))
}

pub fn list_users(config: &Config) -> Result<(), OperatorError> {
    let users = queries::list_users(&mut *migrated(config)?)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<32} {:<20} {:<9} {:>8}",
        "USER", "CREATED", "STATE", "DEVICES"
    )?;
    for user in &users {
        writeln!(
            out,
            "{:<32} {:<20} {:<9} {:>8}",
            user.username,
            user.created_at.format("%Y-%m-%d %H:%M:%S"),
            if user.disabled_at.is_some() {
                "disabled"
            } else {
                "active"
            },
            user.live_tokens
        )?;
    }
    writeln!(out, "{} user(s)", users.len())?;
    Ok(())
}

pub fn add_user(config: &Config, name: &str) -> Result<(), OperatorError> {
    let name = username(name)?;
    let mut conn = migrated(config)?;
    let password = new_password(name.as_str())?;
    let created = store::create_user(&mut conn, name.as_str(), &hash(config, &password)?).map_err(
        |e| match e {
            StoreError::Conflict(_) => {
                OperatorError::Invalid(format!("a user named '{name}' exists already"))
            }
            e => e.into(),
        },
    )?;
    println!("added user {}", created.username);
    Ok(())
}

pub fn set_disabled(config: &Config, name: &str, disabled: bool) -> Result<(), OperatorError> {
    let revoked = found(
        name,
        queries::set_disabled(&mut *migrated(config)?, name, disabled)?,
    )?;
    if disabled {
        println!(
            "disabled {name}: logins and resumes are refused; {revoked} token(s) revoked, live \
             sessions close within {} s",
            config.auth.revocation_check_ms.div_ceil(1000)
        );
    } else {
        println!("enabled {name}: the user may log in again");
    }
    Ok(())
}

pub fn reset_password(config: &Config, name: &str) -> Result<(), OperatorError> {
    let mut conn = migrated(config)?;
    if queries::user_id(&mut conn, name)?.is_none() {
        return Err(OperatorError::UnknownUser(name.to_string()));
    }
    let password = new_password(name)?;
    let revoked = found(
        name,
        queries::set_password(&mut conn, name, &hash(config, &password)?)?,
    )?;
    println!("new password set for {name}; {revoked} token(s) revoked");
    Ok(())
}

pub fn revoke_tokens(config: &Config, name: &str) -> Result<(), OperatorError> {
    let revoked = found(
        name,
        queries::revoke_user_tokens(&mut *migrated(config)?, name)?,
    )?;
    println!(
        "revoked {revoked} token(s) of {name}; live sessions close within {} s",
        config.auth.revocation_check_ms.div_ceil(1000)
    );
    Ok(())
}

/// What `verify` found wrong with one room.
struct RoomReport {
    missing: Vec<i64>,
    more_missing: usize,
    beyond_counter: Vec<i64>,
    bad: Vec<queries::BadRow>,
}

impl RoomReport {
    fn problems(&self) -> usize {
        self.missing.len() + self.more_missing + self.beyond_counter.len() + self.bad.len()
    }
}

/// Reads every stored message (or one room's) in pages and checks that each row opens with
/// its key and that each room's seqs run without gaps up to its counter, apart from seqs
/// deleted by retention and those a room that stores nothing handed out. Changes nothing.
pub fn verify(config: &Config, only: Option<&str>) -> Result<(), OperatorError> {
    let mut conn = connect(config)?;
    let pending = store::pending_migrations(&mut conn)?;
    if pending > 0 {
        return Err(OperatorError::PendingMigrations(pending));
    }
    let key_file = config.key_file();
    if config.crypto.keys.is_empty() && !key_file.exists() {
        // Loading would generate a development key; verify never writes.
        return Err(OperatorError::Invalid(format!(
            "no message key: set crypto.keys or point crypto.key_file (or data_dir) at the \
             key file the server uses ({} does not exist)",
            key_file.display()
        )));
    }
    let recorded = store::recorded_keys(&mut conn)?;
    let keys = Keyring::load(&config.key_source(&key_file), &recorded).map_err(StartError::from)?;
    keys.verify(&recorded).map_err(StartError::from)?;
    let rooms = queries::room_inventory(&mut conn, only)?;
    if let Some(name) = only {
        if rooms.is_empty() {
            return Err(OperatorError::Invalid(format!("no room named '{name}'")));
        }
    }
    let ids: Vec<_> = rooms.iter().map(|r| r.id).collect();
    let total = queries::count_messages(&mut conn, &ids)?;
    let mut progress = Progress::new(total);
    let mut out = std::io::stdout().lock();
    let mut problems = 0;
    for room in &rooms {
        let report = verify_room(&mut conn, &keys, room, &mut progress)?;
        problems += report.problems();
        for seq in &report.missing {
            writeln!(
                out,
                "room {} seq {seq}: missing (no row, though the room's counter passed it and \
                 neither retention nor an unstored room accounts for it)",
                room.name
            )?;
        }
        if report.more_missing > 0 {
            writeln!(
                out,
                "room {}: {} more seqs missing",
                room.name, report.more_missing
            )?;
        }
        for seq in &report.beyond_counter {
            writeln!(
                out,
                "room {} seq {seq}: stored beyond the room's counter ({})",
                room.name, room.last_seq
            )?;
        }
        for bad in &report.bad {
            writeln!(out, "room {} seq {}: {}", room.name, bad.seq, bad.problem)?;
        }
    }
    progress.done();
    writeln!(
        out,
        "verified {} room(s), {} stored message(s): {}",
        rooms.len(),
        progress.done_rows,
        if problems == 0 {
            "no problems".to_string()
        } else {
            format!("{problems} problem(s)")
        }
    )?;
    if problems > 0 {
        return Err(OperatorError::Damaged(problems));
    }
    Ok(())
}

fn verify_room(
    conn: &mut PooledConn,
    keys: &Keyring,
    room: &RoomInventory,
    progress: &mut Progress,
) -> Result<RoomReport, OperatorError> {
    let mut report = RoomReport {
        missing: Vec::new(),
        more_missing: 0,
        beyond_counter: Vec::new(),
        bad: Vec::new(),
    };
    let missing = |seq: i64, report: &mut RoomReport| {
        if report.missing.len() < NAMED_GAPS_PER_ROOM {
            report.missing.push(seq);
        } else {
            report.more_missing += 1;
        }
    };
    let mut after = 0;
    loop {
        let (seqs, bad) = queries::check_page(conn, keys, room.id, after, VERIFY_PAGE)?;
        let Some(&last) = seqs.last() else { break };
        for seq in seqs.iter().copied() {
            for gap in after + 1..seq {
                if room.expects(gap) {
                    missing(gap, &mut report);
                }
            }
            if seq > room.last_seq {
                report.beyond_counter.push(seq);
            }
            after = seq;
        }
        report.bad.extend(bad);
        progress.advance(seqs.len());
        after = last;
    }
    for gap in after + 1..=room.last_seq {
        if room.expects(gap) {
            missing(gap, &mut report);
        }
    }
    Ok(report)
}

/// A progress line on stderr, only when stderr is a terminal.
struct Progress {
    total: i64,
    done_rows: usize,
    shown: Option<std::time::Instant>,
    terminal: bool,
}

impl Progress {
    fn new(total: i64) -> Progress {
        Progress {
            total,
            done_rows: 0,
            shown: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn advance(&mut self, rows: usize) {
        self.done_rows += rows;
        if !self.terminal
            || self
                .shown
                .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.shown = Some(std::time::Instant::now());
        let width = 30;
        let total = self.total.max(1) as f64;
        let part = (self.done_rows as f64 / total).min(1.0);
        let filled = (part * width as f64) as usize;
        eprint!(
            "\r[{}{}] {}/{} messages",
            "#".repeat(filled),
            " ".repeat(width - filled),
            self.done_rows,
            self.total
        );
    }

    fn done(&self) {
        if self.terminal && self.shown.is_some() {
            eprintln!();
        }
    }
}
