// Row-scatter probe (scripts/bench_copy_paths.py): the direct dispatch's data movement alone, on one
// GPU. A "rank" reads each of its rows once and writes it to two places (its own receive array at
// row perm[t], the peer's at row dst1_row0 + perm[t]), as intranode_dispatch_direct does at 2 ranks.
// Two variants of the copy engine inside an SM:
//   scatter_regs<U>: a warp per row, 16-byte loads (U in flight per lane), then the stores: the
//                    library's copy_row_to_all today. _pf: the loads carry the L2::256B prefetch hint.
//   scatter_tma:     lane 0 of each producer warp drives a ring of `stages` whole-row buffers in
//                    shared memory: bulk-load a row (mbarrier completion), bulk-store it to both
//                    places, refill the ring one row behind, so stages - 1 row loads stay in flight.
// Not part of the library's data path: the numbers decide whether the dispatch moves to TMA.
#include "common/tma.cuh"
#include "common/utils.cuh"

namespace {

constexpr int kWarpSize = 32;
constexpr int kChunk = 32;   // rows per chunk; chunk c belongs to block c % gridDim.x (as in the dispatch)

template <bool kPrefetch>
DEEPEP_DEVICE int4 load_16(const int4* p) {
    if (!kPrefetch) return deepep::ld_nc_16(p);   // the dispatch's load
    int4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// kChunked: rows in chunks of kChunk, chunk c to block c % gridDim.x (the dispatch's split: blocks
// differ by a chunk when the chunks do not divide evenly); else row t to global warp t % warps.
template <int kUnroll, bool kPrefetch, bool kChunked = true>
DEEPEP_DEVICE void scatter_regs(const uint8_t* __restrict__ x, uint8_t* dst0, uint8_t* dst1,
                                const int* __restrict__ perm, int num_rows, int row_bytes, long long dst1_row0) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, num_warps = blockDim.x / kWarpSize;
    const int n16 = row_bytes >> 4;
    const int chunk = kChunked ? kChunk : num_warps;   // flat: one "chunk" a warp-row of the grid
    const int num_chunks = (num_rows + chunk - 1) / chunk;
    for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
        const int t_end = min(num_rows, (c + 1) * chunk);
        for (int t = c * chunk + warp; t < t_end; t += num_warps) {
            const long long r = __ldg(perm + t);
            const int4* src = reinterpret_cast<const int4*>(x + static_cast<long long>(t) * row_bytes);
            int4* d0 = reinterpret_cast<int4*>(dst0 + r * row_bytes);
            int4* d1 = reinterpret_cast<int4*>(dst1 + (dst1_row0 + r) * row_bytes);
            for (int i0 = 0; i0 < n16; i0 += kUnroll * kWarpSize) {
                int4 v[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int i = i0 + u * kWarpSize + lane;
                    if (i < n16) v[u] = load_16<kPrefetch>(src + i);
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int i = i0 + u * kWarpSize + lane;
                    if (i < n16) d0[i] = v[u];
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int i = i0 + u * kWarpSize + lane;
                    if (i < n16) d1[i] = v[u];
                }
            }
        }
        if (kChunked) __syncthreads();   // the dispatch publishes each chunk after one
    }
}

}  // namespace

#define DEEPEP_SCATTER_REGS(NAME, UNROLL, PREFETCH, CHUNKED)                                                 \
    extern "C" __global__ void __launch_bounds__(512, 1)                                                      \
    NAME(const uint8_t* x, uint8_t* dst0, uint8_t* dst1, const int* perm, int num_rows, int row_bytes,        \
         long long dst1_row0) {                                                                               \
        scatter_regs<UNROLL, PREFETCH, CHUNKED>(x, dst0, dst1, perm, num_rows, row_bytes, dst1_row0);         \
    }
DEEPEP_SCATTER_REGS(scatter_regs16, 16, false, true)
DEEPEP_SCATTER_REGS(scatter_regs16_pf, 16, true, true)
DEEPEP_SCATTER_REGS(scatter_regs8, 8, false, true)
DEEPEP_SCATTER_REGS(scatter_regs16_flat, 16, false, false)

