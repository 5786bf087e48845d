//! Live reload of the room policy file. SIGHUP, or a change of the file on disk (a watcher
//! with a debounce), reads the whole file and checks it: an invalid file changes nothing and
//! its problems are logged with file, line and column; a valid one is synced to the database
//! (config rooms created or reopened, removed ones closed) and handed to the running rooms by
//! the directory, which kick whom they no longer admit. Each reload logs one line. Calls the
//! DB executor and the directory.

use actix::{Addr, Recipient};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use crate::actors::cluster::{PolicyReloaded, RELOADED_ON_ANOTHER_NODE};
use crate::actors::db::{DbExecutor, SyncConfigRooms};
use crate::actors::directory::{ApplyPolicies, Directory};
use crate::config::Config;
use crate::error::ConfigProblem;
use crate::metrics::METRICS;
use crate::policy::Policies;

/// How long the file must be quiet after a change before it is read.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Where the policy file is, and whether it must exist.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub path: PathBuf,
    pub required: bool,
    /// The frame limit every room's body limit must fit in (1 KiB of envelope spare).
    pub max_frame_bytes: usize,
}

impl PolicySource {
    pub fn of(config: &Config) -> PolicySource {
        PolicySource {
            path: config.rooms.policy_file.clone(),
            required: config.rooms.policy_file_set,
            max_frame_bytes: config.session.max_frame_bytes,
        }
    }

    /// Reads and checks the file at start: a file that was not set and is missing means the
    /// defaults only.
    pub fn load(&self) -> Result<Policies, Vec<ConfigProblem>> {
        Policies::load(&self.path, self.required, self.max_body_bytes())
    }

    /// Reads and checks the file on a reload: a missing file is refused (it changes nothing,
    /// rather than closing every room the file defined).
    fn reload(&self) -> Result<Policies, Vec<ConfigProblem>> {
        Policies::load(&self.path, true, self.max_body_bytes())
    }

    /// The largest body a room may allow: 1 KiB below the frame limit.
    fn max_body_bytes(&self) -> usize {
        self.max_frame_bytes.saturating_sub(1024)
    }
}

/// The rooms the policy file defines, with their kind, as the database keeps them.
pub fn defined_rooms(policies: &Policies) -> Vec<(String, crate::protocol::RoomKind)> {
    policies
        .rooms
        .iter()
        .map(|(name, room)| (name.to_string(), room.kind))
        .collect()
}

/// What a reload changed, for its log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

impl Changes {
    pub fn between(old: &Policies, new: &Policies) -> Changes {
        let mut changes = Changes::default();
        for (name, room) in &new.rooms {
            match old.rooms.get(name) {
                None => changes.added += 1,
                Some(before) if before != room => changes.changed += 1,
                Some(_) => {}
            }
        }
        changes.removed = old
            .rooms
            .keys()
            .filter(|n| !new.rooms.contains_key(*n))
            .count();
        if old.defaults != new.defaults || old.users != new.users {
            changes.changed += 1;
        }
        changes
    }
}

/// Reloads on every trigger until the triggers end (the server stops).
/// What makes a reload: the file changed, SIGHUP, another node of the cluster reloaded.
pub type Triggers = (
    mpsc::UnboundedSender<&'static str>,
    mpsc::UnboundedReceiver<&'static str>,
);

pub fn triggers() -> Triggers {
    mpsc::unbounded_channel()
}

pub async fn run(
    source: PolicySource,
    initial: Arc<Policies>,
    db: Addr<DbExecutor>,
    directory: Addr<Directory>,
    (tx, mut triggers): Triggers,
    cluster: Option<Recipient<PolicyReloaded>>,
) {
    let _watcher = watch(&source.path, tx.clone());
    actix::spawn(on_sighup(tx));
    let mut current = initial;
    while let Some(mut trigger) = triggers.recv().await {
        // A save is several events (or a slow write): wait until the file has been quiet for
        // the debounce, then read it once.
        loop {
            tokio::time::sleep(DEBOUNCE).await;
            let mut more = false;
            while let Ok(next) = triggers.try_recv() {
                more = true;
                if next == SIGHUP {
                    trigger = SIGHUP;
                }
            }
            if !more {
                break;
            }
        }
        let before = current.clone();
        current = reload(&source, current, &db, &directory, trigger).await;
        if trigger != RELOADED_ON_ANOTHER_NODE && !Arc::ptr_eq(&before, &current) {
            if let Some(cluster) = &cluster {
                cluster.do_send(PolicyReloaded);
            }
        }
    }
}

