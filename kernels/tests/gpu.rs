//! The CUDA path on a real GPU: the same comparisons as the CPU tests (f64 references and tch
//! autograd of the unfused formulas), through the public entry points on CUDA tensors, plus the
//! CUDA path against the CPU path on identical inputs.
//!
//! They run automatically where a GPU is present (`tch::Cuda::is_available()` and a CUDA driver
//! library); elsewhere every test prints `SKIP: ...` and passes. They live in this crate (not in
//! `tests/`) because this crate's build script links libtorch's CUDA half into its test binaries
//! (tch-rs issue 980).

use hq_kernels::testing::{
    close_all as close, close_sum_f32 as close_scalar, correlated, embeddings, seed,
};
use hq_kernels::{
    clip_loss_local_with, clip_loss_with, cuda, hni_loss_with, reference, row_gate_with,
    short_tag_bce_with, Backend, KernelError, Options, TagTargets,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

fn gpu() -> Option<Device> {
    if !cuda::driver_present() {
        eprintln!("SKIP: no CUDA driver library on this machine; GPU tests not run");
        return None;
    }
    if !tch::Cuda::is_available() {
        eprintln!("SKIP: libtorch sees no CUDA device; GPU tests not run");
        return None;
    }
    Some(Device::Cuda(0))
}

fn cuda_opts() -> Options {
    Options {
        backend: Backend::Cuda,
        ..Options::default()
    }
}

fn cpu_opts() -> Options {
    Options {
        backend: Backend::Cpu,
        ..Options::default()
    }
}

fn on(dev: Device, v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v)
        .reshape(shape)
        .to_device(dev)
        .set_requires_grad(true)
}

fn host(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        &t.to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .flatten(0, -1),
    )
    .expect("host copy")
}

#[test]
fn kernels_compile_for_the_device() {
    let Some(_) = gpu() else { return };
    let arch = cuda::prepare_device(0).expect("NVRTC compile + module load on the device");
    eprintln!("kernels built for {arch}");
}

#[test]
fn symmetric_clip_on_cuda_matches_reference_and_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for &(n, d, scale) in &[
        (1usize, 7usize, 10.0f32),
        (63, 33, 14.3),
        (64, 64, 100.0),
        (257, 512, 100.0),
        (1000, 77, 30.0),
    ] {
        let x = embeddings(&mut rng, n, d);
        let y = correlated(&mut rng, &x, n, d, 0.3);
        let (xt, yt) = (
            on(dev, &x, &[n as i64, d as i64]),
            on(dev, &y, &[n as i64, d as i64]),
        );
        let st = Tensor::from(scale).to_device(dev).set_requires_grad(true);
        let out = clip_loss_with(&xt, &yt, &st, &cuda_opts()).expect("cuda");
        out.loss.backward();
        let want = reference::clip_symmetric(&x, &y, n, d, scale as f64);
        let tag = format!("n={n} d={d} s={scale}");
        close_scalar(
            &format!("{tag} loss"),
            out.loss.double_value(&[]),
            want.loss,
            0.0,
        );
        close(&format!("{tag} dx"), &host(&xt.grad()), &want.dx);
        close(&format!("{tag} dy"), &host(&yt.grad()), &want.dy);
        close_scalar(
            &format!("{tag} dscale"),
            st.grad().double_value(&[]),
            want.dscale,
            want.dscale_mag,
        );
        // Same inputs through the CPU path: same loss and gate.
        let (xc, yc) = (
            on(Device::Cpu, &x, &[n as i64, d as i64]),
            on(Device::Cpu, &y, &[n as i64, d as i64]),
        );
        let c = clip_loss_with(&xc, &yc, &Tensor::from(scale), &cpu_opts()).expect("cpu");
        close_scalar(
            &format!("{tag} loss cuda vs cpu"),
            out.loss.double_value(&[]),
            c.loss.double_value(&[]),
            0.0,
        );
        assert_eq!(out.gate.device(), dev);
        let (g_cuda, g_cpu) = (host(&out.gate), host(&c.gate));
        let flips = g_cuda.iter().zip(&g_cpu).filter(|(a, b)| a != b).count();
        assert!(
            flips <= n / 100,
            "{tag}: {flips} gates differ between CUDA and CPU"
        );
    }
}

