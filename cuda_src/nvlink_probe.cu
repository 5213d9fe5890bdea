// NVLink write-throughput probe (scripts/bench_nvlink_write.py): how fast can SMs push bytes into a
// peer GPU's memory, with plain 16-byte stores (what the low-latency and intranode kernels do
// today) or with TMA bulk stores from shared memory (cp.async.bulk, the candidate replacement)?
// Both kernels copy `bytes` from a local buffer to a peer-mapped destination; every warp takes
// `chunk`-byte pieces in grid-stride order. Not part of the library's data path.
#include "common/utils.cuh"

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;     // probe_tma: blockDim.x must be 256
constexpr int kStages = 2;            // shared-memory buffers per warp (TMA load of one overlaps the store of the other)
constexpr int kMaxChunk = 2048;       // bytes per stage (8 warps x 2 stages x 2 KiB = 32 KiB static)

DEEPEP_DEVICE unsigned int smem_addr(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}

}  // namespace

// Plain stores: each lane loads kUnroll 16-byte words, then stores them to the peer.
extern "C" __global__ void __launch_bounds__(512)
probe_stores(const int4* __restrict__ src, int4* dst, long long bytes) {
    constexpr int kUnroll = 8;
    const long long n = bytes >> 4;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x * kUnroll;
    for (long long base = static_cast<long long>(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x; base < n;
         base += stride) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * blockDim.x < n) v[u] = __ldcg(src + base + u * blockDim.x);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * blockDim.x < n) dst[base + u * blockDim.x] = v[u];
    }
}

// TMA: lane 0 of each warp loads a chunk into shared memory with a bulk copy (mbarrier completion),
// then bulk-stores it to the peer; two stages per warp alternate. `chunk` is a multiple of 16 and
// at most kMaxChunk; `bytes` a multiple of `chunk`.
extern "C" __global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock)
probe_tma(const uint8_t* __restrict__ src, uint8_t* dst, long long bytes, int chunk) {
    __shared__ __align__(128) uint8_t buf[kWarpsPerBlock][kStages][kMaxChunk];
    __shared__ __align__(8) uint64_t bar[kWarpsPerBlock][kStages];
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    if (lane != 0) return;                       // one thread per warp drives the copy engine of TMA
    for (int s = 0; s < kStages; ++s)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&bar[warp][s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    const long long pieces = bytes / chunk;
    const long long gwarp = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + warp;
    const long long gwarps = static_cast<long long>(gridDim.x) * kWarpsPerBlock;
    unsigned int phase_bits = 0;                 // bit s: the parity stage s waits for next
    int stage = 0;
    for (long long p = gwarp; p < pieces; p += gwarps, stage ^= 1) {
        // the store that last read this stage must be done reading before the load overwrites it
        asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        const unsigned int b = smem_addr(&bar[warp][stage]);
        const unsigned int s = smem_addr(buf[warp][stage]);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(chunk) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(s), "l"(src + p * chunk), "r"(chunk), "r"(b) : "memory");
        unsigned int done = 0;
        while (!done) {
            asm volatile("{\n .reg .pred q;\n mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\n"
                         " selp.u32 %0, 1, 0, q;\n}" : "=r"(done) : "r"(b), "r"((phase_bits >> stage) & 1u) : "memory");
        }
        phase_bits ^= 1u << stage;
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                     ::"l"(dst + p * chunk), "r"(s), "r"(chunk) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");   // writes complete before the kernel ends
}
