/* LD_PRELOAD shim for tools/cpu-paths.sh: makes Intel MKL (linked into libtorch_cpu.so) believe it
 * runs on a non-Intel CPU, so it takes the code path it takes on AMD machines. MKL asks these two
 * exported service functions whether the CPU is a genuine Intel one; libtorch exports them with
 * default visibility, so a preloaded definition wins. Measured on an Intel Xeon (AVX-512), torch
 * 2.11.0's MKL 2024.0: MKL_VERBOSE reports "Intel(R) Architecture processors" instead of AVX-512,
 * and bit-identical columns of one SGEMM come out 1-8 ulps apart, as on an AMD EPYC. */
int mkl_serv_intel_cpu_true(void) { return 0; }
int mkl_serv_intel_cpu(void) { return 0; }
