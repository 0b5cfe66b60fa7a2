//! Where a rank finds its peers, read from the launch environment exactly as torch.distributed's
//! `env://` does: torchrun's (or any launcher's) `MASTER_ADDR`, `MASTER_PORT`, `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`; else Slurm's `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with
//! the master on the first host of `SLURM_JOB_NODELIST` (unless `MASTER_ADDR` says otherwise) and
//! `MASTER_PORT` or, without it, a port derived from `SLURM_JOB_ID` so that two jobs sharing a node
//! do not collide. Rank 0 serves the TCPStore there.

use crate::error::{DistError, Result};

/// Which launcher's variables described the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun, `hq-train --nproc-per-node`, or any launcher setting the `env://` variables.
    Env,
    /// Slurm's `srun` (one task per rank).
    Slurm,
}

/// One rank's place in a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// Host of rank 0's TCPStore.
    pub master_addr: String,
    /// Its port.
    pub master_port: u16,
    /// This process's global rank.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank on this machine (picks the GPU).
    pub local_rank: usize,
    /// Where these values came from.
    pub launcher: Launcher,
}

/// The Slurm default port range: `MASTER_PORT` unset gives `SLURM_PORT_BASE + job id % SLURM_PORT_SPAN`.
pub const SLURM_PORT_BASE: u16 = 20_000;
/// See [`SLURM_PORT_BASE`].
pub const SLURM_PORT_SPAN: u64 = 10_000;

impl Rendezvous {
    /// The job this process belongs to, from its environment; `None` when no launcher set any of
    /// the variables (a plain single-process run).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Rendezvous::from_env`] over any variable lookup (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            return Self::from_env_vars(&var).map(Some);
        }
        if var("SLURM_PROCID").is_some() && var("SLURM_NTASKS").is_some() {
            return Self::from_slurm(&var).map(Some);
        }
        Ok(None)
    }

    fn from_env_vars(var: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        let need = |k: &str| {
            var(k).ok_or_else(|| {
                DistError::Env(format!(
                    "{k} is not set (RANK and WORLD_SIZE are; torchrun sets MASTER_ADDR, \
                     MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK)"
                ))
            })
        };
        let rank = number(&need("RANK")?, "RANK")?;
        let world_size = number(&need("WORLD_SIZE")?, "WORLD_SIZE")?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number(&v, "LOCAL_RANK")?,
            None => rank,
        };
        let rdv = Rendezvous {
            master_addr: need("MASTER_ADDR")?,
            master_port: port(&need("MASTER_PORT")?)?,
            rank,
            world_size,
            local_rank,
            launcher: Launcher::Env,
        };
        rdv.validated()
    }

    fn from_slurm(var: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        let need =
            |k: &str| var(k).ok_or_else(|| DistError::Env(format!("{k} is not set under Slurm")));
        let rank = number(&need("SLURM_PROCID")?, "SLURM_PROCID")?;
        let world_size = number(&need("SLURM_NTASKS")?, "SLURM_NTASKS")?;
        let local_rank = number(&need("SLURM_LOCALID")?, "SLURM_LOCALID")?;
        let master_addr = match var("MASTER_ADDR") {
            Some(a) => a,
            None => first_host(&need("SLURM_JOB_NODELIST")?)?,
        };
        let master_port = match var("MASTER_PORT") {
            Some(p) => port(&p)?,
            None => {
                let job = number(&need("SLURM_JOB_ID")?, "SLURM_JOB_ID")? as u64;
                SLURM_PORT_BASE + (job % SLURM_PORT_SPAN) as u16
            }
        };
        Rendezvous {
            master_addr,
            master_port,
            rank,
            world_size,
            local_rank,
            launcher: Launcher::Slurm,
        }
        .validated()
    }

    fn validated(self) -> Result<Self> {
        if self.world_size == 0 {
            return Err(DistError::Env("WORLD_SIZE is 0".into()));
        }
        if self.rank >= self.world_size {
            return Err(DistError::Env(format!(
                "RANK {} is not below WORLD_SIZE {}",
                self.rank, self.world_size
            )));
        }
        if self.master_addr.is_empty() {
            return Err(DistError::Env("MASTER_ADDR is empty".into()));
        }
        Ok(self)
    }

    /// What Gloo's transport binds on this rank: `GLOO_SOCKET_IFNAME`'s interface when set (as
    /// torch.distributed honours it), loopback when the master is local, else this host's name.
    pub fn gloo_host(&self) -> String {
        if let Ok(iface) = std::env::var("GLOO_SOCKET_IFNAME") {
            if !iface.is_empty() {
                return format!("iface:{iface}");
            }
        }
        if is_loopback(&self.master_addr) {
            return "127.0.0.1".into();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into())
    }

    /// The variables a worker process needs to join this job as `rank` (the launcher's side).
    pub fn env_for(&self, rank: usize, local_rank: usize) -> Vec<(&'static str, String)> {
        vec![
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", local_rank.to_string()),
        ]
    }
}

