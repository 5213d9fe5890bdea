// Pre-launch value checks: is every int64 index inside [low, high)?
//
// One grid-stride pass. Warps that see bad values count them (and keep one example) in a small
// device scratch record; the last block to finish copies the result into a pinned host record
// (UVA: the host pointer is valid on the device), re-zeroes the scratch for the next launch, and
// publishes `done_seq` last. The host polls `done_seq` instead of synchronising the stream: a
// driver synchronisation wakes the host far later than the kernel ends. Only the last block
// touches host memory, because system-scope atomics over PCIe serialise (one per block cost
// ~0.6 us each in a first version).
#include "common/utils.cuh"

struct RangeScratch {  // device memory, zero between launches
    unsigned long long num_bad;
    unsigned long long example;
    unsigned int blocks_done;
};

struct RangeReport {  // pinned host memory, written once per launch by the last block
    unsigned long long num_bad;
    long long example;
    unsigned long long done_seq;
};

extern "C" __global__ void __launch_bounds__(256)
check_index_range(const int64_t* __restrict__ values, long long count, long long low,
                  long long high, RangeScratch* scratch, RangeReport* report,
                  unsigned long long seq) {
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    unsigned int bad = 0;
    long long example = 0;
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < count; i += stride) {
        const long long v = values[i];
        if (v < low || v >= high) {
            ++bad;
            example = v;
        }
    }
    const unsigned int lanes = __ballot_sync(0xffffffffu, bad != 0);
    if (lanes != 0) {
        const int leader = __ffs(lanes) - 1;
        const unsigned int warp_bad = __reduce_add_sync(0xffffffffu, bad);
        if (static_cast<int>(threadIdx.x % 32) == leader) {
            atomicAdd(&scratch->num_bad, static_cast<unsigned long long>(warp_bad));
            atomicExch(&scratch->example, static_cast<unsigned long long>(example));
        }
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    __threadfence();
    if (atomicAdd(&scratch->blocks_done, 1u) != gridDim.x - 1) return;
    // last block: every other block's findings are visible after this fence
    __threadfence();
    report->num_bad = atomicExch(&scratch->num_bad, 0ull);
    report->example = static_cast<long long>(atomicExch(&scratch->example, 0ull));
    scratch->blocks_done = 0;
    __threadfence_system();
    *reinterpret_cast<volatile unsigned long long*>(&report->done_seq) = seq;
}
