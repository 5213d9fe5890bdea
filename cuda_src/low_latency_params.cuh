// By-value parameter structs of low_latency.cu's kernels, one per kernel. Included by
// low_latency.cu after LLLayout.
//
// Every field is 8 bytes wide and the host packs each struct as int64 words in declaration order
// (deepep_cupy/low_latency.py, the ParamStruct of the same name); DEEPEP_PARAMS_CHECK and
// ReadOnly<T> come from common/params.cuh, which says why. The structs are flat and share field
// names: the kernel's buffers first (peer_regions last of them in the kernels that send), then
// region .. rank (every kernel, same order; shape_of reads the shape from them), then the send
// kernels' switches.
//
// A CUDA graph captures these by value, as it captured the positional scalars: what changes from
// one replay to the next (the sequence counters, the last-block counters, the error record) stays
// behind the pointers seq, done and err.

namespace {

struct LLDispatchSendParams {
    const unsigned short* x;             // [T][H] bf16
    const int64_t* topk_idx;             // [T][K]
    int* counts;                         // [E] entries per expert (the last block re-zeroes)
    int* topk_slots;                     // [T][K] out
    const uint64_t* peer_regions;        // [R] NVLink base of each peer's region, 0: NVSHMEM puts
    uint8_t* region;                     // this rank's low-latency region (symmetric)
    const LLLayout* layout;
    uint64_t* seq;                       // operations sent
    unsigned int* done;                  // last-block counter
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;                // LLShape: T, H, K, E, flags
    long long hidden;
    long long num_topk;
    long long num_experts;
    long long use_fp8;
    long long round_scale;
    long long use_ue8m0;
    long long rank;
    long long guard;                     // wait for peers to have received seq - 2 first
};
DEEPEP_PARAMS_CHECK(LLDispatchSendParams, 20);

struct LLDispatchRecvParams {
    uint8_t* recv_x;                     // [L][R*M][H] out (bf16, or fp8 bytes)
    uint8_t* recv_scales;                // [L][R*M][scales] out, or null (bf16)
    int* recv_count;                     // [L] out
    int* recv_src_info;                  // [L][R*M] out
    int* recv_src_k;                     // [L][R*M] out
    int* layout_begin;                   // [L][R] out
    int* layout_count;                   // [L][R] out
    int* combine_slot;                   // [R][M][K] out
    int* src_tokens;                     // [R] out
    uint8_t* region;
    const LLLayout* layout;
    uint64_t* seq;                       // operations received
    unsigned int* done;
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long hidden;
    long long num_topk;
    long long num_experts;
    long long use_fp8;
    long long round_scale;
    long long use_ue8m0;
    long long rank;
};
DEEPEP_PARAMS_CHECK(LLDispatchRecvParams, 23);

// The fused dispatch: the send's and the receive's fields.
struct LLDispatchParams {
    const unsigned short* x;
    const int64_t* topk_idx;
    int* counts;
    int* topk_slots;
    uint8_t* recv_x;
    uint8_t* recv_scales;
    int* recv_count;
    int* recv_src_info;
    int* recv_src_k;
    int* layout_begin;
    int* layout_count;
    int* combine_slot;
    int* src_tokens;
    const uint64_t* peer_regions;
    uint8_t* region;
    const LLLayout* layout;
    uint64_t* seq;                       // both counters {sent, received}
    unsigned int* done;                  // {send phase, receive phase}
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long hidden;
    long long num_topk;
    long long num_experts;
    long long use_fp8;
    long long round_scale;
    long long use_ue8m0;
    long long rank;
    long long guard;
};
DEEPEP_PARAMS_CHECK(LLDispatchParams, 29);

struct LLCombineSendParams {
    const unsigned short* x;             // [L][R*M][H] bf16 expert outputs
    const int* combine_slot;             // [R][M][K] (the dispatch's)
    const int* src_tokens;               // [R]
    const uint64_t* peer_regions;
    uint8_t* region;
    const LLLayout* layout;
    uint64_t* seq;                       // operations sent
    unsigned int* done;
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long hidden;
    long long num_topk;
    long long num_experts;
    long long use_fp8;
    long long round_scale;
    long long use_ue8m0;
    long long rank;
    long long guard;
    long long use_tma;                   // remote NVLink parts through the TMA stages
};
DEEPEP_PARAMS_CHECK(LLCombineSendParams, 20);

struct LLCombineRecvParams {
    const int64_t* topk_idx;             // [T][K]
    const float* topk_weights;           // [T][K]
    unsigned short* out;                 // [T][H] bf16 out
    const int* topk_slots;               // [T][K] (the dispatch's)
    uint8_t* region;
    const LLLayout* layout;
    uint64_t* seq;                       // operations received
    unsigned int* done;
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long hidden;
    long long num_topk;
    long long num_experts;
    long long use_fp8;
    long long round_scale;
    long long use_ue8m0;
    long long rank;
};
DEEPEP_PARAMS_CHECK(LLCombineRecvParams, 18);

// The fused combine: the send's and the receive's fields, and the role split.
struct LLCombineParams {
    const unsigned short* x;
    const int* combine_slot;
    const int* src_tokens;
    const int64_t* topk_idx;
    const float* topk_weights;
    unsigned short* out;
    const int* topk_slots;
    const uint64_t* peer_regions;
    uint8_t* region;
    const LLLayout* layout;
    uint64_t* seq;                       // both counters {sent, received}
    unsigned int* done;                  // {send phase, receive phase}
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long hidden;
    long long num_topk;
    long long num_experts;
    long long use_fp8;
    long long round_scale;
    long long use_ue8m0;
    long long rank;
    long long guard;
    long long use_tma;
    long long reduce_warps;              // warps of every block that reduce (0: every warp sends, then reduces)
};
DEEPEP_PARAMS_CHECK(LLCombineParams, 25);

}  // namespace
