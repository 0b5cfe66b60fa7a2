//! hq-dist across real processes on loopback: this test binary re-runs itself as the ranks (the
//! `worker` test does the rank's part when `HQ_DIST_WORKER` is set, and nothing otherwise).
//!
//! - Every collective with known values on 2 ranks, through libtorch's Gloo: all-reduce (sum,
//!   average, max, min; f32, f64, i64), all-gather, broadcast, barrier, the store. Exact values
//!   (small integers), so a shim whose headers do not match libtorch's layout fails here.
//! - Faults: a rank that dies, or hangs, before a collective makes the other fail within its
//!   timeout, naming it; a port in use, a master nobody serves, and ranks that disagree on
//!   WORLD_SIZE are clear errors.
//! - On GPU machines (skipped elsewhere): the same collectives through NCCL on 2 GPUs, and a
//!   one-rank NCCL group on one GPU.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hq_dist::{launch, Backend, ProcessGroup, ReduceOp, Rendezvous};
use tch::{Kind, Tensor};

const WORKER: &str = "HQ_DIST_WORKER";
/// The backend a worker joins with: `gloo` (default, CPU tensors) or `nccl` (GPU `LOCAL_RANK`).
const BACKEND: &str = "HQ_DIST_TEST_BACKEND";

/// Starts `world` ranks of this binary's `worker` test in `mode`, with per-rank extra variables,
/// and returns each rank's output (not waiting more than `limit` in all).
fn run_ranks(
    mode: &str,
    world: usize,
    extra: impl Fn(usize) -> Vec<(String, String)>,
    limit: Duration,
) -> Vec<Output> {
    let port = launch::free_port().expect("port");
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut cmd = Command::new(&exe);
            cmd.args(["--exact", "worker", "--nocapture", "--test-threads", "1"])
                .env(WORKER, mode)
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            for (k, v) in extra(rank) {
                cmd.env(k, v);
            }
            cmd.spawn().expect("spawn rank")
        })
        .collect();
    let started = Instant::now();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    assert!(
        started.elapsed() < limit,
        "ranks took {:?} (limit {limit:?})",
        started.elapsed()
    );
    outputs
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The rank's side; a no-op unless this process was started as a rank.
#[test]
fn worker() {
    let Ok(mode) = std::env::var(WORKER) else {
        return;
    };
    let timeout = Duration::from_millis(
        std::env::var("HQ_DIST_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000),
    );
    let rdv = Rendezvous::from_env().expect("env").expect("launched");
    // Gloo on the CPU unless the test asks for NCCL, one GPU per rank.
    let (backend, device) = match std::env::var(BACKEND).as_deref() {
        Ok("nccl") => (Backend::Nccl, tch::Device::Cuda(rdv.local_rank)),
        _ => (Backend::Gloo, tch::Device::Cpu),
    };
    let joined = ProcessGroup::new(&rdv, backend, timeout);
    match mode.as_str() {
        "collectives" => collectives(&joined.expect("join"), device),
        "die_before_all_reduce" => {
            let pg = joined.expect("join");
            if pg.rank() == 1 {
                std::process::exit(3);
            }
            let started = Instant::now();
            let mut t = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
            let err = pg
                .all_reduce(&mut t, ReduceOp::Sum)
                .expect_err("peer is dead");
            println!("ERROR after {:?}: {err}", started.elapsed());
        }
        "hang_before_all_reduce" => {
            let pg = joined.expect("join");
            let mut t = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
            pg.all_reduce(&mut t, ReduceOp::Sum)
                .expect("first all-reduce");
            if pg.rank() == 1 {
                // Alive (the heartbeat goes on) but stuck past the others' timeout.
                std::thread::sleep(timeout * 3);
                return;
            }
            let started = Instant::now();
            let err = pg
                .all_reduce(&mut t, ReduceOp::Sum)
                .expect_err("peer hangs");
            println!("ERROR after {:?}: {err}", started.elapsed());
        }
        "join_only" => match joined {
            Ok(_) => println!("JOINED"),
            Err(e) => println!("ERROR: {e}"),
        },
        other => panic!("unknown worker mode {other}"),
    }
}

fn collectives(pg: &ProcessGroup, dev: tch::Device) {
    let (r, w) = (pg.rank() as f64, pg.world_size() as f64);
    assert_eq!(pg.world_size(), 2);
    // Rank r holds (r + 1) * [1, 2, ..., 8].
    let mine = |kind: Kind| Tensor::arange_start(1, 9, (kind, dev)) * (pg.rank() as i64 + 1);
    let base = Tensor::arange_start(1, 9, (Kind::Double, dev));
    let total = (1.0 + w) * w / 2.0; // sum over ranks of (r + 1)
    for kind in [Kind::Float, Kind::Double, Kind::Int64] {
        let mut t = mine(kind);
        pg.all_reduce(&mut t, ReduceOp::Sum).expect("sum");
        assert!(
            t.to_kind(Kind::Double).equal(&(&base * total)),
            "sum {kind:?}: {t}"
        );
        let mut t = mine(kind);
        pg.all_reduce(&mut t, ReduceOp::Max).expect("max");
        assert!(t.to_kind(Kind::Double).equal(&(&base * w)), "max {kind:?}");
        let mut t = mine(kind);
        pg.all_reduce(&mut t, ReduceOp::Min).expect("min");
        assert!(t.to_kind(Kind::Double).equal(&base), "min {kind:?}");
    }
    let mut t = mine(Kind::Float);
    pg.all_reduce(&mut t, ReduceOp::Average).expect("average");
    assert!(
        t.to_kind(Kind::Double).equal(&(&base * (total / w))),
        "average: {t}"
    );

    // All-gather of a 2-D tensor: every rank's, in rank order.
    let m = mine(Kind::Float).view([2, 4]);
    let all = pg.all_gather(&m).expect("all_gather");
    assert_eq!(all.len(), 2);
    for (k, g) in all.iter().enumerate() {
        let want = (&base * (k as f64 + 1.0)).to_kind(Kind::Float).view([2, 4]);
        assert!(g.equal(&want), "all_gather[{k}]: {g}");
    }

    // Broadcast from the last rank.
    let mut b = Tensor::full([3], 100.0 * (r + 1.0), (Kind::Float, dev));
    pg.broadcast(&mut b, 1).expect("broadcast");
    assert!(
        b.equal(&Tensor::full([3], 200.0, (Kind::Float, dev))),
        "broadcast {b}"
    );
    assert!(pg.broadcast(&mut b, 2).is_err(), "root outside the group");

    // Non-contiguous tensors are refused, not silently copied.
    let mut nc = Tensor::zeros([4, 4], (Kind::Float, dev)).tr();
    let e = pg
        .all_reduce(&mut nc, ReduceOp::Sum)
        .expect_err("non-contiguous");
    assert!(e.to_string().contains("not contiguous"), "{e}");

    pg.store_set(
        &format!("hello/{}", pg.rank()),
        format!("rank {}", pg.rank()).as_bytes(),
    )
    .expect("set");
    let other = 1 - pg.rank();
    let got = pg.store_get(&format!("hello/{other}")).expect("get");
    assert_eq!(got, format!("rank {other}").as_bytes());
    pg.barrier().expect("barrier");
    println!("COLLECTIVES OK rank {}", pg.rank());
}

/// The same collectives through NCCL, one GPU per rank: runs where libtorch sees two GPUs and
/// hq-dist was built with NCCL (the GPU acceptance run, `tools/gpu-check.sh`), skips elsewhere.
#[test]
fn two_gpus_run_every_collective_through_nccl() {
    if !Backend::Nccl.available() {
        eprintln!("SKIP: hq-dist was built without NCCL");
        return;
    }
    let gpus = tch::Cuda::device_count();
    if gpus < 2 {
        eprintln!("SKIP: NCCL collectives need 2 GPUs, libtorch sees {gpus}");
        return;
    }
    two_ranks_pass_the_collectives(Some("nccl"), Duration::from_secs(120));
}

/// A one-rank NCCL group on one GPU is the identity: runs on any GPU machine (NCCL's
/// communicator, our shim's NCCL path and CUDA tensors through it), skips elsewhere.
#[test]
fn a_single_rank_nccl_group_on_one_gpu_is_the_identity() {
    if !Backend::Nccl.available() || tch::Cuda::device_count() < 1 {
        eprintln!("SKIP: no GPU, or hq-dist was built without NCCL");
        return;
    }
    let (_, pg) = single_rank_group(Backend::Nccl, Duration::from_secs(60));
    let gpu = tch::Device::Cuda(0);
    let mut t = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).to_device(gpu);
    let before = t.copy();
    pg.all_reduce(&mut t, ReduceOp::Sum).expect("sum");
    assert!(t.equal(&before));
    let g = pg.all_gather(&t).expect("gather");
    assert_eq!(g.len(), 1);
    assert!(g[0].equal(&before));
    pg.broadcast(&mut t, 0).expect("broadcast");
    pg.barrier().expect("barrier");
    eprintln!("NCCL single-rank group OK on {gpu:?}");
}

