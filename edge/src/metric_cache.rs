//! A per-thread cache of a Prometheus family's children, for the metrics recorded per request.
//!
//! The family's own lookup (`with_label_values`) hashes the label values with FNV a byte at a time, looks the
//! hash up in a `HashMap` under a read lock and clones the child's `Arc`: ~200 instructions a call, up to three
//! calls a request (duration, upstream time, a rate-limit decision per zone of the route), and atomic writes
//! to lines that every core shares. Here a thread finds the child by a few words
//! that determine the label values, in a small direct-mapped table of its own: no string is read, no lock
//! taken. A miss (first use, or another tuple in the same slot) asks the family and keeps the child.
//!
//! A key is only sound when its words determine every label value: a number the value is made from, the
//! address and length of a `&'static str`, or the address of an `Arc<str>` the slot keeps (`keep`), so that the
//! allocation cannot be freed and its address reused for another text while the slot remembers it. Children
//! are never removed from a family (the edge removes no label values), so a remembered child is always the one
//! the family renders. The key does not name the family: each table (a `thread_local!` beside its call site)
//! serves one family, which holds while a process has one proxy and one set of rate-limit metrics.

use std::cell::RefCell;
use std::sync::Arc;
use std::thread::LocalKey;

/// Slots per thread and family: a handful of routes times methods and status codes fits; a collision only
/// costs the family's lookup.
const SLOTS: usize = 64;

/// Words that determine a tuple of label values (see the module's documentation).
pub type Key = [usize; 4];

/// The key words of a `&'static str`: its address and length.
pub fn static_words(s: &'static str) -> [usize; 2] {
    [s.as_ptr() as usize, s.len()]
}

/// The key word of an `Arc<str>` the slot keeps: its address.
pub fn arc_word(s: &Arc<str>) -> usize {
    Arc::as_ptr(s).cast::<u8>() as usize
}

pub struct Children<C> {
    slots: Vec<Option<Slot<C>>>,
}

struct Slot<C> {
    key: Key,
    /// Holds the `Arc<str>` whose address is in `key`.
    _keep: Option<Arc<str>>,
    child: C,
}

impl<C> Default for Children<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> Children<C> {
    pub const fn new() -> Self {
        Self { slots: Vec::new() }
    }

    /// The child for `key`: the one remembered, or the one `make` returns (kept in place of the slot's last
    /// one, with `keep`); `None` when `make` has none.
    pub fn get(&mut self, key: Key, keep: Option<&Arc<str>>, make: impl FnOnce() -> Option<C>) -> Option<&C> {
        if self.slots.is_empty() {
            self.slots.resize_with(SLOTS, || None);
        }
        let i = slot_of(&key);
        if !matches!(&self.slots[i], Some(s) if s.key == key) {
            let child = make()?;
            self.slots[i] = Some(Slot { key, _keep: keep.cloned(), child });
        }
        self.slots[i].as_ref().map(|s| &s.child)
    }
}

/// Runs `f` on this thread's child for `key` in `table` (made by `make` on a miss, see [`Children::get`]);
/// nothing when `make` has none, or when the thread's tables are already gone (thread exit).
pub fn with_child<C>(
    table: &'static LocalKey<RefCell<Children<C>>>,
    key: Key,
    keep: Option<&Arc<str>>,
    make: impl FnOnce() -> Option<C>,
    f: impl FnOnce(&C),
) {
    let _ = table.try_with(|children| {
        // `make` and `f` only reach the family and the child: the table is never borrowed twice.
        let Ok(mut children) = children.try_borrow_mut() else { return };
        if let Some(child) = children.get(key, keep, make) {
            f(child);
        }
    });
}

/// The child a family made, or `None` after reporting why (a wrong number of label values: a programming error,
/// which test builds turn into a panic, as the family's own `with_label_values` would).
pub fn made<C, E: std::fmt::Display>(child: Result<C, E>) -> Option<C> {
    match child {
        Ok(c) => Some(c),
        Err(e) => {
            if cfg!(debug_assertions) {
                panic!("metric child not made: {e}");
            }
            tracing::error!(error = %e, "metric child not made; not recorded");
            None
        }
    }
}

