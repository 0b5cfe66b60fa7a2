//! The CUDA kernels, executed without a GPU: `kernels/src/cuda/*.cu` are compiled with the host C++
//! compiler against `emu.hpp` (one OS thread per CUDA thread, real barriers, emulated warp
//! shuffles) and driven by the crate's own launch orchestration (`hq_kernels::cuda::*`), the code
//! the real GPU path runs. Results are held against the f64 references with the same tolerances as
//! the CPU tests, and every launch's argument list is checked against the kernel's C signature.
//!
//! This finds indexing, masking, reduction and orchestration errors in the CUDA code on CI
//! machines; it does not replace the GPU tests (`kernels/tests/gpu.rs`), which run the same
//! comparisons on a real device where there is one. Skips (with a note) only when no C++20
//! compiler is installed.

use std::sync::OnceLock;

use hq_kernels::cuda::{self, emu::Emulator};
use hq_kernels::testing::{close_all as close_f32, close_sum_f32, correlated, embeddings, seed};
use hq_kernels::{reference, TagTargets};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn emulator() -> Option<&'static Emulator> {
    static EMU: OnceLock<Option<(tempfile::TempDir, Emulator)>> = OnceLock::new();
    EMU.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        match cuda::emu::build(dir.path()) {
            Ok(lib) => Some((dir, Emulator::load(&lib).expect("load emulator"))),
            Err(e) => {
                let msg = e.to_string();
                if msg.contains("running") {
                    eprintln!("SKIP: no C++ compiler to build the CUDA emulator ({msg})");
                    None
                } else {
                    panic!("the CUDA sources do not build for the emulator: {msg}");
                }
            }
        }
    })
    .as_ref()
    .map(|(_, e)| e)
}

fn p<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

fn pm<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

#[test]
fn symmetric_clip_matches_reference() {
    let Some(emu) = emulator() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    // One block and several; D below, at and above the 16-wide K slices and 64-wide D chunks.
    for &(n, d, scale) in &[
        (1, 5, 10.0f32),
        (3, 16, 100.0),
        (63, 33, 14.3),
        (64, 64, 30.0),
        (70, 70, 100.0),
        (130, 17, 20.0),
    ] {
        let x = embeddings(&mut rng, n, d);
        let y = correlated(&mut rng, &x, n, d, 0.4);
        let s = [scale];
        let (mut loss, mut gate, mut dx, mut dy, mut ds) = (
            [0f32],
            vec![0f32; n],
            vec![0f32; n * d],
            vec![0f32; n * d],
            [0f32],
        );
        cuda::clip_symmetric(
            emu,
            &cuda::ClipPtrs {
                x: p(&x),
                y: p(&y),
                n,
                d,
                scale: p(&s),
                loss: pm(&mut loss),
                gate: pm(&mut gate),
                dx: pm(&mut dx),
                dy: pm(&mut dy),
                dscale: pm(&mut ds),
            },
        )
        .expect("emulated launch");
        let want = reference::clip_symmetric(&x, &y, n, d, scale as f64);
        let tag = format!("n={n} d={d} s={scale}");
        close_sum_f32(&format!("{tag} loss"), loss[0] as f64, want.loss, 0.0);
        close_f32(&format!("{tag} dx"), &dx, &want.dx);
        close_f32(&format!("{tag} dy"), &dy, &want.dy);
        close_sum_f32(
            &format!("{tag} dscale"),
            ds[0] as f64,
            want.dscale,
            want.dscale_mag,
        );
        let cpu = hq_kernels::cpu::clip_loss(
            hq_kernels::Mat::new(&x, n, d).expect("x"),
            hq_kernels::Mat::new(&y, n, d).expect("y"),
            scale,
            false,
            hq_kernels::Isa::Generic,
        )
        .expect("cpu");
        // Same f32 tile values on both sides (same products, same order within 16/64 chunks is
        // not guaranteed), so compare gates only where the margin is clear.
        for i in 0..n {
            if (cpu.gate[i] as f64 - want.gate[i]).abs() == 0.0 && gate[i] as f64 != want.gate[i] {
                let own: f64 = (0..d)
                    .map(|k| x[i * d + k] as f64 * y[i * d + k] as f64)
                    .sum();
                let best = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| {
                        (0..d)
                            .map(|k| x[i * d + k] as f64 * y[j * d + k] as f64)
                            .sum::<f64>()
                    })
                    .fold(f64::NEG_INFINITY, f64::max);
                assert!(
                    (own - best).abs() < 1e-5,
                    "{tag}: gate of row {i}: {} vs {}",
                    gate[i],
                    want.gate[i]
                );
            }
        }
    }
}