#[test]
fn two_ranks_run_every_collective_with_known_values() {
    two_ranks_pass_the_collectives(None, Duration::from_secs(60));
}

/// Runs the `collectives` worker on 2 ranks (through `backend`, Gloo by default) and checks that
/// both ranks got every known value.
fn two_ranks_pass_the_collectives(backend: Option<&str>, limit: Duration) {
    let extra = |_| {
        backend
            .map(|b| vec![(BACKEND.to_string(), b.to_string())])
            .unwrap_or_default()
    };
    let outs = run_ranks("collectives", 2, extra, limit);
    for (rank, o) in outs.iter().enumerate() {
        let t = text(o);
        assert!(o.status.success(), "rank {rank} failed:\n{t}");
        assert!(
            t.contains(&format!("COLLECTIVES OK rank {rank}")),
            "rank {rank}:\n{t}"
        );
    }
}

/// Runs 2 ranks in a fault `mode` with `timeout_ms` per collective; returns every rank's output,
/// rank 0's whole text and its error line (rank 0 must have reported the fault and exited).
fn rank0_error(mode: &str, timeout_ms: u64, limit: Duration) -> (Vec<Output>, String, String) {
    let outs = run_ranks(
        mode,
        2,
        |_| vec![("HQ_DIST_TIMEOUT_MS".into(), timeout_ms.to_string())],
        limit,
    );
    let t = text(&outs[0]);
    assert!(outs[0].status.success(), "rank 0:\n{t}");
    let line = t
        .lines()
        .find(|l| l.contains("ERROR after"))
        .unwrap_or_else(|| panic!("rank 0 reported no error:\n{t}"))
        .to_string();
    eprintln!("rank 0: {line}");
    (outs, t, line)
}

