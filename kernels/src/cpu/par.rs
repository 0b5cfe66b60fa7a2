//! Where the CPU kernels' parallel work runs: rayon's global pool, with the calling thread as one
//! of the workers.
//!
//! The kernels split a call into a few large jobs (one contiguous range of row blocks per worker,
//! never fine-grained tasks), because every hand-off to another thread is a point where the call
//! can wait for a scheduler time slice: on a small, shared machine, and next to libtorch's OpenMP
//! workers (which spin for a while after every ATen op), a call made of many small tasks spends
//! more time waiting than computing. [`run`] therefore keeps job 0 on the calling thread and
//! spawns only the others, and [`workers_for`] gives small problems fewer workers (down to one:
//! no hand-off at all).
//!
//! rayon makes this safe to call from anywhere: from a rayon worker (the jobs join that pool, the
//! waiting thread helps run them), from several threads at once (they queue on one pool of
//! `rayon::current_num_threads()` threads: no oversubscription beyond it), and inside tch code.
//! Results come back in job order and the split depends only on the problem and the thread count,
//! so results are deterministic for a fixed thread count. A panic in a job reaches the caller.
//!
//! (Running the jobs on libtorch's own OpenMP team through `GOMP_parallel` was tried and dropped:
//! on a loaded 2-core machine it made the median step 10-40x slower, for tch's own ops as well.)

use rayon::Scope;

/// Multiply-adds below which one more worker is not worth a hand-off (~50 us of work).
const MIN_WORK_PER_WORKER: usize = 4 << 20;

/// Number of threads the kernels may use.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Workers for a call doing about `work` multiply-adds: all threads for big problems, fewer (down
/// to one) when each would get less than [`MIN_WORK_PER_WORKER`].
pub(crate) fn workers_for(work: usize) -> usize {
    (work / MIN_WORK_PER_WORKER).clamp(1, threads())
}

/// Runs `f` on every job; results in job order. Job 0 runs on the calling thread, the others on
/// rayon's pool.
pub(crate) fn run<T: Send, R: Send, F: Fn(T) -> R + Sync>(jobs: Vec<T>, f: F) -> Vec<R> {
    if jobs.len() <= 1 || threads() == 1 {
        return jobs.into_iter().map(f).collect();
    }
    let mut out: Vec<Option<R>> = jobs.iter().map(|_| None).collect();
    let mut jobs = jobs.into_iter();
    let first = jobs.next();
    let f = &f;
    rayon::in_place_scope(|s: &Scope<'_>| {
        let (head, rest) = out.split_at_mut(1);
        for (job, slot) in jobs.zip(rest.iter_mut()) {
            s.spawn(move |_| *slot = Some(f(job)));
        }
        if let Some(job) = first {
            head[0] = Some(f(job));
        }
    });
    out.into_iter().flatten().collect()
}

/// `f(chunk_index, chunk)` over `chunk`-sized pieces of `data`, in parallel.
pub(crate) fn for_chunks_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(
    data: &mut [T],
    chunk: usize,
    f: F,
) {
    let jobs: Vec<(usize, &mut [T])> = data.chunks_mut(chunk.max(1)).enumerate().collect();
    run(jobs, |(i, c)| f(i, c));
}

/// Chunk length that splits `len` items into one job per worker, each at least `min` items.
pub(crate) fn chunk_len(len: usize, min: usize) -> usize {
    len.div_ceil(threads()).max(min).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_in_order_and_every_job_runs() {
        let out = run((0..37).collect(), |i: usize| i * i);
        assert_eq!(out, (0..37).map(|i| i * i).collect::<Vec<_>>());
        let mut v = vec![0u32; 1000];
        for_chunks_mut(&mut v, 7, |c, s| s.iter_mut().for_each(|x| *x = c as u32));
        assert!(v.iter().enumerate().all(|(i, &x)| x as usize == i / 7));
    }

    #[test]
    fn panics_reach_the_caller() {
        for bad in [0, 2] {
            let r = std::panic::catch_unwind(|| {
                run(vec![0, 1, 2, 3], |i: i32| {
                    if i == bad {
                        panic!("job {bad}")
                    } else {
                        i
                    }
                })
            });
            assert!(r.is_err());
        }
    }

    #[test]
    fn nested_and_concurrent_calls_complete() {
        // From inside rayon's pool and from several plain threads at once.
        use rayon::prelude::*;
        let inner: Vec<usize> = (0..8usize)
            .into_par_iter()
            .map(|k| run((0..5).collect(), move |i: usize| i + k).iter().sum())
            .collect();
        assert_eq!(inner, (0..8).map(|k| 10 + 5 * k).collect::<Vec<_>>());
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|k| s.spawn(move || run((0..9).collect(), move |i: usize| i * k)))
                .collect();
            for (k, h) in hs.into_iter().enumerate() {
                let got = h.join().expect("thread");
                assert_eq!(got, (0..9).map(|i| i * k).collect::<Vec<_>>());
            }
        });
    }

    #[test]
    fn small_work_gets_one_worker() {
        assert_eq!(workers_for(0), 1);
        assert_eq!(workers_for(MIN_WORK_PER_WORKER - 1), 1);
        assert_eq!(workers_for(usize::MAX / 2), threads());
    }
}
