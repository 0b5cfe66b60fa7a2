//! Quick timing of the CPU contrastive loss phases against one tch matmul of the same size
//! (a development aid; the real comparison is `cargo bench -p hq-benches --bench losses`).
//!
//! `cargo run --release -p hq-kernels --example clip_timing -- 4096 512`

use std::time::Instant;

use hq_kernels::cpu::{self, Isa};
use hq_kernels::Mat;
use tch::{Device, Kind, Tensor};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(4096);
    let d = args.get(1).copied().unwrap_or(512);
    let reps = args.get(2).copied().unwrap_or(3);
    let x = Tensor::randn([n as i64, d as i64], (Kind::Float, Device::Cpu));
    let x = &x / x.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    let y = Tensor::randn([n as i64, d as i64], (Kind::Float, Device::Cpu));
    let y = &y / y.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    let xv = Vec::<f32>::try_from(&x.flatten(0, -1)).expect("x");
    let yv = Vec::<f32>::try_from(&y.flatten(0, -1)).expect("y");
    let gflop = 2.0 * (n * n * d) as f64 / 1e9;
    let time = |f: &dyn Fn()| {
        f();
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64
    };
    let mm = time(&|| {
        let _ = x.matmul(&y.tr());
    });
    println!(
        "tch matmul N x N x D: {:.3} s, {:.1} GFLOP/s",
        mm,
        gflop / mm
    );
    for isa in Isa::available() {
        let fwd = time(&|| {
            cpu::clip_loss(
                Mat::new(&xv, n, d).expect("x"),
                Mat::new(&yv, n, d).expect("y"),
                14.3,
                false,
                isa,
            )
            .expect("fwd");
        });
        let full = time(&|| {
            cpu::clip_loss(
                Mat::new(&xv, n, d).expect("x"),
                Mat::new(&yv, n, d).expect("y"),
                14.3,
                true,
                isa,
            )
            .expect("full");
        });
        println!(
            "{isa:?}: forward {:.3} s ({:.1} GFLOP/s), forward+backward {:.3} s ({:.1} GFLOP/s over 4 products), {:.2} matmuls",
            fwd,
            gflop / fwd,
            full,
            4.0 * gflop / full,
            full / mm
        );
    }
}