#[test]
fn a_dead_rank_fails_the_others_within_the_timeout() {
    let (outs, _, line) = rank0_error("die_before_all_reduce", 4_000, Duration::from_secs(30));
    assert_eq!(outs[1].status.code(), Some(3), "{}", text(&outs[1]));
    assert!(line.contains("all-reduce"), "{line}");
    assert!(
        line.contains("rank 1 stopped"),
        "the dead rank is not named: {line}"
    );
}

#[test]
fn a_hung_rank_fails_the_others_within_the_timeout_naming_it() {
    let (_, t, _) = rank0_error("hang_before_all_reduce", 3_000, Duration::from_secs(40));
    // c10d's timeout message may span lines: the diagnosis is at the end of the error.
    assert!(t.contains("rank 1 alive but behind"), "{t}");
}

#[test]
fn bad_rendezvous_are_clear_errors() {
    let short = |_: usize| vec![("HQ_DIST_TIMEOUT_MS".to_string(), "3000".to_string())];
    // Ranks that disagree on WORLD_SIZE: rank 1 believes in 3 ranks.
    let outs = run_ranks(
        "join_only",
        2,
        |rank| {
            let mut v = short(rank);
            if rank == 1 {
                v.push(("WORLD_SIZE".into(), "3".into()));
            }
            v
        },
        Duration::from_secs(30),
    );
    let all: String = outs.iter().map(text).collect();
    assert!(
        all.contains("ranks disagree on WORLD_SIZE"),
        "no clear world-size error:\n{all}"
    );
    assert!(!all.contains("JOINED"), "{all}");

    // A port that is already taken: rank 0 cannot serve the store.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let rdv = Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank: 0,
        world_size: 1,
        local_rank: 0,
        launcher: hq_dist::Launcher::Env,
    };
    let e = ProcessGroup::new(&rdv, Backend::Gloo, Duration::from_secs(3))
        .err()
        .expect("port in use");
    let msg = e.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    eprintln!("port in use: {msg}");

    // A master that nobody serves: rank 1 gives up after its timeout, naming where it looked.
    let started = Instant::now();
    let rdv = Rendezvous {
        rank: 1,
        world_size: 2,
        master_port: launch::free_port().expect("port"),
        ..rdv
    };
    let e = ProcessGroup::new(&rdv, Backend::Gloo, Duration::from_secs(2))
        .err()
        .expect("nobody serves");
    let msg = e.to_string();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(msg.contains("rank 1 of 2 could not join"), "{msg}");
    eprintln!("no master: {msg}");
}

/// A group of one rank on loopback (its rendezvous, and the group joined through `backend`).
fn single_rank_group(backend: Backend, timeout: Duration) -> (Rendezvous, ProcessGroup) {
    let rdv = Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: launch::free_port().expect("port"),
        rank: 0,
        world_size: 1,
        local_rank: 0,
        launcher: hq_dist::Launcher::Env,
    };
    let pg = ProcessGroup::new(&rdv, backend, timeout).expect("join");
    (rdv, pg)
}

#[test]
fn a_single_rank_group_is_the_identity() {
    let (rdv, pg) = single_rank_group(Backend::Gloo, Duration::from_secs(10));
    let mut t = Tensor::from_slice(&[1.5f32, -2.0, 3.25]);
    let before = t.copy();
    pg.all_reduce(&mut t, ReduceOp::Average).expect("average");
    assert!(t.equal(&before));
    let g = pg.all_gather(&t).expect("gather");
    assert_eq!(g.len(), 1);
    assert!(g[0].equal(&before));
    pg.barrier().expect("barrier");
    if !Backend::Nccl.available() {
        let e = ProcessGroup::new(&rdv, Backend::Nccl, Duration::from_secs(1)).err();
        assert!(e.is_some());
    }
}
