// A CPU emulator for HQ-CLIP's CUDA kernels, for machines without a GPU (tests only).
//
// The .cu files are compiled as C++20 against these definitions: one std::thread per CUDA
// thread, blocks run one after another, `__shared__` variables become function statics (shared
// by the threads of the one running block), `__syncthreads` is a block-wide std::barrier and
// `__shfl_xor_sync` / `__syncwarp` exchange through a per-warp slot array with a warp barrier.
// It executes the kernels' real index arithmetic, masking, barriers and reductions, so it finds
// logic errors; it says nothing about speed, occupancy or memory-model subtleties beyond
// barrier ordering. Every launch also checks the argument list's count and byte sizes against
// the kernel's C signature.
#ifndef HQ_EMU_HPP
#define HQ_EMU_HPP

#include <math.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace hq_emu {
struct Warp {
    std::barrier<> bar{32};
    alignas(8) unsigned char slot[32][8];
};
inline std::barrier<>* block_bar = nullptr;
inline std::vector<std::unique_ptr<Warp>>* warps = nullptr;
inline thread_local int lane = 0;
inline thread_local int warp_id = 0;

// Runs `body` for every thread of every block of the grid.
inline int run(const std::function<void()>& body, dim3 g, dim3 b) {
    unsigned nt = b.x * b.y * b.z;
    if (nt == 0 || nt % 32 != 0 || nt > 1024) return -10;
    blockDim = b;
    gridDim = g;
    for (unsigned bz = 0; bz < g.z; ++bz)
        for (unsigned by = 0; by < g.y; ++by)
            for (unsigned bx = 0; bx < g.x; ++bx) {
                std::barrier<> bar(nt);
                std::vector<std::unique_ptr<Warp>> ws;
                for (unsigned w = 0; w < nt / 32; ++w) ws.push_back(std::make_unique<Warp>());
                block_bar = &bar;
                warps = &ws;
                std::vector<std::thread> th;
                th.reserve(nt);
                for (unsigned t = 0; t < nt; ++t)
                    th.emplace_back([&, t, bx, by, bz] {
                        threadIdx = dim3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
                        blockIdx = dim3{bx, by, bz};
                        lane = (int)(t % 32);
                        warp_id = (int)(t / 32);
                        body();
                    });
                for (auto& x : th) x.join();
            }
    return 0;
}
}  // namespace hq_emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline void __syncthreads() { hq_emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { (*hq_emu::warps)[hq_emu::warp_id]->bar.arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    auto& w = *(*hq_emu::warps)[hq_emu::warp_id];
    std::memcpy(w.slot[hq_emu::lane], &v, sizeof(T));
    w.bar.arrive_and_wait();
    T r;
    std::memcpy(&r, w.slot[hq_emu::lane ^ lane_mask], sizeof(T));
    w.bar.arrive_and_wait();
    return r;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

using std::max;
using std::min;

namespace hq_emu {
template <class... Ts, std::size_t... I>
void call(void (*f)(Ts...), void** a, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<Ts>*>(a[I])...);
}

// Checks the argument list, then runs the kernel. 0 on success; -2 wrong count; -100 - i wrong
// byte size of argument i; -10 bad block size.
template <class... Ts>
int dispatch(void (*f)(Ts...), void** a, const std::size_t* sizes, int nargs, unsigned grid, unsigned block) {
    if (nargs != (int)sizeof...(Ts)) return -2;
    const std::size_t expect[] = {sizeof(Ts)..., 0};
    for (int i = 0; i < nargs; ++i)
        if (sizes[i] != expect[i]) return -100 - i;
    return run([&] { call(f, a, std::index_sequence_for<Ts...>{}); }, dim3{grid, 1, 1}, dim3{block, 1, 1});
}
}  // namespace hq_emu

#endif  // HQ_EMU_HPP
