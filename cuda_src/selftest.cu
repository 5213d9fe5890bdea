// Runtime self-test kernels: prove that symmetric memory, NVSHMEM puts with signals, and direct
// NVLink stores through nvshmem_ptr work between every pair of neighbouring PEs. Used by the demo
// (scripts/demo.py) and the GPU tests; small enough to read as a first example of a kernel that
// talks to peers.
//
// Ring exchange: PE p sends its `src` bytes to PE (p+1) % n, into that PE's `dst`, and raises that
// PE's signal word to `signal_value`; then waits (bounded) until its own signal word is raised by
// PE (p-1+n) % n.
#include "common/exception.cuh"
#include "common/nvshmem.cuh"
#include "common/utils.cuh"

namespace {
constexpr int kPhaseRingSignal = 1;   // names in deepep_cupy/kernel_errors.py
constexpr int kPhasePeerMapping = 2;
}

extern "C" __global__ void ring_put_signal(uint8_t* dst, const uint8_t* src, uint64_t num_bytes,
                                           uint64_t* signal, uint64_t signal_value,
                                           uint64_t timeout_ns, deepep::ErrorRecord* error) {
    const int me = nvshmem_my_pe();
    const int num_pes = nvshmem_n_pes();
    const int right = (me + 1) % num_pes;
    const int left = (me + num_pes - 1) % num_pes;
    if (threadIdx.x < 32) {
        // one warp moves the bytes and sets the right neighbour's signal after them
        nvshmemx_putmem_signal_nbi_warp(dst, src, num_bytes, signal, signal_value,
                                        NVSHMEM_SIGNAL_SET, right);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        nvshmem_quiet();
        deepep::wait_geq(signal, signal_value, timeout_ns, error, kPhaseRingSignal, left, me);
    }
}

// Every thread of the grid stores into the right neighbour's copy of `buf` through its NVLink
// mapping (nvshmem_ptr). Records {kBadValue, kPhasePeerMapping, peer, rank} when the peer has no
// load/store mapping (then only NVSHMEM puts can reach it).
extern "C" __global__ void peer_store(int* buf, int num_ints, deepep::ErrorRecord* error) {
    const int me = nvshmem_my_pe();
    const int right = (me + 1) % nvshmem_n_pes();
    int* remote = static_cast<int*>(nvshmem_ptr(buf, right));
    if (remote == nullptr) {
        if (blockIdx.x == 0 && threadIdx.x == 0) deepep::record_error(error, deepep::kBadValue, kPhasePeerMapping, right, me);
        return;
    }
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < num_ints; i += blockDim.x * gridDim.x)
        remote[i] = me * 1000003 + i;
}
