//! The budget for payloads held in memory: small payloads skip the spool,
//! and together they never hold more than `--memory-payload-budget` bytes,
//! however many calls a client opens — beyond it calls spool as before.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aipod::codec::bridge::INLINE_MAX;

/// The largest payload (declared size) held in memory.
pub(crate) const MEMORY_PAYLOAD_MAX: u64 = INLINE_MAX;

/// `--memory-payload-budget`'s default.
pub(crate) const DEFAULT_MEMORY_PAYLOAD_BUDGET: u64 = 64 << 20;

/// Bytes that in-memory payloads may hold, and hold now.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes (0: every payload is spooled).
    pub(crate) fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self { limit, used: AtomicU64::new(0) })
    }

    /// Reserves room for a payload of `declared` bytes, if it is small
    /// enough and the budget has room.
    pub(crate) fn reserve(self: &Arc<Self>, declared: u64) -> Option<Reservation> {
        if declared > MEMORY_PAYLOAD_MAX {
            return None;
        }
        // A payload of 0 bytes still holds a call's bookkeeping: count 1.
        let bytes = declared.max(1);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|after| *after <= self.limit)
            })
            .ok()?;
        Some(Reservation { budget: Arc::clone(self), bytes })
    }

    /// Bytes reserved now.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Room for one call's payload in memory, returned when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_bounds_what_memory_holds() {
        let budget = MemoryBudget::new(300 << 10);
        assert!(budget.reserve(MEMORY_PAYLOAD_MAX + 1).is_none(), "too large for memory");
        let a = budget.reserve(200 << 10).expect("room");
        assert!(budget.reserve(200 << 10).is_none(), "over the budget: spooled instead");
        let b = budget.reserve(100 << 10).expect("exactly full");
        assert_eq!(budget.used(), 300 << 10);
        drop(a);
        assert!(budget.reserve(150 << 10).is_some(), "room again once a call ends");
        drop(b);
        assert_eq!(budget.used(), 0);
        assert!(MemoryBudget::new(0).reserve(0).is_none(), "a budget of 0 spools everything");
    }
}
