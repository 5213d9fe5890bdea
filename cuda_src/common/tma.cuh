// The SM's bulk-copy (TMA) unit for one-dimensional copies through shared memory: what the direct
// dispatch's producers (intranode_direct.cuh) and the copy probe (copy_probe.cu) use. A row goes
// global -> shared with load() (completion counted in bytes on an mbarrier), shared -> global with
// store() (completion tracked per bulk group: commit(), then wait_read<N>() before the buffer is reused
// and wait_done<N>() before the writes may be published). Sizes and addresses: multiples of 16 bytes.
#pragma once
#include "common/utils.cuh"

namespace deepep {
namespace tma {

DEEPEP_DEVICE unsigned int smem_u32(const void* p) { return static_cast<unsigned int>(__cvta_generic_to_shared(p)); }

// An mbarrier that completes a phase when one thread arrived and the bytes it expects landed.
DEEPEP_DEVICE void init_barrier(uint64_t* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)));
}
// After init_barrier: the initialised barriers visible to the rest of the cluster and to the async
// proxy (the bulk copies' complete_tx), as the CUDA programming guide's TMA example does.
DEEPEP_DEVICE void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Bulk-load `bytes` from global `src` into shared `dst`; `bar`'s current phase completes when they landed.
DEEPEP_DEVICE void load(void* dst, const void* src, int bytes, uint64_t* bar) {
    const unsigned int b = smem_u32(bar);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(b) : "memory");
}

// Spin until `bar` completed the phase of parity `parity` (0 for its first use, then alternating).
DEEPEP_DEVICE void wait_barrier(uint64_t* bar, unsigned int parity) {
    const unsigned int b = smem_u32(bar);
    for (unsigned int done = 0; !done;)
        asm volatile("{\n .reg .pred q;\n mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, q;\n}" : "=r"(done) : "r"(b), "r"(parity) : "memory");
}

// Bulk-store `bytes` from shared `src` to global `dst` (a peer's mapped memory too), in the open group.
DEEPEP_DEVICE void store(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_u32(src)), "r"(bytes)
                 : "memory");
}
DEEPEP_DEVICE void commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// At most N groups (the newest) may still be reading their shared memory.
template <int N>
DEEPEP_DEVICE void wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory"); }

// At most N groups (the newest) may still be writing; then the finished groups' writes are ordered
// before this thread's later (generic-proxy) operations, e.g. a release that publishes them.
template <int N>
DEEPEP_DEVICE void wait_done() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
}

}  // namespace tma
}  // namespace deepep
