fn main() {
    hq_build_support::link_libtorch_with_cuda();
}
