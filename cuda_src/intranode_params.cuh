// By-value parameter structs of intranode.cu's notify, staged dispatch and combine kernels.
// Included by intranode.cu after Layout (DirectDispatchParams lives in intranode_direct.cuh).
//
// Every field is 8 bytes wide and the host packs each struct as int64 words in declaration order
// (deepep_cupy/intranode.py, the ParamStruct of the same name); DEEPEP_PARAMS_CHECK and ReadOnly<T>
// come from common/params.cuh, which says why.

namespace {

// The fields every kernel of the team takes (peer_bases .. timeout_ns, rank) are listed in each
// struct: flat, so the host packs plain words.
struct NotifyParams {
    const bool* is_token_in_rank;        // [T][R]
    const int* num_tokens_per_rank;      // [R]
    const int* num_tokens_per_expert;    // [E]
    int* send_pos;                       // [T][R] out
    int* recv_info;                      // [2R + 1 + L] out
    int* host_info;                      // pinned host record, or null (the host does not wait)
    const uint64_t* peer_bases;
    const int* team_pes;
    const Layout* layout;
    const uint64_t* seq;
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long num_local_experts;
    long long expert_alignment;
    long long rank;
};
DEEPEP_PARAMS_CHECK(NotifyParams, 16);

struct StagedDispatchParams {
    const uint8_t* x;                    // [T][hidden_bytes]
    const uint8_t* x_scales;             // [T][scale_bytes] (FP8) or null
    const int64_t* topk_idx;             // [T][K] or null (cached dispatch)
    const float* topk_weights;           // [T][K] or null
    const int* send_pos;                 // [T][R]
    const int* recv_info;                // [R+1] receive offsets, [R] source token counts, ...
    uint8_t* recv_x;
    uint8_t* recv_x_scales;
    int64_t* recv_topk_idx;
    float* recv_topk_weights;
    int* recv_src_idx;
    const int* src_tags;                 // [T] the rows' source tags (internode stages) or null
    const uint64_t* peer_bases;
    const int* team_pes;
    const Layout* layout;
    const uint64_t* seq;
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long hidden_bytes;
    long long scale_bytes;
    long long num_topk;
    long long with_topk;                 // explicit flags: a rank without tokens has null inputs
    long long with_weights;              //   yet receives top-k data from its peers
    long long num_local_experts;
    long long row_bytes;
    long long slot_rows;
    long long num_worst_tokens;
    long long barrier_first;             // cached dispatch: pass the domain barrier first
    long long rank;
};
DEEPEP_PARAMS_CHECK(StagedDispatchParams, 30);

// Both combine kernels (BF16, F32).
struct CombineParams {
    const uint8_t* x;                    // [rows][hidden] this rank's received rows, combined back
    const float* topk_weights;           // [rows][K] or null
    const uint8_t* bias0;                // [T][hidden] or null
    const uint8_t* bias1;
    const int* send_pos;                 // [T][R] (the dispatch's)
    const int* recv_offsets;             // [R+1]
    uint8_t* combined_x;                 // [T][hidden] out
    float* combined_weights;             // [T][K] out, or null
    const uint64_t* peer_bases;
    const int* team_pes;
    const Layout* layout;
    const uint64_t* seq;
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long hidden;
    long long num_topk;
    long long with_weights;
    long long row_bytes;
    long long slot_rows;
    long long pull;                      // 1: peers read x in place (it is in this rank's arena)
    long long rank;
};
DEEPEP_PARAMS_CHECK(CombineParams, 22);

}  // namespace
