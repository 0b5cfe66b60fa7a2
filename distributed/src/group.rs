//! A process group: one rank's handle on c10d's Gloo or NCCL backend, rendezvoused through a
//! TCPStore, with the collectives data-parallel training needs. Every operation waits for its
//! result up to the group's timeout and turns a dead or hung peer into an error, never a hang.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tch::{Device, Tensor};

use crate::error::{DistError, Result};
use crate::ffi;
use crate::rendezvous::Rendezvous;

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors, TCP.
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors.
    Nccl,
}

impl Backend {
    /// The field's default for tensors on `device`: NCCL on CUDA, Gloo on the CPU.
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    /// The name torch.distributed uses.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// Whether this build can create the backend (NCCL needs the CUDA wheel's headers at build).
    pub fn available(self) -> bool {
        match self {
            Backend::Gloo => true,
            Backend::Nccl => cfg!(hq_dist_nccl),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            other => Err(DistError::Env(format!(
                "unknown backend '{other}' (gloo, nccl)"
            ))),
        }
    }
}

/// How [`ProcessGroup::all_reduce`] combines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Sum divided by the world size (Gloo has no average of its own).
    Average,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
}

/// A TCPStore handle (rank 0 serves it): small key-value exchange beside the collectives.
struct Store {
    raw: NonNull<ffi::Store>,
}

// c10d's TCPStore client serialises its operations behind its own lock, so one handle may be
// used from the heartbeat thread and the training thread at once.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: created by hq_dist_store_new, freed once.
        unsafe { ffi::hq_dist_store_free(self.raw.as_ptr()) }
    }
}