/// A slot from the key's words, mixed by a multiplication (Fibonacci hashing); the table's size is a power of
/// two, its index the product's top bits.
fn slot_of(key: &Key) -> usize {
    let mixed = key.iter().fold(0u64, |h, &w| (h.rotate_left(23) ^ w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (mixed >> (u64::BITS - SLOTS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_child_is_made_once_per_key_and_kept() {
        let mut c: Children<u32> = Children::new();
        let made = Cell::new(0);
        let make = |v| {
            made.set(made.get() + 1);
            Some(v)
        };
        assert_eq!(c.get([1, 2, 3, 4], None, || make(7)), Some(&7));
        assert_eq!(c.get([1, 2, 3, 4], None, || make(8)), Some(&7), "remembered, not made again");
        assert_eq!(made.get(), 1);
        assert_eq!(c.get([1, 2, 3, 5], None, || make(9)), Some(&9), "another key is another child");
        assert_eq!(made.get(), 2);
        // Nothing made: nothing remembered either, and the slot's child stays for its own key.
        assert_eq!(c.get([9, 9, 9, 9], None, || None), None);
        assert_eq!(c.get([9, 9, 9, 9], None, || make(10)), Some(&10));
        let key = [9, 9, 9, 9];
        assert_eq!(c.get([9, 9, 9, 8], None, || None), None);
        assert_eq!(c.get(key, None, || make(11)), Some(&10), "a failed make left the slot alone");
    }

    #[test]
    fn every_key_gets_its_own_child_whatever_the_collisions() {
        // More keys than slots: each lookup still answers its own key's child, made again after an eviction.
        let mut c: Children<usize> = Children::new();
        let keys: Vec<Key> = (0..4 * SLOTS).map(|n| [n, n % 3, 200 + n % 5, 0]).collect();
        for _ in 0..2 {
            for (n, k) in keys.iter().enumerate() {
                assert_eq!(c.get(*k, None, || Some(n)), Some(&n));
            }
        }
    }

    #[test]
    fn a_kept_text_stays_allocated_while_its_slot_remembers_it() {
        let route: Arc<str> = Arc::from("orders");
        let mut c: Children<&str> = Children::new();
        let key = [arc_word(&route), 0, 0, 0];
        c.get(key, Some(&route), || Some("child"));
        assert_eq!(Arc::strong_count(&route), 2, "the slot holds the text, so its address is not reused");
        // Replaced in its slot by another key: the text is let go.
        let other = (1..).map(|n| [n, 0, 0, 0]).find(|k| slot_of(k) == slot_of(&key)).expect("a colliding key");
        c.get(other, None, || Some("other"));
        assert_eq!(Arc::strong_count(&route), 1);
    }

    #[test]
    fn with_child_runs_on_this_threads_child() {
        thread_local! {
            static TABLE: RefCell<Children<std::rc::Rc<Cell<u32>>>> = const { RefCell::new(Children::new()) };
        }
        let counter = std::rc::Rc::new(Cell::new(0));
        for _ in 0..3 {
            let make = || Some(counter.clone());
            with_child(&TABLE, [1, 0, 0, 0], None, make, |c| c.set(c.get() + 1));
        }
        assert_eq!(counter.get(), 3);
        assert_eq!(std::rc::Rc::strong_count(&counter), 2, "made once, kept by the table");
        // Another thread has a table of its own: made again there.
        let made_there = std::thread::spawn(|| {
            let made = Cell::new(false);
            let make = || {
                made.set(true);
                Some(std::rc::Rc::new(Cell::new(0)))
            };
            with_child(&TABLE, [1, 0, 0, 0], None, make, |_| ());
            made.get()
        })
        .join()
        .expect("thread");
        assert!(made_there);
    }

    #[test]
    fn a_wrong_number_of_labels_is_no_child() {
        let metrics = service_core::metrics::Metrics::new("unit").expect("metrics");
        let family = metrics.hot_counter("t_total", "t", &["a", "b"]).expect("family");
        assert!(made(family.get_metric_with_label_values(&["x", "y"])).is_some());
        let wrong = family.get_metric_with_label_values(&["x"]);
        assert!(wrong.is_err(), "the family refuses one value for two labels");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| made(wrong)));
        // Test builds panic (as `with_label_values` did); release builds log and record nothing.
        if cfg!(debug_assertions) {
            assert!(outcome.is_err());
        } else {
            assert!(matches!(outcome, Ok(None)));
        }
    }
}
