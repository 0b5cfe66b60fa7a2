//! Scratch buffers reused across calls.
//!
//! A loss call needs a few MB of packed operands and accumulators; allocating them fresh every
//! training step costs a page fault per 4 KiB (the allocator maps large blocks anew each time),
//! which at small N is as much as the arithmetic. Buffers are therefore returned here after a call
//! and handed out again: after the first step of a run no new pages are touched. The pool keeps at
//! most [`MAX_BUFFERS`] buffers and [`MAX_BYTES`] in total (the largest are dropped first), so what
//! it holds between calls is bounded by the previous call's working set: O((N + M) D), like the
//! call itself. `HQ_KERNELS_NO_POOL=1` disables it.

use std::sync::{Mutex, OnceLock};

const MAX_BUFFERS: usize = 48;
const MAX_BYTES: usize = 2 << 30;

struct Pools {
    f32s: Mutex<Vec<Vec<f32>>>,
    f64s: Mutex<Vec<Vec<f64>>>,
}

fn pools() -> Option<&'static Pools> {
    static P: OnceLock<Option<Pools>> = OnceLock::new();
    P.get_or_init(|| {
        (std::env::var_os("HQ_KERNELS_NO_POOL").is_none()).then(|| Pools {
            f32s: Mutex::new(Vec::new()),
            f64s: Mutex::new(Vec::new()),
        })
    })
    .as_ref()
}

/// Element types the pool holds.
pub(crate) trait Pooled: Copy + Default + Send + 'static {
    fn pool() -> Option<&'static Mutex<Vec<Vec<Self>>>>;
}

impl Pooled for f32 {
    fn pool() -> Option<&'static Mutex<Vec<Vec<f32>>>> {
        pools().map(|p| &p.f32s)
    }
}

impl Pooled for f64 {
    fn pool() -> Option<&'static Mutex<Vec<Vec<f64>>>> {
        pools().map(|p| &p.f64s)
    }
}

/// The smallest pooled buffer with room for `len` elements, if any.
fn take<T: Pooled>(len: usize) -> Option<Vec<T>> {
    let mut g = T::pool()?.lock().unwrap_or_else(|p| p.into_inner());
    let best = g
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= len)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i)?;
    Some(g.swap_remove(best))
}

/// A zeroed buffer of `len` elements, reusing a pooled one when one is large enough.
pub(crate) fn zeroed<T: Pooled>(len: usize) -> Vec<T> {
    match take(len) {
        Some(mut v) => {
            v.clear();
            v.resize(len, T::default());
            v
        }
        None => vec![T::default(); len],
    }
}

/// A buffer of `len` initialised elements with unspecified values (a pooled buffer's stale
/// contents, zeros where it had to grow): for outputs that are written in full.
pub(crate) fn dirty<T: Pooled>(len: usize) -> Vec<T> {
    match take(len) {
        Some(mut v) => {
            v.truncate(len);
            v.resize(len, T::default());
            v
        }
        None => vec![T::default(); len],
    }
}

/// Returns a buffer to the pool.
pub(crate) fn give<T: Pooled>(v: Vec<T>) {
    let Some(pool) = T::pool() else { return };
    if v.capacity() == 0 {
        return;
    }
    let mut g = pool.lock().unwrap_or_else(|p| p.into_inner());
    g.push(v);
    let size = std::mem::size_of::<T>();
    loop {
        let total: usize = g.iter().map(|b| b.capacity() * size).sum();
        if g.len() <= MAX_BUFFERS && total <= MAX_BYTES {
            break;
        }
        // Drop the smallest when there are too many, the largest when they are too big.
        let pick = if g.len() > MAX_BUFFERS {
            g.iter()
                .enumerate()
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
        } else {
            g.iter()
                .enumerate()
                .max_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
        };
        match pick {
            Some(i) => {
                g.swap_remove(i);
            }
            None => break,
        }
    }
}
