//! The seqs a room that does not store its messages hands out itself: blocks reserved in the
//! database (so that seqs keep increasing across restarts and nodes), used in order, the next
//! block asked for before the current one runs out. Plain data.

use std::collections::VecDeque;

use crate::ids::Seq;

/// Seqs reserved at a time.
pub const BLOCK: i64 = 256;

#[derive(Debug, Default)]
pub struct ReservedSeqs {
    /// Reserved and unused: (next, last) each.
    blocks: VecDeque<(Seq, Seq)>,
    reserving: bool,
}

impl ReservedSeqs {
    /// The next reserved seq after `delivered`; None when the reserve is spent.
    pub fn next_after(&mut self, delivered: Seq) -> Option<Seq> {
        while let Some((next, last)) = self.blocks.front_mut() {
            if *next <= delivered {
                *next = delivered.next();
            }
            if *next <= *last {
                let seq = *next;
                *next = seq.next();
                return Some(seq);
            }
            self.blocks.pop_front();
        }
        None
    }

    fn remaining(&self) -> i64 {
        self.blocks
            .iter()
            .map(|(next, last)| last.0 - next.0 + 1)
            .sum()
    }

    /// Whether to ask for another block now (one request at a time).
    pub fn wants_more(&self) -> bool {
        !self.reserving && self.remaining() < BLOCK / 2
    }

    pub fn reserving(&mut self) {
        self.reserving = true;
    }

    pub fn is_reserving(&self) -> bool {
        self.reserving
    }

    /// A block ending at `last` was reserved.
    pub fn reserved(&mut self, last: Seq) {
        self.reserving = false;
        self.blocks.push_back((Seq(last.0 - BLOCK + 1), last));
    }

    pub fn failed(&mut self) {
        self.reserving = false;
    }

    /// The room stores its messages again: the reserve is dropped. Returns the last seq it
    /// held; the database's seqs continue after it.
    pub fn drop_all(&mut self) -> Option<Seq> {
        self.blocks.drain(..).map(|(_, last)| last).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_used_in_order_without_gaps_and_the_next_is_asked_for_early() {
        let mut seqs = ReservedSeqs::default();
        assert!(seqs.wants_more());
        assert_eq!(seqs.next_after(Seq(0)), None);
        seqs.reserving();
        assert!(!seqs.wants_more(), "one request at a time");
        seqs.reserved(Seq(BLOCK));
        let mut handed = Vec::new();
        let mut delivered = Seq(0);
        for _ in 0..BLOCK / 2 + 1 {
            let seq = seqs.next_after(delivered).unwrap();
            handed.push(seq.0);
            delivered = seq;
        }
        assert!(seqs.wants_more(), "half spent");
        seqs.reserving();
        seqs.reserved(Seq(3 * BLOCK)); // another node reserved the block in between
        while let Some(seq) = seqs.next_after(delivered) {
            handed.push(seq.0);
            delivered = seq;
        }
        let expected: Vec<i64> = (1..=BLOCK).chain(2 * BLOCK + 1..=3 * BLOCK).collect();
        assert_eq!(
            handed, expected,
            "the first block is used up before the next"
        );
    }

    #[test]
    fn a_seq_at_or_below_the_delivered_one_is_never_handed_out() {
        let mut seqs = ReservedSeqs::default();
        seqs.reserving();
        seqs.reserved(Seq(BLOCK));
        assert_eq!(seqs.next_after(Seq(10)), Some(Seq(11)));
        assert_eq!(seqs.next_after(Seq(BLOCK)), None);
    }

    #[test]
    fn dropping_the_reserve_says_where_the_database_continues() {
        let mut seqs = ReservedSeqs::default();
        seqs.reserving();
        seqs.reserved(Seq(BLOCK));
        seqs.next_after(Seq(0));
        assert_eq!(seqs.drop_all(), Some(Seq(BLOCK)));
        assert_eq!(seqs.next_after(Seq(0)), None);
    }
}