const SIGHUP: &str = "SIGHUP";
const CHANGED: &str = "file changed";

async fn reload(
    source: &PolicySource,
    current: Arc<Policies>,
    db: &Addr<DbExecutor>,
    directory: &Addr<Directory>,
    trigger: &str,
) -> Arc<Policies> {
    let file = source.path.display();
    let policies = match source.reload() {
        // A change on disk that leaves the policies as they are (a save of the same text, a
        // touch) is not worth a line; an operator's SIGHUP always gets one.
        Ok(unchanged) if trigger != SIGHUP && unchanged == *current => return current,
        Ok(policies) => Arc::new(policies),
        Err(problems) => {
            let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
            METRICS.reloads.with_label_values(&["invalid"]).inc();
            log::error!(
                "room policies ({trigger}): {file} rejected, nothing changed: {}",
                list.join("; ")
            );
            return current;
        }
    };
    let synced = db
        .send(SyncConfigRooms {
            rooms: defined_rooms(&policies),
        })
        .await;
    if let Err(e) = synced
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        METRICS.reloads.with_label_values(&["failed"]).inc();
        log::error!("room policies ({trigger}): {file} not applied, the database failed: {e}");
        return current;
    }
    METRICS.reloads.with_label_values(&["applied"]).inc();
    let changes = Changes::between(&current, &policies);
    let kicked = directory
        .send(ApplyPolicies {
            policies: policies.clone(),
        })
        .await
        .unwrap_or(0);
    log::info!(
        "room policies ({trigger}): {file} applied: {} room(s) added, {} changed, {} removed, {kicked} user(s) kicked",
        changes.added,
        changes.changed,
        changes.removed
    );
    policies
}

/// Watches the file's folder (editors often replace a file rather than write it in place)
/// for changes of the file: writes, creations, renames and removals, not reads. Kubernetes
/// mounts a ConfigMap as symlinks through `..data`, which it swaps: changes of `..`-names
/// count too (a reload of an unchanged file changes nothing and logs nothing).
fn watch(path: &Path, tx: mpsc::UnboundedSender<&'static str>) -> Option<RecommendedWatcher> {
    let file = path.file_name()?.to_os_string();
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let changes = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        );
        let ours = |p: &PathBuf| {
            p.file_name().is_some_and(|name| {
                name == file.as_os_str() || name.to_string_lossy().starts_with("..")
            })
        };
        if changes && event.paths.iter().any(ours) {
            let _ = tx.send(CHANGED);
        }
    })
    .map_err(|e| log::warn!("room policies: cannot watch {}: {e}", folder.display()))
    .ok()?;
    if let Err(e) = watcher.watch(&folder, RecursiveMode::NonRecursive) {
        log::warn!(
            "room policies: cannot watch {} (reload with SIGHUP): {e}",
            folder.display()
        );
    }
    Some(watcher)
}

async fn on_sighup(tx: mpsc::UnboundedSender<&'static str>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        log::warn!("room policies: cannot listen for SIGHUP");
        return;
    };
    while hup.recv().await.is_some() {
        if tx.send(SIGHUP).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_count_rooms_added_changed_and_removed() {
        let old = Policies::parse(
            "[[room]]\nname = \"a\"\nkind = \"public\"\n[[room]]\nname = \"b\"\nkind = \"public\"\n",
            "old",
        )
        .unwrap();
        let new = Policies::parse(
            "[[room]]\nname = \"a\"\nkind = \"public\"\nread_only = true\n[[room]]\nname = \"c\"\nkind = \"public\"\n",
            "new",
        )
        .unwrap();
        assert_eq!(
            Changes::between(&old, &new),
            Changes {
                added: 1,
                changed: 1,
                removed: 1
            }
        );
        assert_eq!(Changes::between(&new, &new), Changes::default());
    }
}