/// How often each rank bumps its heartbeat counter in the store.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// The background thread that shows this rank is alive, and how far it got: `heartbeat/RANK` holds
/// "BEAT OPS", a counter bumped every [`HEARTBEAT`] and the number of collectives this rank has
/// entered.
struct Heartbeat {
    // Dropping the sender wakes the thread at once (no sleep to wait out).
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    fn start(store: Arc<Store>, rank: usize, ops: Arc<AtomicU64>) -> Result<Self> {
        let key = format!("heartbeat/{rank}");
        store.set(&key, b"0 0")?;
        let (stop, wake) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("hq-dist-heartbeat-{rank}"))
            .spawn(move || {
                let mut beat: u64 = 0;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    wake.recv_timeout(HEARTBEAT)
                {
                    beat += 1;
                    let value = format!("{beat} {}", ops.load(Ordering::Relaxed));
                    // The store is gone when rank 0 is: nothing left to tell.
                    if store.set(&key, value.as_bytes()).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| DistError::Launch(format!("heartbeat thread: {e}")))?;
        Ok(Heartbeat {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One rank's membership of a process group.
pub struct ProcessGroup {
    raw: NonNull<ffi::Group>,
    // Held for its Drop, which stops the thread (before `store` drops: field order).
    _heartbeat: Heartbeat,
    /// Collectives entered so far (published by the heartbeat).
    ops: Arc<AtomicU64>,
    store: Arc<Store>,
    rank: usize,
    world_size: usize,
    backend: Backend,
    timeout: Duration,
}

// c10d's process groups are used from any thread; ours is only ever used through `&self` calls
// that each wait for their own work.
unsafe impl Send for ProcessGroup {}

/// Turns a shim result (NULL or an owned message) into a `Result`.
fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated malloc'd string the shim hands over.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: freed exactly once, with the shim's allocator.
    unsafe { ffi::hq_dist_free(message) };
    Err(DistError::C10d(text))
}

fn c_string(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::Env(format!("{what} contains a NUL byte: {s:?}")))
}

impl ProcessGroup {
    /// Joins the group `rdv` describes: rank 0 serves the TCPStore at MASTER_ADDR:MASTER_PORT,
    /// every rank connects to it (waiting up to `timeout` for the others), the ranks check that
    /// they agree on the world size (a clear error instead of a backend that waits for a rank
    /// that will never come), then the backend connects the ranks pairwise.
    pub fn new(rdv: &Rendezvous, backend: Backend, timeout: Duration) -> Result<Self> {
        if !backend.available() {
            return Err(DistError::Env(format!(
                "the {} backend is not in this build (no CUDA/NCCL headers beside the torch wheel)",
                backend.name()
            )));
        }
        let joining = |e: DistError| {
            DistError::C10d(format!(
                "rank {} of {} could not join the group at {}:{} ({}): {e}",
                rdv.rank,
                rdv.world_size,
                rdv.master_addr,
                rdv.master_port,
                backend.name()
            ))
        };
        let addr = c_string(&rdv.master_addr, "MASTER_ADDR")?;
        let rank = i32::try_from(rdv.rank).map_err(|_| DistError::Env("RANK too large".into()))?;
        let world = i32::try_from(rdv.world_size)
            .map_err(|_| DistError::Env("WORLD_SIZE too large".into()))?;
        let mut raw_store = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; `raw_store` is written on success only.
        check(unsafe {
            ffi::hq_dist_store_new(
                addr.as_ptr(),
                rdv.master_port,
                rank,
                world,
                millis(timeout),
                &mut raw_store,
            )
        })
        .map_err(joining)?;
        let store = Arc::new(Store {
            raw: NonNull::new(raw_store)
                .ok_or_else(|| DistError::C10d("the shim returned no store".into()))?,
        });
        agree_on_world_size(&store, rdv, timeout).map_err(joining)?;
        let ops = Arc::new(AtomicU64::new(0));
        let heartbeat = Heartbeat::start(store.clone(), rdv.rank, ops.clone()).map_err(joining)?;

        let name = c_string(backend.name(), "backend")?;
        // Gloo binds this rank's own address: loopback when the master is local.
        let host = c_string(&rdv.gloo_host(), "host name")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the store and strings outlive the call; `raw` is written on success only.
        check(unsafe {
            ffi::hq_dist_group_new(
                store.raw.as_ptr(),
                rank,
                world,
                name.as_ptr(),
                host.as_ptr(),
                millis(timeout),
                &mut raw,
            )
        })
        .map_err(joining)?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| DistError::C10d("the shim returned no group".into()))?;
        Ok(ProcessGroup {
            raw,
            _heartbeat: heartbeat,
            ops,
            store,
            rank: rdv.rank,
            world_size: rdv.world_size,
            backend,
            timeout,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// How long each operation may wait for its peers.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the per-operation timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn check_tensor(&self, op: &'static str, t: &Tensor) -> Result<()> {
        let bad = |why: String| Err(DistError::Tensor { op, why });
        if !t.defined() {
            return bad("undefined tensor".into());
        }
        if !t.is_contiguous() {
            return bad("not contiguous (collectives work on a tensor's storage in place)".into());
        }
        match (self.backend, t.device()) {
            (Backend::Gloo, Device::Cpu) | (Backend::Nccl, Device::Cuda(_)) => Ok(()),
            (b, d) => bad(format!("a tensor on {d:?} cannot go through {}", b.name())),
        }
    }

    /// Reduces `t` over all ranks, in place: every rank ends with the result.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check_tensor("all_reduce", t)?;
        let code = match op {
            ReduceOp::Sum | ReduceOp::Average => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        };
        let ptr = t.as_mut_ptr();
        // SAFETY: `t` is a live tensor; the shim only reads the pointer during the call.
        self.collective(|g, ms| unsafe { ffi::hq_dist_all_reduce(g, ptr, code, ms) })?;
        if op == ReduceOp::Average {
            let _ = t
                .f_div_scalar_(self.world_size as f64)
                .map_err(|e| DistError::Tensor {
                    op: "all_reduce",
                    why: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Every rank's `t`, in rank order (the same shape and dtype on every rank).
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.check_tensor("all_gather", t)?;
        let mut outputs: Vec<Tensor> = (0..self.world_size).map(|_| t.empty_like()).collect();
        let ptrs: Vec<*mut torch_sys::C_tensor> =
            outputs.iter_mut().map(|o| o.as_mut_ptr()).collect();
        let mut input = t.shallow_clone();
        let input = input.as_mut_ptr();
        // SAFETY: input and outputs are live for the call; the shim writes into the outputs'
        // storage only.
        self.collective(|g, ms| unsafe {
            ffi::hq_dist_all_gather(g, input, ptrs.as_ptr(), ptrs.len(), ms)
        })?;
        Ok(outputs)
    }

    /// Copies rank `root`'s `t` into every rank's `t`, in place.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check_tensor("broadcast", t)?;
        if root >= self.world_size {
            return Err(DistError::Tensor {
                op: "broadcast",
                why: format!("root {root} is not a rank of {}", self.world_size),
            });
        }
        let ptr = t.as_mut_ptr();
        // SAFETY: as in all_reduce.
        self.collective(|g, ms| unsafe { ffi::hq_dist_broadcast(g, ptr, root as i32, ms) })
    }

    /// Waits until every rank has reached the barrier.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the group is live.
        self.collective(|g, ms| unsafe { ffi::hq_dist_barrier(g, ms) })
    }

    /// Runs one collective through the shim (`call` gets the group and the timeout in ms),
    /// counting it for the heartbeat and naming the ranks at fault when it fails.
    fn collective(&self, call: impl FnOnce(*mut ffi::Group, i64) -> *mut c_char) -> Result<()> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        check(call(self.raw.as_ptr(), millis(self.timeout))).map_err(|e| self.diagnosed(e))
    }

    /// Every rank's heartbeat as (beat, collectives entered); `None` when the store is gone.
    fn heartbeats(&self) -> Option<Vec<(u64, u64)>> {
        (0..self.world_size)
            .map(|r| {
                let v = self.store.get(&format!("heartbeat/{r}"), HEARTBEAT).ok()?;
                let text = String::from_utf8_lossy(&v).into_owned();
                let mut it = text.split_whitespace().map(|n| n.parse::<u64>().ok());
                Some((it.next()??, it.next()??))
            })
            .collect()
    }

    /// Which ranks have stopped: those whose heartbeat does not advance over a few periods (all
    /// of them, when the store on rank 0 is gone). Empty when every rank is alive.
    pub fn stopped_ranks(&self) -> Vec<usize> {
        self.progress().0
    }

    /// (stopped ranks, live ranks that have entered fewer collectives than this one: stuck or
    /// slow, as a rank that hangs is).
    fn progress(&self) -> (Vec<usize>, Vec<(usize, u64)>) {
        let Some(before) = self.heartbeats() else {
            return (vec![0], Vec::new());
        };
        std::thread::sleep(HEARTBEAT * 3);
        let Some(after) = self.heartbeats() else {
            return (vec![0], Vec::new());
        };
        let mine = self.ops.load(Ordering::Relaxed);
        let others = (0..self.world_size).filter(|&r| r != self.rank);
        let stopped: Vec<usize> = others
            .clone()
            .filter(|&r| before[r].0 == after[r].0)
            .collect();
        let behind = others
            .filter(|&r| before[r].0 != after[r].0 && after[r].1 < mine)
            .map(|r| (r, after[r].1))
            .collect();
        (stopped, behind)
    }

    /// `e` with the ranks that stopped or fell behind named (a failed collective is usually a
    /// peer that died or hangs): for errors raised outside this crate's calls too, such as a
    /// backward pass whose gradient reducer lost a peer.
    pub fn diagnosed(&self, e: impl std::fmt::Display) -> DistError {
        let (stopped, behind) = self.progress();
        let list = |ranks: &[usize]| {
            ranks
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let plural = |n: usize| if n > 1 { "s" } else { "" };
        let who = match (stopped.as_slice(), behind.as_slice()) {
            ([0], _) if self.rank != 0 => {
                "rank 0 stopped (its store is unreachable or its heartbeat stopped)".to_string()
            }
            ([], []) => "every rank's heartbeat is alive and none is behind".to_string(),
            ([], behind) => format!(
                "rank{} {} alive but behind (entered {} collectives, this rank {}): stuck or slow",
                plural(behind.len()),
                list(&behind.iter().map(|b| b.0).collect::<Vec<_>>()),
                behind
                    .iter()
                    .map(|b| b.1.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.ops.load(Ordering::Relaxed)
            ),
            (ranks, _) => format!(
                "rank{} {} stopped (no heartbeat for {:?})",
                plural(ranks.len()),
                list(ranks),
                HEARTBEAT * 3
            ),
        };
        DistError::C10d(format!(
            "rank {} of {}: {e}; {who}",
            self.rank, self.world_size
        ))
    }

    /// Stores a small value under `key` in the group's TCPStore (visible to every rank).
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.store.set(key, value)
    }

    /// The value under `key`, waiting up to the group's timeout for some rank to set it.
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>> {
        self.store.get(key, self.timeout)
    }
}

impl Store {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let key = c_string(key, "store key")?;
        // SAFETY: key and value outlive the call.
        check(unsafe {
            ffi::hq_dist_store_set(self.raw.as_ptr(), key.as_ptr(), value.as_ptr(), value.len())
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let key = c_string(key, "store key")?;
        let (mut value, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: on success the shim hands over a malloc'd buffer of `len` bytes.
        check(unsafe {
            ffi::hq_dist_store_get(
                self.raw.as_ptr(),
                key.as_ptr(),
                millis(timeout),
                &mut value,
                &mut len,
            )
        })?;
        // SAFETY: `value` points to `len` initialised bytes, freed once below.
        let out = unsafe { std::slice::from_raw_parts(value, len) }.to_vec();
        // SAFETY: the buffer came from the shim's malloc.
        unsafe { ffi::hq_dist_free(value.cast()) };
        Ok(out)
    }
}

/// Every rank publishes its WORLD_SIZE and compares with rank 0's; rank 0 compares every rank's.
/// (A rank 0 with the larger world size already fails in the store, waiting for clients.)
fn agree_on_world_size(store: &Store, rdv: &Rendezvous, timeout: Duration) -> Result<()> {
    let mine = rdv.world_size.to_string();
    store.set(&format!("world_size/{}", rdv.rank), mine.as_bytes())?;
    let disagree = |other: usize, theirs: &[u8]| {
        DistError::Env(format!(
            "ranks disagree on WORLD_SIZE: rank {} has {mine}, rank {other} has {}",
            rdv.rank,
            String::from_utf8_lossy(theirs)
        ))
    };
    let others: Vec<usize> = if rdv.rank == 0 {
        (1..rdv.world_size).collect()
    } else {
        vec![0]
    };
    for other in others {
        let theirs = store.get(&format!("world_size/{other}"), timeout)?;
        if theirs != mine.as_bytes() {
            return Err(disagree(other, &theirs));
        }
    }
    Ok(())
}

/// DDP's gradient reducer (libtorch's `c10d::Reducer`) over some parameters: armed before a
/// backward pass with [`GradReducer::prepare`], it all-reduces each bucket of gradients as soon as
/// that backward has produced it, overlapping communication with the rest of the backward, and
/// leaves the gradients **averaged** over the ranks when the backward returns. A backward without
/// `prepare` accumulates locally (DDP's `no_sync`); the next armed one includes it. Parameters
/// the loss does not reach are found by a traversal of the graph (DDP's find_unused_parameters).
pub struct GradReducer {
    raw: NonNull<ffi::Reducer>,
}

// The reducer is driven from the thread that runs the backward; its hooks run on autograd's.
unsafe impl Send for GradReducer {}

impl GradReducer {
    /// Arms the reducer for the backward pass of `loss`.
    pub fn prepare(&self, loss: &Tensor) -> Result<()> {
        let mut loss = loss.shallow_clone();
        // SAFETY: the reducer and the tensor are live for the call.
        check(unsafe { ffi::hq_dist_reducer_prepare(self.raw.as_ptr(), loss.as_mut_ptr()) })
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        // SAFETY: created by hq_dist_reducer_new, freed once.
        unsafe { ffi::hq_dist_reducer_free(self.raw.as_ptr()) }
    }
}

impl ProcessGroup {
    /// A [`GradReducer`] over `params` (leaf tensors requiring gradients), in buckets of about
    /// `bucket_bytes`, as DDP builds its own.
    pub fn reducer(&self, params: &[&Tensor], bucket_bytes: usize) -> Result<GradReducer> {
        let mut owned: Vec<Tensor> = params.iter().map(|p| p.shallow_clone()).collect();
        let ptrs: Vec<*mut torch_sys::C_tensor> =
            owned.iter_mut().map(|p| p.as_mut_ptr()).collect();
        let mut raw = std::ptr::null_mut();
        // SAFETY: the tensors outlive the call (the reducer keeps its own references).
        check(unsafe {
            ffi::hq_dist_reducer_new(
                self.raw.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len(),
                i64::try_from(bucket_bytes).unwrap_or(i64::MAX),
                &mut raw,
            )
        })?;
        Ok(GradReducer {
            raw: NonNull::new(raw)
                .ok_or_else(|| DistError::C10d("the shim returned no reducer".into()))?,
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by hq_dist_group_new, freed once (before its store, a field).
        unsafe { ffi::hq_dist_group_free(self.raw.as_ptr()) }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