fn is_loopback(addr: &str) -> bool {
    addr == "localhost" || addr.starts_with("127.") || addr == "::1"
}

fn number(v: &str, name: &str) -> Result<usize> {
    v.trim()
        .parse()
        .map_err(|_| DistError::Env(format!("{name}={v:?} is not a non-negative integer")))
}

fn port(v: &str) -> Result<u16> {
    match v.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(DistError::Env(format!(
            "MASTER_PORT={v:?} is not a port (1-65535)"
        ))),
    }
}

/// The first host of a Slurm host list: `node[01-04,07],gpu3` -> `node01`, `rack[1-2]-n[3-4]` ->
/// `rack1-n3` (each bracket's first value, zero padding kept).
pub fn first_host(nodelist: &str) -> Result<String> {
    let bad = || {
        DistError::Env(format!(
            "SLURM_JOB_NODELIST={nodelist:?} is not a host list"
        ))
    };
    let mut out = String::new();
    let mut chars = nodelist.trim().chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let inner: String = chars.by_ref().take_while(|&c| c != ']').collect();
                let first = inner.split(',').next().unwrap_or("");
                let first = first.split('-').next().unwrap_or("");
                if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
                    return Err(bad());
                }
                out.push_str(first);
            }
            ']' => return Err(bad()),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_variables() {
        let r = Rendezvous::from_vars(vars(&[
            ("MASTER_ADDR", "10.1.2.3"),
            ("MASTER_PORT", "29500"),
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
        ]))
        .expect("valid")
        .expect("present");
        assert_eq!(
            r,
            Rendezvous {
                master_addr: "10.1.2.3".into(),
                master_port: 29500,
                rank: 5,
                world_size: 8,
                local_rank: 1,
                launcher: Launcher::Env,
            }
        );
        assert_eq!(r.env_for(2, 0)[2], ("RANK", "2".to_string()));
    }

    #[test]
    fn nothing_set_is_a_single_process() {
        assert_eq!(Rendezvous::from_vars(vars(&[])).expect("ok"), None);
    }

    #[test]
    fn incomplete_or_inconsistent_variables_are_named() {
        let err = |pairs: &[(&str, &str)]| {
            Rendezvous::from_vars(vars(pairs))
                .expect_err("invalid")
                .to_string()
        };
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]);
        assert!(e.contains("MASTER_ADDR is not set"), "{e}");
        let e = err(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ]);
        assert!(e.contains("RANK 2 is not below WORLD_SIZE 2"), "{e}");
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ]);
        assert!(e.contains("MASTER_PORT=\"70000\""), "{e}");
        let e = err(&[("RANK", "x"), ("WORLD_SIZE", "2")]);
        assert!(e.contains("RANK=\"x\""), "{e}");
    }

    #[test]
    fn slurm_variables_and_host_lists() {
        let r = Rendezvous::from_vars(vars(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[007-008,010],login1"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .expect("valid")
        .expect("present");
        assert_eq!(r.master_addr, "gpu007");
        assert_eq!(r.master_port, SLURM_PORT_BASE + 3456);
        assert_eq!((r.rank, r.world_size, r.local_rank), (3, 4, 1));
        assert_eq!(r.launcher, Launcher::Slurm);
        assert_eq!(first_host("node1").expect("plain"), "node1");
        assert_eq!(first_host("a,b").expect("list"), "a");
        assert_eq!(first_host("rack[1-2]-n[03-04]").expect("two"), "rack1-n03");
        for bad in ["", "node[", "n[a-b]", "]x"] {
            assert!(first_host(bad).is_err(), "{bad}");
        }
        // MASTER_ADDR / MASTER_PORT override Slurm's defaults.
        let r = Rendezvous::from_vars(vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "4000"),
        ]))
        .expect("valid")
        .expect("present");
        assert_eq!((r.master_addr.as_str(), r.master_port), ("head", 4000));
    }
}
