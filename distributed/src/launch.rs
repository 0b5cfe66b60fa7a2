//! A one-machine launcher (`hq-train --nproc-per-node N`): starts N copies of a command as the
//! ranks of one job on loopback, with torchrun's variables, and watches them. When a rank fails
//! the others get `grace` to fail on their own (their collectives time out or see the closed
//! connection and report the dead peer) and are then killed; the error names the first rank that
//! failed and how.

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::error::{DistError, Result};
use crate::rendezvous::{Launcher, Rendezvous};

/// A free TCP port on 127.0.0.1 (bound and released at once, as torchrun picks its own).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DistError::Launch(format!("no free port on 127.0.0.1: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| DistError::Launch(format!("no free port on 127.0.0.1: {e}")))
}

/// Runs `program args` as ranks 0..nproc of one job on this machine and waits for all of them.
pub fn launch_local(
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    nproc: usize,
    grace: Duration,
) -> Result<()> {
    if nproc == 0 {
        return Err(DistError::Launch(
            "--nproc-per-node must be at least 1".into(),
        ));
    }
    let job = Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: free_port()?,
        rank: 0,
        world_size: nproc,
        local_rank: 0,
        launcher: Launcher::Env,
    };
    let mut children: Vec<Child> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(program);
        cmd.args(args).envs(job.env_for(rank, rank));
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(&mut children);
                return Err(DistError::Launch(format!(
                    "could not start rank {rank} ({}): {e}",
                    program.display()
                )));
            }
        }
    }
    watch(children, grace)
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits for every child; the first failure starts the grace period for the rest.
fn watch(mut children: Vec<Child>, grace: Duration) -> Result<()> {
    let mut done: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    let mut first_failure: Option<(usize, String, Instant)> = None;
    loop {
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank].is_some() {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    done[rank] = Some(status);
                    if !status.success() && first_failure.is_none() {
                        first_failure = Some((rank, status.to_string(), Instant::now()));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    kill_all(&mut children);
                    return Err(DistError::Launch(format!("lost track of rank {rank}: {e}")));
                }
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        if let Some((_, _, at)) = &first_failure {
            if at.elapsed() > grace {
                kill_all(&mut children);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None => Ok(()),
        Some((rank, status, _)) => {
            let others: Vec<String> = done
                .iter()
                .enumerate()
                .filter(|(r, _)| *r != rank)
                .map(|(r, s)| match s {
                    Some(s) => format!("rank {r}: {s}"),
                    None => format!("rank {r}: killed after the grace period"),
                })
                .collect();
            Err(DistError::Launch(format!(
                "rank {rank} failed ({status}); {}",
                others.join(", ")
            )))
        }
    }
}
