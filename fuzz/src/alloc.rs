//! A counting global allocator: the peak of live heap bytes on the current thread, so a target can
//! check that what a length field declares cannot make a reader allocate without bound.
//!
//! Counting is per thread (not global) because the test harness runs targets on several threads at
//! once; the readers under test allocate on the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Install with `#[global_allocator] static A: CountingAlloc = CountingAlloc;` in the binary.
pub struct CountingAlloc;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn grow(n: usize) {
    // `try_with`: the allocator also runs while thread-locals are being torn down.
    let _ = LIVE.try_with(|live| {
        let v = live.get().saturating_add(n);
        live.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
    let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
}

fn shrink(n: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are kept.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrink(layout.size());
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            grow(new_size - layout.size());
        } else {
            shrink(layout.size() - new_size);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Whether the binary counts allocations (a target's memory check is vacuous otherwise).
pub fn counting() -> bool {
    let before = ALLOCS.try_with(Cell::get).unwrap_or(0);
    drop(std::hint::black_box(Box::new(0u64)));
    ALLOCS.try_with(Cell::get).unwrap_or(0) != before
}

/// Runs `f` and returns its result with the peak of heap bytes it held live on this thread above
/// what was live before (0 when the counting allocator is not installed).
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.try_with(Cell::get).unwrap_or(0);
    let _ = PEAK.try_with(|p| p.set(base));
    let r = f();
    let peak = PEAK.try_with(Cell::get).unwrap_or(base);
    (r, peak.saturating_sub(base))
}

/// Runs `f` and panics when it held more than `cap` bytes at once: the memory cap a target checks.
pub fn within_cap<R>(what: &str, cap: usize, f: impl FnOnce() -> R) -> R {
    let (r, peak) = peak_during(f);
    assert!(
        peak <= cap,
        "{what}: peak heap {peak} bytes is over the cap of {cap} bytes"
    );
    r
}