#[test]
fn clip_on_cuda_matches_tch_autograd() {
    let Some(dev) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let (n, d) = (512usize, 256usize);
    let x = embeddings(&mut rng, n, d);
    let y = correlated(&mut rng, &x, n, d, 0.2);
    let ls0 = (1.0f32 / 0.07).ln();
    let (xt, yt) = (
        on(dev, &x, &[n as i64, d as i64]),
        on(dev, &y, &[n as i64, d as i64]),
    );
    let ls = Tensor::from(ls0).to_device(dev).set_requires_grad(true);
    let out = clip_loss_with(&xt, &yt, &ls.exp(), &cuda_opts()).expect("cuda");
    out.loss.backward();
    let (xr, yr) = (
        on(dev, &x, &[n as i64, d as i64]),
        on(dev, &y, &[n as i64, d as i64]),
    );
    let lsr = Tensor::from(ls0).to_device(dev).set_requires_grad(true);
    let logits = xr.matmul(&yr.tr()) * lsr.exp();
    let labels = Tensor::arange(n as i64, (Kind::Int64, dev));
    let want = (logits.cross_entropy_for_logits(&labels)
        + logits.tr().cross_entropy_for_logits(&labels))
        / 2.0;
    want.backward();
    close_scalar(
        "loss",
        out.loss.double_value(&[]),
        want.double_value(&[]),
        0.0,
    );
    close("dx", &host(&xt.grad()), &host(&xr.grad()));
    close("dy", &host(&yt.grad()), &host(&yr.grad()));
    let (g, w) = (ls.grad().double_value(&[]), lsr.grad().double_value(&[]));
    assert!(
        (g - w).abs() <= 1e-4 * w.abs().max(1e-3),
        "d logit_scale {g} vs {w}"
    );
}

#[test]
fn local_clip_on_cuda_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for &(n, world, d) in &[(1usize, 3usize, 8usize), (40, 3, 33), (256, 4, 512)] {
        let m = n * world;
        let xa = embeddings(&mut rng, m, d);
        let ya = correlated(&mut rng, &xa, m, d, 0.4);
        let off = (world - 1) * n;
        let (xl, yl) = (&xa[off * d..(off + n) * d], &ya[off * d..(off + n) * d]);
        let (ni, mi, di) = (n as i64, m as i64, d as i64);
        let (xlt, ylt, xat, yat) = (
            on(dev, xl, &[ni, di]),
            on(dev, yl, &[ni, di]),
            on(dev, &xa, &[mi, di]),
            on(dev, &ya, &[mi, di]),
        );
        let st = Tensor::from(25.0f32).to_device(dev).set_requires_grad(true);
        let out = clip_loss_local_with(&xlt, &ylt, &xat, &yat, &st, off as i64, &cuda_opts())
            .expect("cuda");
        out.loss.backward();
        let want = reference::clip_local(xl, yl, &xa, &ya, n, m, d, off, 25.0);
        let tag = format!("n={n} m={m} d={d}");
        close_scalar(
            &format!("{tag} loss"),
            out.loss.double_value(&[]),
            want.loss,
            0.0,
        );
        close(
            &format!("{tag} dx_local"),
            &host(&xlt.grad()),
            &want.dx_local,
        );
        close(
            &format!("{tag} dy_local"),
            &host(&ylt.grad()),
            &want.dy_local,
        );
        close(&format!("{tag} dx_all"), &host(&xat.grad()), &want.dx_all);
        close(&format!("{tag} dy_all"), &host(&yat.grad()), &want.dy_all);
        close_scalar(
            &format!("{tag} dscale"),
            st.grad().double_value(&[]),
            want.dscale,
            want.dscale_mag,
        );
    }
}

