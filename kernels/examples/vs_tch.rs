//! Development aid: the fused contrastive loss against tch's unfused one, exactly as
//! `benches/benches/losses.rs` runs them (tensors in, `loss.backward()`, gradients zeroed between
//! steps, D = 512), alternated ABAB so that both sides see the same machine load; prints min and
//! median of each. A quick check between criterion runs, not a replacement for them.
//! `VS_TCH_SEPARATE=1` runs all fused steps, then all tch steps (criterion's order) instead;
//! `VS_TCH_ONLY=fused` (or `tch`) runs one side only, e.g. under `perf stat -e cycles` to count
//! the CPU cycles a step costs whatever the machine's load.
//!
//! `cargo run --release -p hq-kernels --example vs_tch -- 256 1024 [reps=41]`

use std::time::Instant;

use tch::{Device, Kind, Tensor};

const D: i64 = 512;

fn inputs(n: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(n);
    let unit = |t: Tensor| &t / t.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    let x = unit(Tensor::randn([n, D], (Kind::Float, Device::Cpu)));
    let y = unit(&x * 0.3 + unit(Tensor::randn([n, D], (Kind::Float, Device::Cpu))));
    let s = Tensor::from((1.0f32 / 0.07).ln());
    (
        x.set_requires_grad(true),
        y.set_requires_grad(true),
        s.set_requires_grad(true),
    )
}

fn zero_grads(ts: &[&Tensor]) {
    for t in ts {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn fused(x: &Tensor, y: &Tensor, ls: &Tensor) -> f64 {
    let out = hq_kernels::clip_loss(x, y, &ls.exp()).expect("fused loss");
    out.loss.backward();
    out.loss.double_value(&[])
}

fn unfused(x: &Tensor, y: &Tensor, ls: &Tensor) -> f64 {
    let n = x.size()[0];
    let logits = x.matmul(&y.tr()) * ls.exp();
    let labels = Tensor::arange(n, (Kind::Int64, x.device()));
    let loss = (logits.cross_entropy_for_logits(&labels)
        + logits.tr().cross_entropy_for_logits(&labels))
        / 2.0;
    loss.backward();
    loss.double_value(&[])
}

fn main() {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (ns, reps) = match args.len() {
        0 => (vec![256, 1024], 41),
        1 => (args, 41),
        _ => {
            let reps = *args.last().unwrap_or(&41) as usize;
            (args[..args.len() - 1].to_vec(), reps)
        }
    };
    let separate = std::env::var_os("VS_TCH_SEPARATE").is_some();
    let only = std::env::var("VS_TCH_ONLY").ok();
    println!(
        "threads: libtorch {}, rayon {}",
        tch::get_num_threads(),
        rayon::current_num_threads()
    );
    for n in ns {
        let (x, y, ls) = inputs(n);
        let (vf, vt) = (fused(&x, &y, &ls), unfused(&x, &y, &ls));
        assert!((vf - vt).abs() <= 1e-4 * vt.abs().max(1.0), "{vf} vs {vt}");
        let (mut tf, mut tt) = (Vec::new(), Vec::new());
        let step = |f: fn(&Tensor, &Tensor, &Tensor) -> f64, into: &mut Vec<f64>| {
            zero_grads(&[&x, &y, &ls]);
            let t = Instant::now();
            f(&x, &y, &ls);
            into.push(t.elapsed().as_secs_f64() * 1e3);
        };
        if let Some(only) = only.as_deref() {
            // One side only (for `perf stat`: cycles per step, immune to load).
            let f = if only == "tch" { unfused } else { fused };
            (0..reps).for_each(|_| step(f, &mut tf));
            tt = tf.clone();
        } else if separate {
            // As criterion does: all steps of one side, then all of the other.
            (0..reps).for_each(|_| step(fused, &mut tf));
            (0..reps).for_each(|_| step(unfused, &mut tt));
        } else {
            for _ in 0..reps {
                step(fused, &mut tf);
                step(unfused, &mut tt);
            }
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            (v[0], v[v.len() / 2])
        };
        let ((fmin, fmed), (tmin, tmed)) = (stats(&mut tf), stats(&mut tt));
        println!(
            "N={n:>6} reps={reps}: fused min {fmin:.3} ms med {fmed:.3} ms | tch min {tmin:.3} ms med {tmed:.3} ms | tch/fused min {:.2}x med {:.2}x",
            tmin / fmin,
            tmed / fmed
        );
    }
}
