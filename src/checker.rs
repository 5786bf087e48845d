//! The history checker: records, per client, every send (its `client_msg_id` and the ack's
//! seq or the error) and every message received per room, and compares them with the rooms'
//! stored history. It reports acked messages that were lost, duplicates, reordering, seq gaps
//! and stored messages nobody sent. Used by the fault tests and the load tool; pure bookkeeping,
//! it calls nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::ids::Seq;

/// One stored message as the database (or a full history read) has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: Seq,
    pub from: String,
    pub client_msg_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Pending,
    Acked(Seq),
    Failed(String),
}

#[derive(Debug, Default)]
struct ClientLog {
    user: String,
    /// (room, client_msg_id) -> latest outcome; retries overwrite.
    sends: HashMap<(String, String), Outcome>,
    /// room -> seqs in arrival order.
    received: HashMap<String, Vec<Seq>>,
    /// room -> seq intervals (after, until] the client claims to have seen completely.
    covered: HashMap<String, Vec<(Seq, Option<Seq>)>>,
}

/// Records of a run; see [`History::verdict`].
#[derive(Debug, Default)]
pub struct History {
    clients: BTreeMap<String, ClientLog>,
}

/// What the checker found. A run is good only when [`Verdict::is_clean`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub acked: usize,
    pub delivered: usize,
    /// Acked but missing from the store, or not received by a client that covered its seq.
    pub lost: Vec<String>,
    /// Received twice by one client, or stored twice for one client_msg_id.
    pub duplicated: Vec<String>,
    /// Received out of seq order.
    pub reordered: Vec<String>,
    /// A seq missing from a room's stored history, or an unacked gap in a covered interval.
    pub gaps: Vec<String>,
    /// Stored with a client_msg_id that no client sent, or acked with a seq that holds another message.
    pub phantom: Vec<String>,
}

