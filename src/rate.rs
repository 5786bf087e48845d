//! Token buckets, one per key (a user, an IP address): how often someone may do something,
//! with a burst. Plain data, no clock of its own: callers pass `now`. Used by the frame guard
//! (requests per connection), rooms (the send rate per user), the gate (registrations per
//! address) and sessions (a user's sends and typing across its sessions, [`SharedBuckets`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// How a bucket refills: `per_second` tokens each second, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refill {
    pub per_second: f64,
    pub burst: f64,
}

impl Refill {
    /// `count` tokens per `per_seconds`, up to `burst`.
    pub fn new(count: u32, per_seconds: u32, burst: u32) -> Refill {
        Refill {
            per_second: f64::from(count) / f64::from(per_seconds.max(1)),
            burst: f64::from(burst),
        }
    }
}

/// One bucket per key; a key seen for the first time starts with a full bucket.
#[derive(Debug)]
pub struct Buckets<K> {
    buckets: HashMap<K, Bucket>,
}

/// One token bucket.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(refill: Refill, now: Instant) -> Bucket {
        Bucket {
            tokens: refill.burst,
            at: now,
        }
    }

    /// Takes a token; false when over the rate.
    pub fn take(&mut self, refill: Refill, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * refill.per_second).min(refill.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl<K> Default for Buckets<K> {
    fn default() -> Self {
        Buckets {
            buckets: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> Buckets<K> {
    /// Takes a token of `key`; false when the key is over its rate.
    pub fn take(&mut self, key: K, refill: Refill, now: Instant) -> bool {
        self.buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(refill, now))
            .take(refill, now)
    }

    /// Forgets the buckets that have filled up again (their keys did nothing for a while), so
    /// the map is only as large as the keys recently busy.
    pub fn forget_full(&mut self, refill: Refill, now: Instant) {
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * refill.per_second
                < refill.burst
        });
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Buckets every session shares (a user's rate across all of its connections), behind a lock
/// held for one take.
#[derive(Debug)]
pub struct SharedBuckets<K> {
    refill: Refill,
    buckets: Mutex<(Buckets<K>, u32)>,
}

/// Takes between two sweeps of the buckets that filled up again.
const TAKES_PER_SWEEP: u32 = 4096;

impl<K: Hash + Eq> SharedBuckets<K> {
    pub fn new(refill: Refill) -> SharedBuckets<K> {
        SharedBuckets {
            refill,
            buckets: Mutex::new((Buckets::default(), 0)),
        }
    }

    /// Takes a token of `key`; false when the key is over its rate.
    pub fn take(&self, key: K) -> bool {
        let now = Instant::now();
        // A panic elsewhere while holding the lock leaves counts, never broken invariants.
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (buckets, takes) = &mut *guard;
        *takes += 1;
        if *takes >= TAKES_PER_SWEEP {
            *takes = 0;
            buckets.forget_full(self.refill, now);
        }
        buckets.take(key, self.refill, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_key_has_a_bucket_that_refills_at_its_rate() {
        let refill = Refill::new(2, 1, 3);
        let (mut buckets, start) = (Buckets::default(), Instant::now());
        assert_eq!((0..5).filter(|_| buckets.take(1, refill, start)).count(), 3);
        assert!(
            buckets.take(2, refill, start),
            "another key has a bucket of its own"
        );
        assert!(!buckets.take(1, refill, start));
        let later = start + Duration::from_millis(500);
        assert!(buckets.take(1, refill, later));
        assert!(!buckets.take(1, refill, later));
        buckets.forget_full(refill, start + Duration::from_secs(10));
        assert!(buckets.is_empty());
    }
}
