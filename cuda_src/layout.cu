// get_dispatch_layout: from top-k routing to per-rank / per-node / per-expert token counts and the
// token-in-rank map. One launch, no host synchronisation, no memset.
//
// Data flow
//   topk_idx int64 [T, K]  --(one thread per token)-->  is_token_in_rank bool [T, R]
//                                                      + block-local counts in shared memory
//   block counts --(atomicAdd)--> workspace int32 [E + R + N + 1]  (last slot: blocks done)
//   last block to finish: workspace -> outputs, then zeroes the workspace for the next call.
//
// The workspace belongs to the Buffer, is zeroed once at allocation and is left zeroed by every
// launch, so calls on one stream may follow each other freely (calls on two streams at once must
// use two buffers).
//
// Expert ids outside [-1, num_experts) are counted nowhere (as if -1) and reported: each block that
// saw one notes one of them in shared memory, then its thread 0 writes {kBadValue, phase 24, the id
// clamped to int32, rank} into the caller's pinned error record (nullptr: no report). The host reads
// that record at the start of its next call and raises DeepEPInvalid; the check costs no host wait.
//
// Compile-time constants (-D): DEEPEP_NUM_RANKS (R), DEEPEP_RANKS_PER_NODE (R for one node).
#include "common/exception.cuh"
#include "common/params.cuh"
#include "common/utils.cuh"

#ifndef DEEPEP_NUM_RANKS
#error "DEEPEP_NUM_RANKS must be defined"
#endif
#ifndef DEEPEP_RANKS_PER_NODE
#define DEEPEP_RANKS_PER_NODE DEEPEP_NUM_RANKS
#endif

namespace {

constexpr int kNumRanks = DEEPEP_NUM_RANKS;
constexpr int kRanksPerNode = DEEPEP_RANKS_PER_NODE;
constexpr int kNumNodes = kNumRanks / kRanksPerNode;
constexpr int kThreads = 256;
static_assert(kNumRanks % kRanksPerNode == 0, "ranks must split evenly into nodes");

// Ranks of one token as a bit set when it fits one word; otherwise deduplicate by scanning the
// earlier top-k slots (K is small).
constexpr bool kMaskFits = kNumRanks <= 64;

constexpr int kPhaseBadExpertId = 24;   // names in deepep_cupy/kernel_errors.py

using deepep::ReadOnly;   // common/params.cuh

// A reported value fits the record's int32 field: clamp (the host says "or beyond" at the bounds).
DEEPEP_DEVICE int clamp_to_int32(long long v) {
    return static_cast<int>(v < -2147483648LL ? -2147483648LL : (v > 2147483647LL ? 2147483647LL : v));
}

}  // namespace

#include "layout_params.cuh"   // DispatchLayoutParams

