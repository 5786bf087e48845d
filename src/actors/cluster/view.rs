//! What this node knows of the other nodes' presence: for each live node, the version of its
//! presence and who is joined to which room there. A value without IO: the cluster actor
//! feeds it the events and snapshots it reads from Redis and sends the rooms whose remote
//! members changed what they are now.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::ids::UserId;

/// The users joined to one room on one node, by id, with their registered spelling.
pub type Members = BTreeMap<UserId, String>;

/// A node's presence as it writes it with its heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Grows with every change of the node's presence, so a snapshot older than an event
    /// already applied is recognised and ignored.
    pub version: u64,
    pub rooms: BTreeMap<String, Members>,
}

impl Snapshot {
    /// Applies one change; returns whether anything changed.
    pub fn set(&mut self, room: &str, user: UserId, username: &str, present: bool) -> bool {
        if present {
            let members = self.rooms.entry(room.to_string()).or_default();
            members.insert(user, username.to_string()).as_deref() != Some(username)
        } else {
            let Some(members) = self.rooms.get_mut(room) else {
                return false;
            };
            let removed = members.remove(&user).is_some();
            if members.is_empty() {
                self.rooms.remove(room);
            }
            removed
        }
    }
}

#[derive(Debug, Default)]
pub struct RemoteView {
    nodes: HashMap<String, Snapshot>,
}

impl RemoteView {
    /// A presence change announced by `node`. Returns the room when its members changed.
    pub fn event(
        &mut self,
        node: &str,
        version: u64,
        room: &str,
        user: UserId,
        username: &str,
        present: bool,
    ) -> Option<String> {
        let snapshot = self.nodes.entry(node.to_string()).or_default();
        if version <= snapshot.version && snapshot.version != 0 {
            return None;
        }
        snapshot.version = version;
        snapshot
            .set(room, user, username, present)
            .then(|| room.to_string())
    }

    /// `node`'s snapshot, read from Redis: replaces what is known of it unless an event newer
    /// than the snapshot was applied already. Returns the rooms whose members changed.
    pub fn snapshot(&mut self, node: &str, snapshot: Snapshot) -> BTreeSet<String> {
        let known = self.nodes.get(node);
        if known.is_some_and(|k| k.version > snapshot.version) {
            return BTreeSet::new();
        }
        let changed = changed_rooms(known, Some(&snapshot));
        self.nodes.insert(node.to_string(), snapshot);
        changed
    }

    /// Forgets the nodes not in `alive` (their heartbeat ran out). Returns the rooms whose
    /// members changed and the nodes forgotten.
    pub fn keep_only(&mut self, alive: &BTreeSet<String>) -> (BTreeSet<String>, Vec<String>) {
        let dead: Vec<String> = self
            .nodes
            .keys()
            .filter(|node| !alive.contains(*node))
            .cloned()
            .collect();
        let mut changed = BTreeSet::new();
        for node in &dead {
            if let Some(gone) = self.nodes.remove(node) {
                changed.extend(changed_rooms(Some(&gone), None));
            }
        }
        (changed, dead)
    }

    /// Who is joined to `room` on any other node.
    pub fn members(&self, room: &str) -> Members {
        let mut all = Members::new();
        for snapshot in self.nodes.values() {
            if let Some(members) = snapshot.rooms.get(room) {
                all.extend(members.iter().map(|(id, name)| (*id, name.clone())));
            }
        }
        all
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }
}

fn changed_rooms(before: Option<&Snapshot>, after: Option<&Snapshot>) -> BTreeSet<String> {
    let empty = BTreeMap::new();
    let before = before.map_or(&empty, |s| &s.rooms);
    let after = after.map_or(&empty, |s| &s.rooms);
    before
        .keys()
        .chain(after.keys())
        .filter(|room| before.get(*room) != after.get(*room))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn events_and_snapshots_of_a_node_apply_in_version_order() {
        let mut view = RemoteView::default();
        assert_eq!(
            view.event("b", 1, "general", UserId(1), "ann", true),
            Some("general".into())
        );
        assert_eq!(
            view.event("b", 2, "general", UserId(2), "bob", true),
            Some("general".into())
        );
        // A snapshot written before the second event is older than what is known.
        let mut old = Snapshot {
            version: 1,
            ..Snapshot::default()
        };
        old.set("general", UserId(1), "ann", true);
        assert!(view.snapshot("b", old).is_empty());
        assert_eq!(view.members("general").len(), 2);
        // A repeated event changes nothing.
        assert_eq!(view.event("b", 2, "general", UserId(2), "bob", true), None);
        // A newer snapshot replaces it all.
        let mut newer = Snapshot {
            version: 5,
            ..Snapshot::default()
        };
        newer.set("other", UserId(1), "ann", true);
        assert_eq!(view.snapshot("b", newer), alive(&["general", "other"]));
        assert!(view.members("general").is_empty());
        assert_eq!(
            view.members("other").get(&UserId(1)).map(String::as_str),
            Some("ann")
        );
    }

    #[test]
    fn a_dead_node_takes_its_users_with_it_but_not_those_also_elsewhere() {
        let mut view = RemoteView::default();
        view.event("b", 1, "general", UserId(1), "ann", true);
        view.event("c", 1, "general", UserId(1), "ann", true);
        view.event("c", 2, "general", UserId(3), "cat", true);
        let (changed, dead) = view.keep_only(&alive(&["b"]));
        assert_eq!(changed, alive(&["general"]));
        assert_eq!(dead, vec!["c".to_string()]);
        let members = view.members("general");
        assert_eq!(members.values().collect::<Vec<_>>(), vec!["ann"]);
        assert_eq!(view.nodes(), 1);
        assert_eq!(view.keep_only(&alive(&["b"])).1, Vec::<String>::new());
    }

    #[test]
    fn leaving_the_last_member_removes_the_room() {
        let mut snapshot = Snapshot::default();
        assert!(snapshot.set("r", UserId(1), "ann", true));
        assert!(!snapshot.set("r", UserId(1), "ann", true));
        assert!(snapshot.set("r", UserId(1), "ann", false));
        assert!(!snapshot.set("r", UserId(1), "ann", false));
        assert!(snapshot.rooms.is_empty());
    }
}