#[test]
fn local_clip_matches_reference() {
    let Some(emu) = emulator() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for &(n, world, d) in &[(1, 3, 8), (5, 2, 20), (40, 3, 33), (65, 2, 16)] {
        let m = n * world;
        let x_all = embeddings(&mut rng, m, d);
        let y_all = correlated(&mut rng, &x_all, m, d, 0.5);
        let rank = world - 1;
        let off = rank * n;
        let (xl, yl) = (
            &x_all[off * d..(off + n) * d],
            &y_all[off * d..(off + n) * d],
        );
        let scale = 25.0f32;
        let s = [scale];
        let mut loss = [0f32];
        let mut gate = vec![0f32; n];
        let (mut gxl, mut gyl, mut gxa, mut gya) = (
            vec![0f32; n * d],
            vec![0f32; n * d],
            vec![0f32; m * d],
            vec![0f32; m * d],
        );
        let mut ds = [0f32];
        cuda::clip_local(
            emu,
            &cuda::LocalClipPtrs {
                x_local: p(xl),
                y_local: p(yl),
                x_all: p(&x_all),
                y_all: p(&y_all),
                n,
                m,
                d,
                offset: off,
                scale: p(&s),
                loss: pm(&mut loss),
                gate: pm(&mut gate),
                dx_local: pm(&mut gxl),
                dy_local: pm(&mut gyl),
                dx_all: pm(&mut gxa),
                dy_all: pm(&mut gya),
                dscale: pm(&mut ds),
            },
        )
        .expect("emulated launch");
        let want = reference::clip_local(xl, yl, &x_all, &y_all, n, m, d, off, scale as f64);
        let tag = format!("n={n} m={m} d={d} off={off}");
        close_sum_f32(&format!("{tag} loss"), loss[0] as f64, want.loss, 0.0);
        close_f32(&format!("{tag} dx_local"), &gxl, &want.dx_local);
        close_f32(&format!("{tag} dy_local"), &gyl, &want.dy_local);
        close_f32(&format!("{tag} dx_all"), &gxa, &want.dx_all);
        close_f32(&format!("{tag} dy_all"), &gya, &want.dy_all);
        close_sum_f32(
            &format!("{tag} dscale"),
            ds[0] as f64,
            want.dscale,
            want.dscale_mag,
        );
    }
}

#[test]
fn forward_only_and_gate_kernels() {
    let Some(emu) = emulator() else { return };
    // The tie rule, through the gate-only launch and the forward-only contrastive launch.
    let d = 4;
    let x = vec![
        1.0f32, 0.0, 0.0, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
    ];
    let y = vec![
        1.0f32, 0.0, 0.0, 0.0, 0.0, 0.6, 0.8, 0.0, 1.0, 0.0, 0.0, 0.0,
    ];
    let s = [5.0f32];
    let mut gate = vec![0f32; 3];
    cuda::row_gate(emu, p(&x), p(&y), 3, 3, d, 0, p(&s), pm(&mut gate)).expect("gate");
    assert_eq!(gate, vec![1.0, 0.0, 1.0]);
    let (mut loss, mut gate2) = ([0f32], vec![0f32; 3]);
    cuda::clip_symmetric(
        emu,
        &cuda::ClipPtrs {
            x: p(&x),
            y: p(&y),
            n: 3,
            d,
            scale: p(&s),
            loss: pm(&mut loss),
            gate: pm(&mut gate2),
            dx: 0,
            dy: 0,
            dscale: 0,
        },
    )
    .expect("forward only");
    assert_eq!(gate2, gate);
    close_sum_f32(
        "forward-only loss",
        loss[0] as f64,
        reference::clip_symmetric(&x, &y, 3, d, 5.0).loss,
        0.0,
    );
}

