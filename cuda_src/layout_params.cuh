// By-value parameter struct of layout.cu's get_dispatch_layout. Every field is 8 bytes wide and the
// host packs it as int64 words in declaration order (deepep_cupy/layout.py, LAYOUT_PARAMS);
// DEEPEP_PARAMS_CHECK and ReadOnly<T> come from common/params.cuh, which says why.

namespace {

struct DispatchLayoutParams {
    const int64_t* topk_idx;             // [T][K]
    int* num_tokens_per_rank;            // [R] out
    int* num_tokens_per_rdma_rank;       // [N] out, or null when kNumNodes == 1
    int* num_tokens_per_expert;          // [E] out
    bool* is_token_in_rank;              // [T][R] out
    int* workspace;                      // [E + R + N + 1], zero between launches
    deepep::ErrorRecord* err;            // pinned record of a bad expert id, or null (no report)
    long long num_tokens;
    long long num_topk;
    long long num_experts;
    long long rank;                      // reported with a bad id
};
DEEPEP_PARAMS_CHECK(DispatchLayoutParams, 11);

}  // namespace