// Producer warp w of the block (blockDim.x = 32 x producers) owns stages [w * stages, (w+1) * stages)
// of the dynamic shared memory (stages x row_bytes each) and rows g, g + G, ... (g its global producer
// index, G their count). Only lane 0 works: the TMA unit does the copying.
extern "C" __global__ void __launch_bounds__(512, 1)
scatter_tma(const uint8_t* x, uint8_t* dst0, uint8_t* dst1, const int* perm, int num_rows, int row_bytes,
            long long dst1_row0, int stages, int chunked) {
    extern __shared__ __align__(128) uint8_t ring[];
    __shared__ __align__(8) uint64_t bars[16][16];   // [producer][stage]
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    if (lane != 0) return;
    const int producers = blockDim.x / kWarpSize;
    uint8_t* my_ring = ring + static_cast<long long>(warp) * stages * row_bytes;
    uint64_t* my_bars = bars[warp];
    for (int s = 0; s < stages; ++s) deepep::tma::init_barrier(my_bars + s);
    deepep::tma::fence_barrier_init();
    // chunked == 0, flat: row g + k * G (g the global producer index, G their count); chunked > 0, the
    // dispatch's split with chunks of `chunked` rows: chunk c to block c % gridDim.x, its rows w, w + P,
    // ... to producer w (chunked a multiple of the producer count)
    const int g = blockIdx.x * producers + warp, G = gridDim.x * producers;
    const int chunk = chunked > 0 ? chunked : kChunk;   // (unused by the flat modes)
    const int per_chunk = chunk / producers;
    const int num_chunks = (num_rows + chunk - 1) / chunk;
    const int block_chunks = num_chunks > static_cast<int>(blockIdx.x) ? (num_chunks - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    int n = num_rows > g ? (num_rows - g + G - 1) / G : 0;   // rows of this producer
    // chunked == -1: block b owns rows [b T / grid, (b+1) T / grid) (balanced, contiguous), its producers
    // take every P-th of them; chunked == -2: producer g owns rows [g T / G, (g+1) T / G)
    const int lo = chunked == -1 ? static_cast<int>(static_cast<long long>(blockIdx.x) * num_rows / gridDim.x)
                                 : static_cast<int>(static_cast<long long>(g) * num_rows / G);
    const int hi = chunked == -1 ? static_cast<int>(static_cast<long long>(blockIdx.x + 1) * num_rows / gridDim.x)
                                 : static_cast<int>(static_cast<long long>(g + 1) * num_rows / G);
    if (chunked == -1) n = hi - lo > warp ? (hi - lo - warp + producers - 1) / producers : 0;
    if (chunked == -2) n = hi - lo;
    if (chunked > 0) {
        n = 0;
        for (int k = 0; k < block_chunks * per_chunk; ++k) {
            const int t = (blockIdx.x + (k / per_chunk) * gridDim.x) * chunk + warp + (k % per_chunk) * producers;
            if (t < num_rows) n = k + 1;
        }
    }
    auto row_of = [&](int k) -> int {
        if (chunked == -1) return lo + warp + k * producers;
        if (chunked == -2) return lo + k;
        return chunked > 0 ? (blockIdx.x + (k / per_chunk) * gridDim.x) * chunk + warp + (k % per_chunk) * producers
                           : g + k * G;
    };
    auto stage = [&](int k) { return my_ring + static_cast<long long>(k % stages) * row_bytes; };
    auto issue_load = [&](int k) {
        deepep::tma::load(stage(k), x + static_cast<long long>(row_of(k)) * row_bytes, row_bytes, my_bars + k % stages);
    };
    for (int k = 0; k < min(stages, n); ++k) issue_load(k);
    for (int k = 0; k < n; ++k) {
        deepep::tma::wait_barrier(my_bars + k % stages, (k / stages) & 1);
        const long long r = __ldg(perm + row_of(k));
        deepep::tma::store(dst0 + r * row_bytes, stage(k), row_bytes);
        deepep::tma::store(dst1 + (dst1_row0 + r) * row_bytes, stage(k), row_bytes);
        deepep::tma::commit();
        if (k >= 1 && k - 1 + stages < n) {   // the previous row's stores have read their stage: refill it
            deepep::tma::wait_read<1>();
            issue_load(k - 1 + stages);
        }
    }
    deepep::tma::wait_done<0>();   // the writes are complete before the kernel ends
}
