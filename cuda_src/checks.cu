// Pre-launch value checks: is every int64 index inside [low, high)?
//
// One grid-stride pass; a warp that sees a bad value bumps a counter and stores one offending
// value into a small pinned host record (UVA: the host pointer is valid on the device). Every block
// then bumps `blocks_done` after a system fence, so the host learns that the check finished by
// polling that word instead of a driver synchronisation (whose wake-up costs far more than the
// kernel). The host zeroes the record before each launch and raises DeepEPInvalid naming the
// argument when num_bad != 0.
#include "common/utils.cuh"

struct RangeReport {
    unsigned long long num_bad;
    long long example;
    unsigned long long blocks_done;
};

extern "C" __global__ void __launch_bounds__(256)
check_index_range(const int64_t* __restrict__ values, long long count, long long low,
                  long long high, RangeReport* report) {
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
            atomicAdd_system(&report->num_bad, static_cast<unsigned long long>(warp_bad));
            atomicExch_system(reinterpret_cast<unsigned long long*>(&report->example),
                              static_cast<unsigned long long>(example));
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();  // this block's findings are visible before it counts as done
        atomicAdd_system(&report->blocks_done, 1ull);
    }
}
