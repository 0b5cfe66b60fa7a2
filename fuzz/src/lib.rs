//! Fuzz targets for every parser of outside input, and the property checks they share.
//!
//! Each target is a plain `fn(&[u8])` in [`targets`] that panics when a property fails; the
//! harness in `tests/targets.rs` runs each one under [bolero](https://docs.rs/bolero):
//! `cargo test -p hq-fuzz` replays the committed corpora (`tests/__fuzz__/<target>/corpus`) and
//! the crash regressions, then a bounded number of random inputs, and
//! `cargo bolero test <target> --engine libfuzzer --sanitizer NONE` runs the same function
//! coverage-guided on the stable toolchain. `README.md` says why bolero, and records the campaigns.
//!
//! The properties, beyond "no panic" (see [`props`]):
//! - every sample is accounted for: results + error records = input;
//! - write-then-read round trips are identical;
//! - a length field cannot make a reader allocate without bound ([`alloc`] measures the peak);
//! - a rejected input gets an error that names the problem.

pub mod alloc;
pub mod files;
pub mod props;
#[cfg(all(feature = "train", feature = "runtime"))]
pub mod seeds;
pub mod targets;