impl Verdict {
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.reordered.is_empty()
            && self.gaps.is_empty()
            && self.phantom.is_empty()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} acked, {} delivered: {} lost, {} duplicated, {} reordered, {} gaps, {} phantom",
            self.acked,
            self.delivered,
            self.lost.len(),
            self.duplicated.len(),
            self.reordered.len(),
            self.gaps.len(),
            self.phantom.len()
        )?;
        for (name, list) in [
            ("lost", &self.lost),
            ("duplicated", &self.duplicated),
            ("reordered", &self.reordered),
            ("gap", &self.gaps),
            ("phantom", &self.phantom),
        ] {
            for item in list.iter().take(10) {
                write!(f, "\n  {name}: {item}")?;
            }
        }
        Ok(())
    }
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    fn client(&mut self, client: &str, user: &str) -> &mut ClientLog {
        let log = self.clients.entry(client.to_string()).or_default();
        if log.user.is_empty() {
            log.user = user.to_string();
        }
        log
    }

    /// `client` (logged in as `user`) sent `client_msg_id` to `room`; no reply yet.
    pub fn sent(&mut self, client: &str, user: &str, room: &str, client_msg_id: &str) {
        self.client(client, user)
            .sends
            .entry((room.to_string(), client_msg_id.to_string()))
            .or_insert(Outcome::Pending);
    }

    pub fn acked(&mut self, client: &str, user: &str, room: &str, client_msg_id: &str, seq: Seq) {
        self.client(client, user).sends.insert(
            (room.to_string(), client_msg_id.to_string()),
            Outcome::Acked(seq),
        );
    }

    /// The send got an error reply (`code`). A later retry that is acked overrides it.
    pub fn failed(
        &mut self,
        client: &str,
        user: &str,
        room: &str,
        client_msg_id: &str,
        code: &str,
    ) {
        let entry = self
            .client(client, user)
            .sends
            .entry((room.to_string(), client_msg_id.to_string()))
            .or_insert(Outcome::Pending);
        if !matches!(entry, Outcome::Acked(_)) {
            *entry = Outcome::Failed(code.to_string());
        }
    }

    /// `client` received message `seq` of `room` (live or as recovery).
    pub fn received(&mut self, client: &str, room: &str, seq: Seq) {
        // Called for every delivery of a load run: one look-up, names allocated only once.
        let Some(log) = self.clients.get_mut(client) else {
            let mut log = ClientLog::default();
            log.received.insert(room.to_string(), vec![seq]);
            self.clients.insert(client.to_string(), log);
            return;
        };
        match log.received.get_mut(room) {
            Some(seqs) => seqs.push(seq),
            None => {
                log.received.insert(room.to_string(), vec![seq]);
            }
        }
    }

    /// Where `client` resumes `room` from after a reconnect (`join {after}`): the highest seq
    /// it received or was covered from, 0 when it has neither.
    pub fn resume_point(&self, client: &str, room: &str) -> Seq {
        let Some(log) = self.clients.get(client) else {
            return Seq(0);
        };
        let received = log.received.get(room).into_iter().flatten().copied();
        let covered = log.covered.get(room).into_iter().flatten().map(|c| c.0);
        received.chain(covered).max().unwrap_or(Seq(0))
    }

    /// `client` claims to have received every message of `room` with seq > `after`
    /// (up to `until`, or to the end of the run when None): it stayed joined or recovered.
    pub fn covers(&mut self, client: &str, room: &str, after: Seq, until: Option<Seq>) {
        self.clients
            .entry(client.to_string())
            .or_default()
            .covered
            .entry(room.to_string())
            .or_default()
            .push((after, until));
    }

    /// Compares the records with `stored`: each room's full history as read back at the end.
    pub fn verdict(&self, stored: &BTreeMap<String, Vec<StoredMessage>>) -> Verdict {
        let mut v = Verdict::default();
        let mut by_seq: HashMap<(&str, Seq), &StoredMessage> = HashMap::new();
        let mut by_key: HashMap<(&str, &str, &str), Seq> = HashMap::new();
        for (room, messages) in stored {
            let mut expected = 1;
            for m in messages {
                if m.seq.0 != expected {
                    v.gaps.push(format!(
                        "{room}: stored seq {} where {expected} was expected",
                        m.seq
                    ));
                }
                expected = m.seq.0 + 1;
                if by_seq.insert((room, m.seq), m).is_some() {
                    v.duplicated
                        .push(format!("{room}: seq {} stored twice", m.seq));
                }
                if let Some(key) = &m.client_msg_id {
                    if let Some(first) = by_key.insert((room, &m.from, key), m.seq) {
                        v.duplicated.push(format!(
                            "{room}: {}'s {key} stored as seq {first} and {}",
                            m.from, m.seq
                        ));
                    }
                }
            }
        }

        let mut sent_keys: BTreeSet<(String, String, String)> = BTreeSet::new();
        let mut acked_seqs: BTreeMap<(String, Seq), String> = BTreeMap::new();
        for (name, client) in &self.clients {
            for ((room, key), outcome) in &client.sends {
                sent_keys.insert((room.clone(), client.user.clone(), key.clone()));
                let Outcome::Acked(seq) = outcome else {
                    continue;
                };
                v.acked += 1;
                match by_seq.get(&(room.as_str(), *seq)) {
                    None => v.lost.push(format!("{room}: {name}'s {key} acked as seq {seq} but not stored")),
                    Some(m) if m.from != client.user || m.client_msg_id.as_deref() != Some(key) => {
                        v.phantom.push(format!("{room}: {name}'s {key} acked as seq {seq}, which holds another message"))
                    }
                    Some(_) => {}
                }
                acked_seqs.insert((room.clone(), *seq), format!("{name}'s {key}"));
            }
        }
        for (room, from, key) in by_key.keys() {
            let known = sent_keys.contains(&(room.to_string(), from.to_string(), key.to_string()));
            let tracked = self.clients.values().any(|c| c.user == *from);
            if tracked && !known {
                v.phantom
                    .push(format!("{room}: {from}'s {key} stored but never sent"));
            }
        }

        for (name, client) in &self.clients {
            for (room, seqs) in &client.received {
                v.delivered += seqs.len();
                let mut seen = BTreeSet::new();
                let mut last = Seq(0);
                for seq in seqs {
                    if !seen.insert(*seq) {
                        v.duplicated
                            .push(format!("{name} received {room} seq {seq} twice"));
                    } else if *seq <= last {
                        v.reordered
                            .push(format!("{name} received {room} seq {seq} after {last}"));
                    }
                    last = last.max(*seq);
                }
                let end = stored
                    .get(room)
                    .and_then(|m| m.last())
                    .map(|m| m.seq)
                    .unwrap_or(Seq(0));
                for (after, until) in client.covered.get(room).into_iter().flatten() {
                    let until = until.unwrap_or(end);
                    for s in (after.0 + 1)..=until.0 {
                        if seen.contains(&Seq(s)) {
                            continue;
                        }
                        match acked_seqs.get(&(room.clone(), Seq(s))) {
                            Some(what) => v
                                .lost
                                .push(format!("{name} never received {room} seq {s} ({what})")),
                            None => v.gaps.push(format!("{name} never received {room} seq {s}")),
                        }
                    }
                }
            }
            for (room, _) in client
                .covered
                .iter()
                .filter(|(r, _)| !client.received.contains_key(*r))
            {
                let end = stored
                    .get(room)
                    .and_then(|m| m.last())
                    .map(|m| m.seq)
                    .unwrap_or(Seq(0));
                for (after, until) in &client.covered[room] {
                    if until.unwrap_or(end) > *after {
                        v.gaps.push(format!(
                            "{name} received nothing of {room} after seq {after}"
                        ));
                    }
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(room: &str, items: &[(i64, &str, &str)]) -> BTreeMap<String, Vec<StoredMessage>> {
        let messages = items
            .iter()
            .map(|(seq, from, key)| StoredMessage {
                seq: Seq(*seq),
                from: from.to_string(),
                client_msg_id: Some(key.to_string()),
            })
            .collect();
        BTreeMap::from([(room.to_string(), messages)])
    }

    #[test]
    fn a_clean_run_is_clean() {
        let mut h = History::new();
        h.sent("a", "ann", "r", "k1");
        h.acked("a", "ann", "r", "k1", Seq(1));
        h.sent("a", "ann", "r", "k2");
        h.failed("a", "ann", "r", "k2", "unavailable");
        h.acked("a", "ann", "r", "k2", Seq(2));
        h.covers("b", "r", Seq(0), None);
        h.received("b", "r", Seq(1));
        h.received("b", "r", Seq(2));
        let v = h.verdict(&stored("r", &[(1, "ann", "k1"), (2, "ann", "k2")]));
        assert!(v.is_clean(), "{v}");
        assert_eq!((v.acked, v.delivered), (2, 2));
    }

    #[test]
    fn finds_lost_duplicated_reordered_and_gaps() {
        let mut h = History::new();
        for (k, s) in [("k1", 1), ("k2", 2), ("k3", 3)] {
            h.acked("a", "ann", "r", k, Seq(s));
        }
        h.acked("a", "ann", "r", "k9", Seq(9));
        h.covers("b", "r", Seq(0), None);
        h.received("b", "r", Seq(2));
        h.received("b", "r", Seq(1));
        h.received("b", "r", Seq(2));
        let v = h.verdict(&stored(
            "r",
            &[(1, "ann", "k1"), (2, "ann", "k2"), (3, "ann", "k3")],
        ));
        assert!(!v.is_clean());
        assert!(v.lost.iter().any(|l| l.contains("k9")), "{v}");
        assert!(v.lost.iter().any(|l| l.contains("seq 3")), "{v}");
        assert_eq!(v.duplicated.len(), 1, "{v}");
        assert_eq!(v.reordered.len(), 1, "{v}");
    }

    #[test]
    fn finds_double_stores_and_phantoms() {
        let mut h = History::new();
        h.acked("a", "ann", "r", "k1", Seq(1));
        let v = h.verdict(&stored(
            "r",
            &[(1, "ann", "k1"), (2, "ann", "k1"), (3, "ann", "zz")],
        ));
        assert_eq!(v.duplicated.len(), 1, "{v}");
        assert_eq!(v.phantom.len(), 1, "{v}");
        let v = h.verdict(&stored("r", &[(2, "ann", "k1")]));
        assert!(!v.gaps.is_empty() && !v.lost.is_empty(), "{v}");
    }
}