#[test]
fn hni_and_bce_on_cuda_match_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let (n, k, d) = (300usize, 2usize, 128usize);
    let x = embeddings(&mut rng, n, d);
    let y = correlated(&mut rng, &x, n, d, 0.5);
    let neg = embeddings(&mut rng, n * k, d);
    let (xt, yt) = (
        on(dev, &x, &[n as i64, d as i64]),
        on(dev, &y, &[n as i64, d as i64]),
    );
    let nt = on(dev, &neg, &[n as i64, k as i64, d as i64]);
    let st = Tensor::from(20.0f32).to_device(dev).set_requires_grad(true);
    let gate = row_gate_with(&xt, &yt, &st, 0, &cuda_opts()).expect("gate");
    let loss = hni_loss_with(&xt, &yt, &nt, &st, 0, Some(&gate), &cuda_opts()).expect("hni");
    loss.backward();
    let g64 = host(&gate);
    let want = reference::hni(&x, &y, &neg, n, k, d, 0, 20.0, &g64);
    close_scalar("hni loss", loss.double_value(&[]), want.loss, 0.0);
    close("hni dx", &host(&xt.grad()), &want.dx);
    close("hni dy", &host(&yt.grad()), &want.dy_pos);
    close("hni dneg", &host(&nt.grad()), &want.dneg);
    close_scalar("hni dscale", st.grad().double_value(&[]), want.dscale, 0.0);

    let (rows, classes) = (64usize, 100_000usize);
    let z: Vec<f32> = (0..rows * classes)
        .map(|_| rng.gen_range(-20.0f32..20.0))
        .collect();
    let lists: Vec<Vec<i64>> = (0..rows)
        .map(|_| {
            let mut r: Vec<i64> = (0..rng.gen_range(0..15))
                .map(|_| rng.gen_range(0..classes as i64))
                .collect();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect();
    let t = TagTargets::from_rows(&lists);
    let zt = on(dev, &z, &[rows as i64, classes as i64]);
    let l = short_tag_bce_with(&zt, &t, &cuda_opts()).expect("bce");
    l.backward();
    let want = reference::bce(&z, rows, classes, t.indptr(), t.indices());
    close_scalar("bce loss", l.double_value(&[]), want.loss, 0.0);
    close("bce dz", &host(&zt.grad()), &want.dz);
}

#[test]
fn bad_input_on_cuda_is_an_error() {
    let Some(dev) = gpu() else { return };
    let x = Tensor::randn([16, 8], (Kind::Float, dev));
    let mut bad = x.copy();
    let _ = bad.get(5).get(3).fill_(f64::INFINITY);
    let s = Tensor::from(10.0f32);
    match clip_loss_with(&bad, &x, &s, &cuda_opts()) {
        Err(KernelError::NonFinite { what, detail }) => {
            assert!(
                what.contains("x") && detail.contains("row 5, column 3"),
                "{what}: {detail}"
            );
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    let _ = bad.zero_();
    let t = TagTargets::from_rows(&[vec![9i64]]);
    let e = short_tag_bce_with(&Tensor::zeros([1, 4], (Kind::Float, dev)), &t, &cuda_opts())
        .expect_err("out of range");
    assert!(e.to_string().contains("tag index 9"), "{e}");
}

#[test]
fn large_batch_runs_in_linear_memory() {
    let Some(dev) = gpu() else { return };
    // 32k x 32k logits would be 4 GiB per matrix in the unfused version; here only O(N D).
    let (n, d) = (32_768i64, 512i64);
    tch::manual_seed(0);
    let x = Tensor::randn([n, d], (Kind::Float, dev));
    let x = (&x / x.norm_scalaropt_dim(2.0, [1i64].as_slice(), true)).set_requires_grad(true);
    let y = Tensor::randn([n, d], (Kind::Float, dev));
    let y = (&y / y.norm_scalaropt_dim(2.0, [1i64].as_slice(), true)).set_requires_grad(true);
    let out = clip_loss_with(&x, &y, &Tensor::from(100.0f32), &cuda_opts()).expect("large batch");
    out.loss.backward();
    assert!(out.loss.double_value(&[]).is_finite());
    assert!(bool::try_from(x.grad().isfinite().all()).expect("bool"));
}
