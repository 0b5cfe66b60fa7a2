//! Development aid: runs the CPU contrastive loss in a loop for `perf record`.
//! `cargo run --release -p hq-kernels --example profile_loop -- N grads(0/1) reps`
use hq_kernels::cpu::{self, Isa};
use hq_kernels::Mat;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let (n, grads, reps) = (
        a.first().copied().unwrap_or(1024),
        a.get(1).copied().unwrap_or(0) == 1,
        a.get(2).copied().unwrap_or(50),
    );
    let d = 512;
    let mut s = 1u64;
    let mut r = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % 2000) as f32 / 1000.0 - 1.0
    };
    let x: Vec<f32> = (0..n * d).map(|_| r() / 11.0).collect();
    let y: Vec<f32> = (0..n * d).map(|_| r() / 11.0).collect();
    let t = std::time::Instant::now();
    for _ in 0..reps {
        cpu::clip_loss(
            Mat::new(&x, n, d).expect("x"),
            Mat::new(&y, n, d).expect("y"),
            14.3,
            grads,
            Isa::detect(),
        )
        .expect("loss");
    }
    println!(
        "{:.3} ms per call",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}
