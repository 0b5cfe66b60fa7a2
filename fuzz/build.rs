fn main() {
    // Only the hq-train targets link libtorch; a `--no-default-features` build has no tch.
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_some() {
        hq_build_support::link_libtorch_with_cuda();
    }
}
