//! The `hq-train` command line: help, settings resolution, and refusals of contradictory or
//! missing settings with a message that says what to fix (nothing is trained here).

use std::process::Command;

fn hq_train(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hq-train"))
        .args(args)
        .env("HQ_NO_PROGRESS", "1")
        .output()
        .expect("run hq-train");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_explains_every_option() {
    let (ok, stdout, _) = hq_train(&["--help"]);
    assert!(ok);
    for needle in [
        "--config",
        "--resume",
        "--stop-after",
        "--print-config",
        "--variant",
        "--model",
        "--model-config",
        "--pretrained",
        "--lock-image",
        "--lock-text-unlocked-layers",
        "--head-lr",
        "--image-size",
        "--train",
        "--eval-dir",
        "--eval-every",
        "--out",
        "--steps",
        "--batch-size",
        "--accum-steps",
        "--lr",
        "--warmup-steps",
        "--seed",
        "--device",
        "--precision",
        "--checkpoint-every",
        "--log-every",
        "--set",
        "baseline",
        "[optim.lr]",
        "bit for bit",
    ] {
        assert!(stdout.contains(needle), "--help lacks {needle:?}");
    }
}

#[test]
fn settings_merge_file_flags_and_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        "[optim]\nlr = 1e-3\nwarmup_steps = 7\n[run]\nsteps = 50\n",
    )
    .expect("write");
    let (ok, stdout, stderr) = hq_train(&[
        "--config",
        cfg.to_str().expect("utf8"),
        "--steps",
        "60",
        "--set",
        "optim.lr=3e-4",
        "--variant",
        "hni",
        "--train",
        "a/*.tar",
        "b/*.tar",
        "--print-config",
    ]);
    assert!(ok, "{stderr}");
    let parsed = hq_train::TrainConfig::from_toml_str(&stdout).expect("printed config parses");
    assert_eq!(parsed.optim.lr, 3e-4, "--set wins over the file");
    assert_eq!(parsed.optim.warmup_steps, 7, "the file's value stays");
    assert_eq!(parsed.run.steps, 60, "the flag wins over the file");
    assert_eq!(parsed.loss.variant, Some(hq_train::Variant::Hni));
    assert_eq!(parsed.data.train, vec!["a/*.tar", "b/*.tar"]);
}

#[test]
fn contradictions_and_gaps_are_refused_with_what_to_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let out_s = out.to_str().expect("utf8");
    let cases: [(&[&str], &str); 6] = [
        (&["--out", out_s], "--train"),
        (
            &[
                "--train",
                "x",
                "--out",
                out_s,
                "--variant",
                "baseline",
                "--set",
                "loss.hni=true",
            ],
            "contradicts variant",
        ),
        (
            &[
                "--train",
                "x",
                "--out",
                out_s,
                "--steps",
                "10",
                "--warmup-steps",
                "10",
            ],
            "warm-up",
        ),
        (
            &[
                "--train",
                "x",
                "--out",
                out_s,
                "--device",
                "cpu",
                "--precision",
                "bf16",
            ],
            "bf16",
        ),
        (
            &[
                "--train",
                "x",
                "--out",
                out_s,
                "--set",
                "optim.learning_rate=1",
            ],
            "learning_rate",
        ),
        (
            &[
                "--train",
                "x",
                "--model",
                "hq-tiny",
                "--model-config",
                "m.json",
            ],
            "cannot be used with",
        ),
    ];
    for (args, needle) in cases {
        let (ok, _, stderr) = hq_train(args);
        assert!(!ok, "{args:?} was accepted");
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in {stderr}"
        );
    }
    assert!(!out.exists(), "a refused run wrote nothing");
    let (ok, _, stderr) = hq_train(&["--resume", dir.path().to_str().expect("utf8")]);
    assert!(!ok);
    assert!(
        stderr.contains("neither a checkpoint directory"),
        "{stderr}"
    );
}