#[test]
fn hni_matches_reference() {
    let Some(emu) = emulator() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for &(n, m, k, d, off, scale) in &[
        (1, 1, 1, 1, 0, 50.0f32),
        (5, 10, 3, 40, 5, 10.0),
        (9, 9, 1, 70, 0, 30.0),
    ] {
        let x = embeddings(&mut rng, n, d);
        let y = embeddings(&mut rng, m, d);
        let neg = embeddings(&mut rng, n * k, d);
        let gate: Vec<f32> = (0..n).map(|i| if i % 3 == 1 { 0.0 } else { 1.0 }).collect();
        let s = [scale];
        let (mut loss, mut dx, mut dyp, mut dn, mut ds) = (
            [0f32],
            vec![0f32; n * d],
            vec![0f32; n * d],
            vec![0f32; n * k * d],
            [0f32],
        );
        cuda::hni(
            emu,
            &cuda::HniPtrs {
                x: p(&x),
                y_all: p(&y),
                neg: p(&neg),
                n,
                k,
                d,
                offset: off,
                scale: p(&s),
                gate: p(&gate),
                loss: pm(&mut loss),
                dx: pm(&mut dx),
                dy_pos: pm(&mut dyp),
                dneg: pm(&mut dn),
                dscale: pm(&mut ds),
            },
        )
        .expect("emulated launch");
        let g64: Vec<f64> = gate.iter().map(|&g| g as f64).collect();
        let want = reference::hni(&x, &y, &neg, n, k, d, off, scale as f64, &g64);
        let tag = format!("n={n} k={k} d={d}");
        close_sum_f32(&format!("{tag} loss"), loss[0] as f64, want.loss, 0.0);
        close_f32(&format!("{tag} dx"), &dx, &want.dx);
        close_f32(&format!("{tag} dy_pos"), &dyp, &want.dy_pos);
        close_f32(&format!("{tag} dneg"), &dn, &want.dneg);
        close_sum_f32(&format!("{tag} dscale"), ds[0] as f64, want.dscale, 0.0);
    }
}

#[test]
fn bce_matches_reference() {
    let Some(emu) = emulator() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for &(n, k) in &[(1, 1), (3, 300), (4, 20_000)] {
        let mut z: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-15.0f32..15.0)).collect();
        z[0] = 1e4;
        let rows: Vec<Vec<i64>> = (0..n)
            .map(|i| {
                let mut r: Vec<i64> = (0..(i * 7) % 11)
                    .map(|_| rng.gen_range(0..k as i64))
                    .collect();
                r.sort_unstable();
                r.dedup();
                r
            })
            .collect();
        let t = TagTargets::from_rows(&rows);
        let (mut loss, mut dz) = ([0f32], vec![0f32; n * k]);
        cuda::bce(
            emu,
            &cuda::BcePtrs {
                z: p(&z),
                n,
                k,
                indptr: p(t.indptr()),
                indices: if t.nnz() == 0 { 0 } else { p(t.indices()) },
                loss: pm(&mut loss),
                dz: pm(&mut dz),
            },
        )
        .expect("emulated launch");
        let want = reference::bce(&z, n, k, t.indptr(), t.indices());
        close_sum_f32(&format!("n={n} k={k} loss"), loss[0] as f64, want.loss, 0.0);
        close_f32(&format!("n={n} k={k} dz"), &dz, &want.dz);
        // Loss only.
        let mut loss2 = [0f32];
        cuda::bce(
            emu,
            &cuda::BcePtrs {
                z: p(&z),
                n,
                k,
                indptr: p(t.indptr()),
                indices: if t.nnz() == 0 { 0 } else { p(t.indices()) },
                loss: pm(&mut loss2),
                dz: 0,
            },
        )
        .expect("emulated launch");
        assert_eq!(loss2, loss);
    }
}
