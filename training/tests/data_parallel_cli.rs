//! `hq-train` as a data-parallel job on loopback (Gloo), started the three ways users start it:
//! `--nproc-per-node 2`, `torchrun --nproc-per-node 2 --no-python hq-train` (the venv's torchrun;
//! skipped with a message when there is no venv) and by hand with torchrun's variables.
//!
//! - torchrun and `--nproc-per-node` give bit-identical weights (the same ranks, data and steps);
//! - a 2-rank run stopped after a checkpoint and resumed (with the gradients all-reduced during
//!   the backward by libtorch's DDP reducer) equals the uninterrupted one, bit for bit;
//! - resuming with another world size is refused with a message that says which to use;
//! - a weighted mixture (`--source`, 3:1) on 2 ranks resumes bit for bit too (every rank's
//!   mixture position is in the checkpoint) and logs the samples per source summed over ranks;
//! - a rank whose rendezvous fails (its peer never comes) exits within its timeout, naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn corpus(dir: &Path) -> PathBuf {
    hq_train::testing::tiny_corpus(dir)
}

/// The run's settings (every rank: batch 8, 4 steps, a checkpoint every 2).
fn args(train: &Path, out: &Path) -> Vec<String> {
    [
        "--train",
        &train.display().to_string(),
        "--variant",
        "stc",
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--checkpoint-every",
        "2",
        "--threads",
        "1",
        "--set",
        "run.torch_threads=1",
        "--quiet",
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn hq_train(args: &[String], env: &[(&str, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hq-train"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("HQ_NO_PROGRESS", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run hq-train")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn weights(run: &Path, step: u64) -> Vec<(String, tch::Tensor)> {
    let p = run.join(format!("checkpoints/step-{step:08}/model.safetensors"));
    let mut w =
        tch::Tensor::read_safetensors(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn assert_same_weights(a: &Path, b: &Path, step: u64, what: &str) {
    let (wa, wb) = (weights(a, step), weights(b, step));
    assert_eq!(wa.len(), wb.len());
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{what}: {na} differs");
    }
}

#[test]
fn two_ranks_run_resume_and_launch_alike() {
    let tmp = tempfile::tempdir().expect("tmp");
    let train = corpus(&tmp.path().join("corpus"));
    let run = |name: &str| tmp.path().join(name);

    // Uninterrupted, with the built-in launcher.
    let mut a = args(&train, &run("whole"));
    a.extend(["--nproc-per-node".into(), "2".into()]);
    let o = hq_train(&a, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run("whole").join("checkpoints/step-00000004/train_state.json"))
            .expect("state"),
    )
    .expect("json");
    assert_eq!(state["world_size"], 2);
    assert_eq!(
        state["rank_loaders"][0]["rank"], 1,
        "rank 1's data position is saved"
    );
    assert_eq!(state["samples_seen"], 64, "4 steps x 2 ranks x 8");

    // Stopped after the first checkpoint, resumed: the same weights, bit for bit.
    let mut a = args(&train, &run("halves"));
    a.extend([
        "--nproc-per-node".into(),
        "2".into(),
        "--stop-after".into(),
        "2".into(),
    ]);
    assert!(hq_train(&a, &[]).status.success());
    // The second half with the gradients all-reduced during the backward (DDP's reducer, which
    // averages a world-size-scaled objective: with 2 ranks that scaling is exact in floating
    // point, so the weights stay bit-identical to the all-reduce after the backward).
    let resume: Vec<String> = [
        "--resume",
        &run("halves").display().to_string(),
        "--nproc-per-node",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--dist-overlap",
        "on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = hq_train(&resume, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_weights(&run("whole"), &run("halves"), 4, "resumed vs uninterrupted");

    // Another world size is refused.
    let one: Vec<String> = resume[..2].iter().chain(&resume[4..7]).cloned().collect();
    let o = hq_train(&one, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("written by 2 rank(s) and this run has 1"),
        "{}",
        text(&o)
    );

    // torchrun from the project's venv, as open_clip users launch.
    let torchrun = hq_tests_python_dir().map(|d| d.join("torchrun"));
    match torchrun.filter(|t| t.exists()) {
        None => eprintln!("no venv torchrun (source tools/env.sh): skipping the torchrun launch"),
        Some(torchrun) => {
            let port = hq_dist::launch::free_port().expect("port");
            let o = Command::new(torchrun)
                .args([
                    "--nproc-per-node",
                    "2",
                    "--master-port",
                    &port.to_string(),
                    "--no-python",
                    env!("CARGO_BIN_EXE_hq-train"),
                ])
                .args(args(&train, &run("torchrun")))
                .env("HQ_NO_PROGRESS", "1")
                .output()
                .expect("torchrun");
            assert!(o.status.success(), "{}", text(&o));
            assert_same_weights(
                &run("whole"),
                &run("torchrun"),
                4,
                "torchrun vs --nproc-per-node",
            );
        }
    }
}

#[test]
fn a_two_rank_mixture_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let train = corpus(&tmp.path().join("corpus"));
    let run = |name: &str| tmp.path().join(name);
    let mixture = |out: &Path| -> Vec<String> {
        let mut a = args(&train, out);
        // The mixture replaces --train: two halves of the corpus, 3:1.
        a.drain(0..2);
        for half in ["0000{0..3}", "0000{4..7}"] {
            a.push("--source".into());
            a.push(format!("{}/shard-{half}.tar", train.display()));
        }
        a.extend(["--source-weights".into(), "3,1".into()]);
        a.extend(["--nproc-per-node".into(), "2".into()]);
        a
    };
    let o = hq_train(&mixture(&run("whole")), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let mut halves = mixture(&run("halves"));
    halves.extend(["--stop-after".into(), "2".into()]);
    assert!(hq_train(&halves, &[]).status.success());
    let resume: Vec<String> = [
        "--resume",
        &run("halves").display().to_string(),
        "--nproc-per-node",
        "2",
        "--threads",
        "1",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = hq_train(&resume, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_weights(&run("whole"), &run("halves"), 4, "resumed mixture");
    let log = std::fs::read_to_string(run("whole").join("metrics.jsonl")).expect("metrics");
    let last: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|r| r["kind"] == "train")
        .expect("a train record");
    let per = &last["source_samples"];
    let (a, b) = (per["0"].as_u64(), per["1"].as_u64());
    assert_eq!(
        a.zip(b).map(|(a, b)| a + b),
        Some(64),
        "4 steps x 2 ranks x 8 from both sources: {last}"
    );
}

/// The venv's bin folder (torchrun lives there), if the venv exists.
fn hq_tests_python_dir() -> Option<PathBuf> {
    let python = match std::env::var_os("HQ_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"),
    };
    python.parent().map(Path::to_path_buf)
}

#[test]
fn a_rank_whose_peer_never_comes_fails_in_time_naming_itself() {
    let tmp = tempfile::tempdir().expect("tmp");
    let train = corpus(&tmp.path().join("corpus"));
    let port = hq_dist::launch::free_port().expect("port");
    let env = [
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
        ("RANK", "1".to_string()),
        ("WORLD_SIZE", "2".to_string()),
        ("LOCAL_RANK", "1".to_string()),
    ];
    let mut a = args(&train, &tmp.path().join("run"));
    a.extend(["--dist-timeout".into(), "3".into()]);
    let started = std::time::Instant::now();
    let o = hq_train(&a, &env);
    let took = started.elapsed();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("rank 1 of 2 could not join"), "{t}");
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
    assert!(
        !tmp.path().join("run").exists(),
        "rank 1 wrote the run directory"
    );
}

#[test]
fn a_rank_killed_mid_run_stops_the_other_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let train = corpus(&tmp.path().join("corpus"));
    let out = tmp.path().join("run");
    let port = hq_dist::launch::free_port().expect("port");
    let mut a = args(&train, &out);
    // Long enough to be killed in the middle; a metrics line every step shows progress.
    let steps = a.iter().position(|x| x == "--steps").expect("--steps") + 1;
    a[steps] = "400".into();
    for (k, v) in [("--log-every", "1"), ("--dist-timeout", "20")] {
        a.extend([k.to_string(), v.to_string()]);
    }
    let rank = |r: usize| {
        Command::new(env!("CARGO_BIN_EXE_hq-train"))
            .args(&a)
            .env("HQ_NO_PROGRESS", "1")
            .env("RUST_BACKTRACE", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", r.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn rank")
    };
    let (r0, mut r1) = (rank(0), rank(1));
    let metrics = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|t| t.lines().filter(|l| l.contains("\"train\"")).count())
        .unwrap_or(0)
        < 3
    {
        if started.elapsed().as_secs() > 120 {
            r1.kill().expect("kill");
            let o = r0.wait_with_output().expect("rank 0");
            panic!("the ranks did not start training:\n{}", text(&o));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    r1.kill().expect("kill rank 1");
    let killed = std::time::Instant::now();
    let o = r0.wait_with_output().expect("rank 0");
    let _ = r1.wait();
    let t = text(&o);
    assert!(!o.status.success(), "rank 0 went on alone:\n{t}");
    assert!(
        t.contains("rank 1 stopped"),
        "rank 0 does not name the dead rank:\n{t}"
    );
    eprintln!(
        "rank 0, {:?} after the kill: {}",
        killed.elapsed(),
        t.lines()
            .find(|l| l.contains("rank 1 stopped"))
            .unwrap_or("")
    );
    assert!(
        killed.elapsed() < std::time::Duration::from_secs(30),
        "rank 0 took {:?} to stop",
        killed.elapsed()
    );
}