extern "C" __global__ void __launch_bounds__(kThreads)
get_dispatch_layout(const DispatchLayoutParams p) {
    // the fields under the names the body uses: outputs as __restrict__ locals; topk_idx is read
    // through `row` (ReadOnly: the const __restrict__ parameter's ld.global.nc)
    const int num_tokens = static_cast<int>(p.num_tokens), num_topk = static_cast<int>(p.num_topk);
    const int num_experts = static_cast<int>(p.num_experts), rank = static_cast<int>(p.rank);
    int* __restrict__ num_tokens_per_rank = p.num_tokens_per_rank;
    int* __restrict__ num_tokens_per_rdma_rank = p.num_tokens_per_rdma_rank;
    int* __restrict__ num_tokens_per_expert = p.num_tokens_per_expert;
    bool* __restrict__ is_token_in_rank = p.is_token_in_rank;
    int* __restrict__ workspace = p.workspace;
    deepep::ErrorRecord* const err = p.err;
    extern __shared__ int smem_counts[];  // [E] experts, [R] ranks, [N] nodes
    int* s_expert = smem_counts;
    int* s_rank = s_expert + num_experts;
    int* s_node = s_rank + kNumRanks;
    __shared__ int s_bad;                 // this block saw an id outside [-1, E); s_bad_id: one of them
    __shared__ long long s_bad_id;
    const int num_counters = num_experts + kNumRanks + kNumNodes;
    for (int i = threadIdx.x; i < num_counters; i += kThreads) smem_counts[i] = 0;
    if (threadIdx.x == 0) s_bad = 0;
    __syncthreads();

    const int experts_per_rank = num_experts / kNumRanks;
    const int token = blockIdx.x * kThreads + threadIdx.x;
    if (token < num_tokens) {
        const ReadOnly<int64_t> row{p.topk_idx + static_cast<int64_t>(token) * num_topk};
        bool* in_rank = is_token_in_rank + static_cast<int64_t>(token) * kNumRanks;
        uint64_t rank_mask = 0;
        uint64_t node_mask = 0;
        if constexpr (!kMaskFits) {
            for (int r = 0; r < kNumRanks; ++r) in_rank[r] = false;
        }
        for (int k = 0; k < num_topk; ++k) {
            const int64_t e = row[k];
            if (e < 0 || e >= num_experts) {
                if (e != -1 && atomicCAS(&s_bad, 0, 1) == 0) s_bad_id = e;
                continue;
            }
            atomicAdd(&s_expert[e], 1);
            const int r = static_cast<int>(e) / experts_per_rank;
            if constexpr (kMaskFits) {
                rank_mask |= 1ull << r;
            } else {
                bool seen = false;
                for (int j = 0; j < k; ++j) {
                    const int64_t ej = row[j];
                    seen |= (ej >= 0 && ej < num_experts && static_cast<int>(ej) / experts_per_rank == r);
                }
                if (!seen) {
                    in_rank[r] = true;
                    atomicAdd(&s_rank[r], 1);
                    const int n = r / kRanksPerNode;
                    bool node_seen = false;
                    for (int j = 0; j < k; ++j) {
                        const int64_t ej = row[j];
                        node_seen |= (ej >= 0 && ej < num_experts &&
                                      static_cast<int>(ej) / experts_per_rank / kRanksPerNode == n);
                    }
                    if (kNumNodes > 1 && !node_seen) atomicAdd(&s_node[n], 1);
                }
            }
        }
        if constexpr (kMaskFits) {
#pragma unroll
            for (int r = 0; r < kNumRanks; ++r) {
                const bool hit = (rank_mask >> r) & 1ull;
                in_rank[r] = hit;
                if (hit) {
                    atomicAdd(&s_rank[r], 1);
                    node_mask |= 1ull << (r / kRanksPerNode);
                }
            }
            if constexpr (kNumNodes > 1) {
#pragma unroll
                for (int n = 0; n < kNumNodes; ++n)
                    if ((node_mask >> n) & 1ull) atomicAdd(&s_node[n], 1);
            }
        }
    }
    __syncthreads();
    // one write to host memory per block at most (each is a transaction over PCIe)
    if (threadIdx.x == 0 && s_bad && err != nullptr)
        deepep::record_error(err, deepep::kBadValue, kPhaseBadExpertId, clamp_to_int32(s_bad_id), rank);

    // fold this block's counts into the workspace
    for (int i = threadIdx.x; i < num_counters; i += kThreads) {
        const int c = smem_counts[i];
        if (c != 0) atomicAdd(&workspace[i], c);
    }
    __threadfence();
    __syncthreads();
    __shared__ bool s_is_last;
    if (threadIdx.x == 0) {
        const int done = atomicAdd(&workspace[num_counters], 1);
        s_is_last = (done == static_cast<int>(gridDim.x) - 1);
    }
    __syncthreads();
    if (!s_is_last) return;

    // last block: publish totals and leave the workspace zeroed for the next launch
    __threadfence();
    for (int i = threadIdx.x; i < num_counters; i += kThreads) {
        const int total = atomicExch(&workspace[i], 0);
        if (i < num_experts) {
            num_tokens_per_expert[i] = total;
        } else if (i < num_experts + kNumRanks) {
            num_tokens_per_rank[i - num_experts] = total;
        } else if (num_tokens_per_rdma_rank != nullptr) {
            num_tokens_per_rdma_rank[i - num_experts - kNumRanks] = total;
        }
    }
    if (threadIdx.x == 0) workspace[num_counters] = 0;
}
