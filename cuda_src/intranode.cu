// High-throughput dispatch and combine between the ranks of one NVLink domain.
//
// Every rank's symmetric buffer (the same layout on every rank, see deepep_cupy/intranode.py):
//   control   notify slots [R][kNotifyInts] int32  (rank s writes its counts for me into slot s)
//             notify flag  [R] uint64, barrier flag [R] uint64
//             dispatch chunk flags [R][max_chunks] uint64 + chunk ranges [R][max_chunks] int2
//             combine chunk flags  [R][max_chunks] uint64
//             direct dispatch: direct_info [R][8] int64 + direct_flags [R] uint64
//             combine: combine_info [2][R][4] int64 + combine_info_flags [R] uint64 + combine_done
//   staging   the intranode layout: ONE area [R-1 source slots][slot_rows][row_bytes], shared by the
//             staged dispatch and the combine (every operation starts with notify or a barrier);
//             the internode stages: a dispatch and a combine area (and a send area for puts)
//   arena     (intranode layout) the receive arena: direct dispatch outputs, caller-owned arrays
// Flags carry the operation's sequence number (the same on every rank, since collective calls come
// in the same order), so nothing is ever reset: a wait is "flag >= seq".
//
// dispatch = notify kernel (counts exchange, one block per peer) -> one of
//              intranode_dispatch_direct (intranode_direct.cuh, the default): receivers post where
//                their outputs are; every block loads each of its tokens' rows once and stores it
//                straight into every destination's output (or staging, for a receiver whose
//                arena was full); its kernel is queued before the host polls the receive count
//              intranode_dispatch (staged; the internode stages): remote rows into the peer's
//                staging slot, own rows straight into recv_x; then arrived chunks from staging
// combine  = combine kernel: every rank posts whether its x can be read in place (pull: x is in its
//            arena) or will be pushed into the sources' staging; pushers send; then every rank sums
//            its tokens' copies in rank order, reading pulled rows over NVLink and pushed rows from
//            its staging; a completion handshake keeps pulled x alive until every reader is done
//
// The sequence number is read from device memory (`seq_ptr`), advanced by intranode_bump_seq at
// the start of every operation, so CUDA-graph replays advance it too.
//
// The same kernels serve two transports (DEEPEP_INTRANODE_PUTS):
//   0: the team is one NVLink domain; `peer_bases[j]` is team member j's buffer mapped into this GPU,
//      and every remote write is a plain store through it.
//   1: the team may span nodes (the RDMA stage of the hierarchical internode path, see
//      deepep_cupy/internode.py); `peer_bases[j]` is this rank's own symmetric address of the region
//      and remote writes are NVSHMEM puts to PE `team_pes[j]`. Rows are first written into this
//      rank's own send staging (symmetric memory, which a NIC can read; laid out like the
//      destination's staging, one slot per peer), then a chunk's rows for one peer travel as one
//      contiguous put. Before a flag is raised the puts are completed (nvshmem_quiet), so a peer
//      that sees the flag sees the data.
// On the puts route only writes go to a peer and every read is of this rank's own memory, so the
// receive paths are the same for both routes. The stores route alone also reads peers: a pull-mode
// combine reads its peers' x rows in place over NVLink (and the direct dispatch reads where each
// receiver wants its rows, the direct_info entries the receivers wrote here).
//
// Compile-time constants: DEEPEP_NUM_RANKS (team size), DEEPEP_INTRANODE_PUTS (0 or 1).
#include "common/exception.cuh"
#include "common/params.cuh"
#include "common/tma.cuh"
#include "common/utils.cuh"
#ifndef DEEPEP_INTRANODE_PUTS
#define DEEPEP_INTRANODE_PUTS 0
#endif
#if DEEPEP_INTRANODE_PUTS
#include "common/nvshmem.cuh"
#endif

#ifndef DEEPEP_NUM_RANKS
#error "DEEPEP_NUM_RANKS must be defined"
#endif

namespace {

constexpr int kNumRanks = DEEPEP_NUM_RANKS;
constexpr int kChunk = 32;          // tokens (dispatch) or rows (combine) per published chunk
constexpr int kWarpSize = 32;

// phase ids (names in deepep_cupy/kernel_errors.py)
constexpr int kPhaseNotify = 10;
constexpr int kPhaseDispatchRecv = 11;
constexpr int kPhaseCombineBarrier = 12;
constexpr int kPhaseCombineRecv = 13;
constexpr int kPhaseDispatchBarrier = 14;
constexpr int kPhaseWorstOverflow = 15;
constexpr int kPhaseDirectInfo = 16;
constexpr int kPhaseCombineDone = 17;
constexpr int kPhaseDirectSend = 18;

template <bool B, typename T, typename F>
struct pick { using type = T; };
template <typename T, typename F>
struct pick<false, T, F> { using type = F; };

// Every rank's symmetric buffer as this GPU sees it (NVLink mappings): a device array of R
// pointers (a by-value struct would be copied to local memory when indexed by a runtime rank).
struct PeerBases {
    uint8_t* const* base;
};

struct Layout {
    long long notify_slots;      // int32 [R][notify_ints]
    long long notify_flags;      // uint64 [R]
    long long barrier_flags;     // uint64 [R]
    long long dispatch_flags;    // uint64 [R][max_chunks]
    long long dispatch_ranges;   // int2 [R][max_chunks]
    long long combine_flags;     // uint64 [R][max_chunks]
    long long dispatch_staging;  // [R-1][slot_rows][dispatch_row_bytes]
    long long combine_staging;   // [R-1][slot_rows][combine_row_bytes]
    long long send_staging;      // puts only: [R-1 destination slots][slot_rows][row_bytes], this rank's rows
    long long direct_info;       // int64 [R receivers][8]: where receiver j wants this rank's rows (direct dispatch)
    long long direct_flags;      // uint64 [R]: [j] = last seq in which receiver j posted its direct_info entry
    long long combine_info;      // int64 [2 parities][R][4]: [seq & 1][j] = {mode, x offset, weights offset, seq} of peer j's combine
    long long combine_info_flags;  // uint64 [R]: [j] = last seq in which peer j posted its combine_info entry
    long long combine_done;      // uint64 done [R], uint64 ack [R] (seq from each peer), uint32 block counters [2]
    int notify_ints;
    int max_chunks;
};

template <typename T>
DEEPEP_DEVICE T* at(uint8_t* base, long long offset) {
    return reinterpret_cast<T*>(base + offset);
}

DEEPEP_DEVICE void st_release_sys_u64(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// slot of source `src` in the staging area of rank `dst` (no slot for a rank's own rows)
DEEPEP_DEVICE int slot_of(int src, int dst) { return src < dst ? src : src - 1; }

using deepep::ReadOnly;   // common/params.cuh

// 16-byte load; kPeerWritten reads memory another GPU wrote during this kernel, so it bypasses L1
// (ld.global.cg), which is not coherent with remote writes; otherwise the source is a kernel
// input nothing writes during the kernel (ld.global.nc, see ReadOnly).
template <bool kPeerWritten>
DEEPEP_DEVICE int4 load16(const int4* p) {
    if constexpr (kPeerWritten) return __ldcg(p);
    else return __ldg(p);
}

// Copy `bytes` (a multiple of 16) from src to dst with the lanes of one warp, 16 bytes per lane
// per step, kept flowing: two batches of kUnroll steps alternate, the loads of batch i+1 are issued
// before the stores of batch i (restrict lets them pass), and the last batch is guarded rather than
// a serial tail. 8 steps (4 KiB per warp) stay in flight, the registers the old single batch took;
// a 14 KiB row costs about 4 memory latencies instead of 7 (3 batches + a 4-step serial tail).
template <bool kPeerWritten = false>
DEEPEP_DEVICE void warp_copy(void* __restrict__ dst, const void* __restrict__ src, int bytes, int lane) {
    const int4* __restrict__ s = static_cast<const int4*>(src);
    int4* __restrict__ d = static_cast<int4*>(dst);
    const int n = bytes >> 4;
    constexpr int kUnroll = 4;
    constexpr int kBatch = kUnroll * kWarpSize;
    int4 a[kUnroll], b[kUnroll];
    // a step past the end loads zeros: a register written only on some paths would stay live
    // through the whole kernel (ptxas cannot pair the guards), costing the callers registers
    auto load = [&](int4 (&v)[kUnroll], int i0) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            v[u] = i0 + u * kWarpSize < n ? load16<kPeerWritten>(s + i0 + u * kWarpSize) : make_int4(0, 0, 0, 0);
    };
    auto store = [&](const int4 (&v)[kUnroll], int i0) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i0 + u * kWarpSize < n) d[i0 + u * kWarpSize] = v[u];
    };
    load(a, lane);
    for (int base = lane; base < n; base += 2 * kBatch) {
        load(b, base + kBatch);
        store(a, base);
        load(a, base + 2 * kBatch);
        store(b, base + kBatch);
    }
}

// FP8 scales: H/128 floats, not always a multiple of 16 bytes: 4 bytes per lane. Sources as load16.
template <bool kPeerWritten = false>
DEEPEP_DEVICE void warp_copy_words(void* dst, const void* src, int bytes, int lane) {
    const int* s = reinterpret_cast<const int*>(src);
    int* d = reinterpret_cast<int*>(dst);
    for (int i = lane; i < (bytes >> 2); i += kWarpSize) d[i] = kPeerWritten ? __ldcg(s + i) : __ldg(s + i);
}

DEEPEP_DEVICE bool wait_flag(const uint64_t* flag, uint64_t seq, uint64_t timeout_ns,
                             deepep::ErrorRecord* err, int phase, int peer, int rank) {
    return deepep::wait_geq(flag, seq, timeout_ns, err, phase, peer, rank);
}

// ---- transport: how a write reaches team member j ----------------------------------------------
// `dst` is always computed from peers.base[j]: a mapped peer address (stores) or this rank's own
// symmetric address of the same object (puts, which name the PE). Rows go through
// `row_slot` + `send_rows` below.
#if DEEPEP_INTRANODE_PUTS
constexpr bool kPuts = true;
// NVSHMEM calls stay out of line: inlined, they cost the hot loops registers.
__device__ __noinline__ void put_warp(void* dst, const void* src, int bytes, int pe) {
    nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
}
__device__ __noinline__ void put_i32(int* dst, int v, int pe) { nvshmem_int_p(dst, v, pe); }
__device__ __noinline__ void put_flag_after_quiet(uint64_t* flag, uint64_t v, int pe) {
    nvshmem_quiet();   // every put this PE issued (other warps' too, after the caller's barrier) lands first
    nvshmemx_signal_op(flag, v, NVSHMEM_SIGNAL_SET, pe);
}
#else
constexpr bool kPuts = false;
#endif

struct Team {
    const int* pes;   // global PE of each team member (puts only)
};

// The team fields every parameter struct of this file ends with (intranode.py _TEAM_FIELDS), as the
// kernels use them; a kernel takes them with
//     const auto [rank, timeout_ns, err, peers, team, layout, seq] = TeamArgs::of(p);
struct TeamArgs {
    int rank;
    uint64_t timeout_ns;
    deepep::ErrorRecord* err;
    PeerBases peers;
    Team team;
    Layout layout;
    uint64_t seq;   // this operation's, read once at kernel start

    template <typename Params>
    DEEPEP_DEVICE static TeamArgs of(const Params& p) {
        return {static_cast<int>(p.rank), p.timeout_ns, p.err, PeerBases{reinterpret_cast<uint8_t* const*>(p.peer_bases)},
                Team{p.team_pes}, *p.layout, *reinterpret_cast<const volatile uint64_t*>(p.seq)};
    }
};

DEEPEP_DEVICE void remote_store_i32(const Team& team, int j, int* dst, int v) {
#if DEEPEP_INTRANODE_PUTS
    put_i32(dst, v, team.pes[j]);
#else
    *dst = v;
#endif
}
// raise member j's flag once every write this block made before it (after a __syncthreads) is visible
DEEPEP_DEVICE void remote_release_flag(const Team& team, int j, uint64_t* flag, uint64_t v) {
#if DEEPEP_INTRANODE_PUTS
    put_flag_after_quiet(flag, v, team.pes[j]);
#else
    __threadfence_system();
    st_release_sys_u64(flag, v);
#endif
}

// Where the rows for member j's staging area `area` (slot of `me` there) are written: straight into
// j's staging (stores), or into this rank's send staging, slot of j (puts; send_rows moves them).
DEEPEP_DEVICE uint8_t* row_slot(const PeerBases& peers, const Layout& layout, long long area, int me, int j,
                                int slot_rows, int row_bytes) {
    if constexpr (kPuts)
        return at<uint8_t>(peers.base[me], layout.send_staging) +
               static_cast<long long>(slot_of(j, me)) * slot_rows * row_bytes;
    return at<uint8_t>(peers.base[j], area) + static_cast<long long>(slot_of(me, j)) * slot_rows * row_bytes;
}

// puts only: one warp moves rows [first, first + count) of member j's send slot into j's staging
// area `area` (after the block's __syncthreads). Lanes fence first: the rows were written by other
// warps, and a NIC reads them from memory.
DEEPEP_DEVICE void send_rows(const Team& team, const PeerBases& peers, const Layout& layout, long long area,
                             int me, int j, int slot_rows, int row_bytes, int first, int count) {
#if DEEPEP_INTRANODE_PUTS
    if (count <= 0) return;
    __threadfence_system();
    __syncwarp();
    const long long rows_before = static_cast<long long>(first) * row_bytes;
    const uint8_t* src = row_slot(peers, layout, area, me, j, slot_rows, row_bytes) + rows_before;   // send slot
    uint8_t* dst = at<uint8_t>(peers.base[j], area) + static_cast<long long>(slot_of(me, j)) * slot_rows * row_bytes +
                   rows_before;
    put_warp(dst, src, count * row_bytes, team.pes[j]);
    __syncwarp();
#endif
}

}  // namespace

#include "intranode_params.cuh"   // NotifyParams, StagedDispatchParams, CombineParams

// ---- the receive-layout exchange, shared by notify and the fused direct dispatch -------------------
// Word i of the notify slot a rank posts to rank s: [0] its rows to s, [1] its token count,
// [2 + l] its tokens for s's local expert l. (`PerRank` / `PerExpert`: pointers or ReadOnly.)
template <typename PerRank, typename PerExpert>
DEEPEP_DEVICE int notify_slot_word(const PerRank& num_tokens_per_rank, const PerExpert& num_tokens_per_expert,
                                   int num_tokens, int num_local_experts, int s, int i) {
    if (i == 0) return num_tokens_per_rank[s];
    if (i == 1) return num_tokens;
    return num_tokens_per_expert[s * num_local_experts + (i - 2)];
}

// Rows this rank receives for local expert l, summed over every source's slot, aligned up.
DEEPEP_DEVICE int aligned_expert_total(const volatile int* slots, int notify_ints, int l, int expert_alignment) {
    int total = 0;
    for (int s = 0; s < kNumRanks; ++s) total += slots[s * notify_ints + 2 + l];
    return (total + expert_alignment - 1) / expert_alignment * expert_alignment;
}

// The seq word of the pinned host record: an int64 at a fixed position after the largest receive
// layout (2R + 1 + L words with L = notify_ints - 2), written last; the host polls it
// (intranode.py, IntranodeKernels._seq_word_index).
DEEPEP_DEVICE volatile long long* host_seq_word(int* host_info, const Layout& layout) {
    return reinterpret_cast<volatile long long*>(host_info + ((2 * kNumRanks + 1 + (layout.notify_ints - 2) + 1) & ~1));
}

// ------------------------------------------------------------------------------------------------
// Every operation starts with this one-thread launch: the operation's sequence number lives in
// device memory, so a captured CUDA graph advances it on every replay.
extern "C" __global__ void intranode_bump_seq(uint64_t* seq) { *seq += 1; }

// ------------------------------------------------------------------------------------------------
// notify: block j (< R) scans column j of is_token_in_rank into send_pos[:, j] and writes
// {tokens for j, this rank's token count, per-expert counts for j} into rank j's notify slot `me`
// (j == me included: the gather reads every slot), then raises rank j's notify flag. Block 0 then waits for every peer's flag and
// derives this rank's receive layout: recv_offsets[R + 1] (rows from rank s start at
// recv_offsets[s]), the per-local-expert counts (aligned up), and the source token counts; it
// writes them to `recv_info` (device) and to the pinned host record `host_info` (last word: seq).
//
// recv_info / host_info int32 layout: [0..R] offsets, [R+1..2R] source token counts,
// [2R+1..2R+L] aligned per-expert counts; host only: the seq as int64 at a fixed position after
// the largest layout (L = notify_ints - 2), so a call with fewer experts than the last one cannot
// find the last call's counts where it polls for its seq.
extern "C" __global__ void __launch_bounds__(1024, 1)
intranode_notify(const NotifyParams p) {
    // the fields under the names the body uses: inputs as ReadOnly (the const __restrict__
    // parameters' ld.global.nc), outputs as __restrict__ locals
    const ReadOnly<bool> is_token_in_rank{p.is_token_in_rank};
    const ReadOnly<int> num_tokens_per_rank{p.num_tokens_per_rank};
    const ReadOnly<int> num_tokens_per_expert{p.num_tokens_per_expert};
    int* __restrict__ send_pos = p.send_pos;
    int* __restrict__ recv_info = p.recv_info;
    int* __restrict__ host_info = p.host_info;
    const int num_tokens = static_cast<int>(p.num_tokens);
    const int num_local_experts = static_cast<int>(p.num_local_experts);
    const int expert_alignment = static_cast<int>(p.expert_alignment);
    const auto [rank, timeout_ns, err, peers, team, layout, seq] = TeamArgs::of(p);
    const int j = blockIdx.x;
    __shared__ int warp_sums[32];
    __shared__ int carry;

    // exclusive scan of column j: send_pos[t, j] = rows before t that go to j (-1 if t does not)
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    for (int base = 0; base < num_tokens; base += blockDim.x) {
        const int t = base + threadIdx.x;
        const int flag = (t < num_tokens && is_token_in_rank[static_cast<long long>(t) * kNumRanks + j]) ? 1 : 0;
        int incl = flag;
#pragma unroll
        for (int o = 1; o < kWarpSize; o <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
        if (lane == kWarpSize - 1) warp_sums[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            int w = lane < num_warps ? warp_sums[lane] : 0;
#pragma unroll
            for (int o = 1; o < kWarpSize; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= o) w += v;
            }
            if (lane < num_warps) warp_sums[lane] = w;  // inclusive over warps
        }
        __syncthreads();
        const int before = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + incl - flag;
        if (t < num_tokens) send_pos[static_cast<long long>(t) * kNumRanks + j] = flag ? before : -1;
        __syncthreads();
        if (threadIdx.x == 0) carry += warp_sums[num_warps - 1];
        __syncthreads();
    }

    // post my counts for j into j's slot `rank`
    // two slot sets by seq parity: a peer can be at most one notify ahead of me
    const long long parity = static_cast<long long>(seq & 1) * kNumRanks * layout.notify_ints;
    int* slot = at<int>(peers.base[j], layout.notify_slots) + parity + rank * layout.notify_ints;
    for (int i = threadIdx.x; i < 2 + num_local_experts; i += blockDim.x) {
        const int v = notify_slot_word(num_tokens_per_rank, num_tokens_per_expert, num_tokens, num_local_experts, j, i);
        remote_store_i32(team, j, slot + i, v);
    }
    __syncthreads();
    if (threadIdx.x == 0) remote_release_flag(team, j, at<uint64_t>(peers.base[j], layout.notify_flags) + rank, seq);
    if (j != 0) return;

    // block 0: gather everyone's counts for me
    __shared__ bool ok;
    if (threadIdx.x == 0) {
        ok = true;
        uint8_t* mine = peers.base[rank];
        for (int s = 0; s < kNumRanks && ok; ++s)
            ok = wait_flag(at<uint64_t>(mine, layout.notify_flags) + s, seq, timeout_ns, err,
                           kPhaseNotify, s, rank);
    }
    __syncthreads();
    const volatile int* slots = at<int>(peers.base[rank], layout.notify_slots) + parity;
    const int num_info = 2 * kNumRanks + 1 + num_local_experts;
    volatile long long* host_seq = host_seq_word(host_info, layout);
    if (!ok) {  // timed out: an empty receive layout, so the data kernel moves nothing
        for (int i = threadIdx.x; i < num_info; i += blockDim.x) recv_info[i] = 0;
        if (threadIdx.x == 0 && host_info != nullptr) {
            __threadfence_system();
            *host_seq = static_cast<long long>(seq);
        }
        return;
    }
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int s = 0; s < kNumRanks; ++s) {
            recv_info[s] = acc;
            acc += slots[s * layout.notify_ints + 0];
            recv_info[kNumRanks + 1 + s] = slots[s * layout.notify_ints + 1];
        }
        recv_info[kNumRanks] = acc;
    }
    for (int l = threadIdx.x; l < num_local_experts; l += blockDim.x)
        recv_info[2 * kNumRanks + 1 + l] = aligned_expert_total(slots, layout.notify_ints, l, expert_alignment);
    __syncthreads();
    if (host_info == nullptr) return;   // num_worst_tokens: the host does not wait
    for (int i = threadIdx.x; i < num_info; i += blockDim.x) host_info[i] = recv_info[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        *host_seq = static_cast<long long>(seq);
    }
}

// ------------------------------------------------------------------------------------------------
// barrier over the ranks of the domain (used by cached dispatch and combine before they write into
// peers' staging): raise my flag on every peer, wait for every peer's flag on me.
DEEPEP_DEVICE bool domain_barrier(const PeerBases& peers, const Team& team, const Layout& layout, int rank,
                                  uint64_t seq, uint64_t timeout_ns, deepep::ErrorRecord* err, int phase) {
    __shared__ bool ok;
    if (threadIdx.x < kNumRanks)
        remote_release_flag(team, threadIdx.x, at<uint64_t>(peers.base[threadIdx.x], layout.barrier_flags) + rank, seq);
    if (threadIdx.x == 0) {
        ok = true;
        for (int s = 0; s < kNumRanks && ok; ++s)
            ok = wait_flag(at<uint64_t>(peers.base[rank], layout.barrier_flags) + s, seq, timeout_ns,
                           err, phase, s, rank);
    }
    __syncthreads();
    return ok;
}

// ------------------------------------------------------------------------------------------------
// dispatch. Every block first sends, then receives. (A first version gave each block one role;
// the senders, with twice the bytes of the receivers, set the pace: 295 us cached at 24 SMs.)
//   send: token chunk c (kChunk tokens) belongs to block c % gridDim.x. A warp takes a token and
//     copies its row into the staging slot of every remote destination j with
//     is_token_in_rank[t, j], at row send_pos[t, j] (with scales, top-k ids as int32 and weights
//     behind the data); then thread j publishes the chunk's row range to j and raises j's chunk
//     flag; then the chunk's rows for this rank go straight into recv_x.
//   receive: remote source s's chunks are spread over all blocks; each waits for the chunk's flag
//     and copies its rows from staging into recv_x (+ scales, local top-k ids, weights).
// Row bytes: hidden_bytes (data) + scale_bytes + 4K (int32 ids) + 4K (weights) + 4 (source token
// index), padded to 16.
extern "C" __global__ void __launch_bounds__(512, 1)
intranode_dispatch(const StagedDispatchParams p) {
    // the fields under the names the body uses: inputs as ReadOnly (the const __restrict__
    // parameters' ld.global.nc), outputs as __restrict__ locals
    const ReadOnly<uint8_t> x{p.x};
    const ReadOnly<uint8_t> x_scales{p.x_scales};
    const ReadOnly<int64_t> topk_idx{p.topk_idx};
    const ReadOnly<float> topk_weights{p.topk_weights};
    const ReadOnly<int> send_pos{p.send_pos};
    uint8_t* __restrict__ recv_x = p.recv_x;
    uint8_t* __restrict__ recv_x_scales = p.recv_x_scales;
    int64_t* __restrict__ recv_topk_idx = p.recv_topk_idx;
    float* __restrict__ recv_topk_weights = p.recv_topk_weights;
    int* __restrict__ recv_src_idx = p.recv_src_idx;
    const ReadOnly<int> src_tags{p.src_tags};
    const int num_tokens = static_cast<int>(p.num_tokens);
    const int hidden_bytes = static_cast<int>(p.hidden_bytes), scale_bytes = static_cast<int>(p.scale_bytes);
    const int num_topk = static_cast<int>(p.num_topk);
    const int num_local_experts = static_cast<int>(p.num_local_experts);
    const int row_bytes = static_cast<int>(p.row_bytes), slot_rows = static_cast<int>(p.slot_rows);
    const int num_worst_tokens = static_cast<int>(p.num_worst_tokens);
    const auto [rank, timeout_ns, err, peers, team, layout, seq] = TeamArgs::of(p);
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    // explicit flags: an empty array's pointer is NULL on a rank with no tokens, yet that rank
    // still receives top-k data from its peers
    const bool with_topk = p.with_topk != 0;
    const bool with_weights = p.with_weights != 0;
    const ReadOnly<int> recv_offsets{p.recv_info};
    const ReadOnly<int> src_tokens{p.recv_info + kNumRanks + 1};
    const int expert_lo = rank * num_local_experts;

    if (p.barrier_first && !domain_barrier(peers, team, layout, rank, seq, timeout_ns, err, kPhaseDispatchBarrier))
        return;

    // 1. send: every block takes token chunks c = blockIdx.x, + gridDim.x, ...; remote rows first,
    //    then the chunk is published to every peer, then the rows for this rank itself
    {
        const int num_chunks = (num_tokens + kChunk - 1) / kChunk;
        for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
            const int t_end = min(num_tokens, (c + 1) * kChunk);
            for (int t = c * kChunk + warp; t < t_end; t += num_warps) {
                const uint8_t* row = x + static_cast<long long>(t) * hidden_bytes;
                for (int j = 0; j < kNumRanks; ++j) {
                    const int pos = send_pos[static_cast<long long>(t) * kNumRanks + j];
                    if (pos < 0 || j == rank) continue;
                    uint8_t* dst = row_slot(peers, layout, layout.dispatch_staging, rank, j, slot_rows, row_bytes) +
                                   static_cast<long long>(pos) * row_bytes;
                    warp_copy(dst, row, hidden_bytes, lane);
                    if (scale_bytes)
                        warp_copy_words(dst + hidden_bytes, x_scales + static_cast<long long>(t) * scale_bytes,
                                        scale_bytes, lane);
                    int* ids = reinterpret_cast<int*>(dst + hidden_bytes + scale_bytes);
                    if (with_topk && lane < num_topk) {
                        ids[lane] = static_cast<int>(topk_idx[static_cast<long long>(t) * num_topk + lane]);
                        if (with_weights)
                            reinterpret_cast<float*>(ids + num_topk)[lane] =
                                topk_weights[static_cast<long long>(t) * num_topk + lane];
                    }
                    // the row's tag: its source token index, or the caller's tag for it
                    if (lane == 0) ids[2 * num_topk] = src_tags ? src_tags[t] : t;
                }
            }
            __syncthreads();
            // publish the chunk to every peer j: stores, thread j; puts, warp j (which first moves
            // the chunk's rows for j in one put)
            const int publisher = kPuts ? warp : static_cast<int>(threadIdx.x);
            const int num_publishers = kPuts ? num_warps : static_cast<int>(blockDim.x);
            for (int j = publisher; j < kNumRanks; j += num_publishers) {
                if (j == rank) continue;
                // the chunk's rows for j: [first, first + count)
                int first = 0, count = 0;
                if (!kPuts || lane == 0) {
                    bool have = false;
                    for (int t = c * kChunk; t < t_end; ++t) {
                        const int p = send_pos[static_cast<long long>(t) * kNumRanks + j];
                        if (p >= 0) {
                            if (!have) first = p, have = true;
                            ++count;
                        }
                    }
                }
                if constexpr (kPuts) {
                    first = __shfl_sync(0xffffffffu, first, 0);
                    count = __shfl_sync(0xffffffffu, count, 0);
                    send_rows(team, peers, layout, layout.dispatch_staging, rank, j, slot_rows, row_bytes, first, count);
                }
                if (!kPuts || lane == 0) {
                    int* ranges = at<int>(peers.base[j], layout.dispatch_ranges) + 2 * (rank * layout.max_chunks + c);
                    if constexpr (!kPuts) __threadfence_system();   // the rows before the range
                    remote_store_i32(team, j, ranges, first);
                    remote_store_i32(team, j, ranges + 1, count);
                    remote_release_flag(team, j, at<uint64_t>(peers.base[j], layout.dispatch_flags) +
                                                     rank * layout.max_chunks + c, seq);
                }
                if constexpr (kPuts) __syncwarp();
            }
            for (int t = c * kChunk + warp; t < t_end; t += num_warps) {
                const int pos = send_pos[static_cast<long long>(t) * kNumRanks + rank];
                if (pos < 0) continue;
                const long long r = recv_offsets[rank] + pos;
                if (num_worst_tokens > 0 && r >= num_worst_tokens) {  // would overflow recv_x
                    if (lane == 0) deepep::record_error(err, deepep::kBadValue, kPhaseWorstOverflow, rank, rank);
                    continue;
                }
                warp_copy(recv_x + r * hidden_bytes, x + static_cast<long long>(t) * hidden_bytes, hidden_bytes, lane);
                if (scale_bytes)
                    warp_copy_words(recv_x_scales + r * scale_bytes, x_scales + static_cast<long long>(t) * scale_bytes,
                                    scale_bytes, lane);
                if (with_topk && lane < num_topk) {
                    const int64_t e = topk_idx[static_cast<long long>(t) * num_topk + lane];
                    const bool local = e >= expert_lo && e < expert_lo + num_local_experts;
                    recv_topk_idx[r * num_topk + lane] = local ? e - expert_lo : -1;
                    if (with_weights)
                        recv_topk_weights[r * num_topk + lane] =
                            local ? topk_weights[static_cast<long long>(t) * num_topk + lane] : 0.0f;
                }
                if (lane == 0) recv_src_idx[r] = src_tags ? src_tags[t] : t;
            }
        }
    }

    // 2. receive: remote chunks spread over all blocks; most have landed by now
    const int recv_block = blockIdx.x;
    const int num_receivers = gridDim.x;
    uint8_t* mine = peers.base[rank];
    __shared__ int s_range[2];
    __shared__ bool s_ok;
    for (int s = 0; s < kNumRanks; ++s) {
        if (s == rank) continue;
        const int num_chunks = (src_tokens[s] + kChunk - 1) / kChunk;
        const uint8_t* slot = at<uint8_t>(mine, layout.dispatch_staging) +
                              static_cast<long long>(slot_of(s, rank)) * slot_rows * row_bytes;
        for (int c = recv_block; c < num_chunks; c += num_receivers) {
            if (threadIdx.x == 0) {
                s_ok = wait_flag(at<uint64_t>(mine, layout.dispatch_flags) + s * layout.max_chunks + c, seq,
                                 timeout_ns, err, kPhaseDispatchRecv, s, rank);
                const int* ranges = at<int>(mine, layout.dispatch_ranges) + 2 * (s * layout.max_chunks + c);
                s_range[0] = reinterpret_cast<const volatile int*>(ranges)[0];
                s_range[1] = reinterpret_cast<const volatile int*>(ranges)[1];
            }
            __syncthreads();
            if (!s_ok) return;
            const int first = s_range[0], count = s_range[1];
            for (int i = warp; i < count; i += num_warps) {
                const int pos = first + i;
                const uint8_t* src = slot + static_cast<long long>(pos) * row_bytes;
                const long long r = recv_offsets[s] + pos;
                if (num_worst_tokens > 0 && r >= num_worst_tokens) {
                    if (lane == 0) deepep::record_error(err, deepep::kBadValue, kPhaseWorstOverflow, s, rank);
                    continue;
                }
                warp_copy<true>(recv_x + r * hidden_bytes, src, hidden_bytes, lane);
                if (scale_bytes) warp_copy_words<true>(recv_x_scales + r * scale_bytes, src + hidden_bytes, scale_bytes, lane);
                const int* ids = reinterpret_cast<const int*>(src + hidden_bytes + scale_bytes);
                if (lane == 0) recv_src_idx[r] = __ldcg(ids + 2 * num_topk);
                if (with_topk && lane < num_topk) {
                    const int e = __ldcg(ids + lane);
                    const bool local = e >= expert_lo && e < expert_lo + num_local_experts;
                    recv_topk_idx[r * num_topk + lane] = local ? e - expert_lo : -1;
                    if (with_weights)
                        recv_topk_weights[r * num_topk + lane] =
                            local ? __ldcg(reinterpret_cast<const float*>(ids + num_topk) + lane) : 0.0f;
                }
            }
            __syncthreads();
        }
    }
    // padding rows of a num_worst_tokens dispatch: top-k ids -1, weights 0, source -1
    if (num_worst_tokens > 0) {
        const int total = recv_offsets[kNumRanks];
        for (int r = total + recv_block * blockDim.x + threadIdx.x; r < num_worst_tokens;
             r += num_receivers * blockDim.x) {
            recv_src_idx[r] = -1;
            for (int k = 0; k < num_topk && with_topk; ++k) {
                recv_topk_idx[static_cast<long long>(r) * num_topk + k] = -1;
                if (with_weights) recv_topk_weights[static_cast<long long>(r) * num_topk + k] = 0.0f;
            }
        }
    }
}

#if !DEEPEP_INTRANODE_PUTS
#include "intranode_direct.cuh"   // one-copy dispatch into the receivers' arenas (NVLink stores only)
#endif

// ------------------------------------------------------------------------------------------------
// combine's pull/push exchange (NVLink stores route; see the combine section below)
enum CombineMode : int { kCombinePull = 1, kCombinePush = 2 };

// Where the reduce finds rank r's rows for this rank's tokens (shared memory, one per rank): read in
// place (this rank's own x, or a pull peer's x over NVLink): row p at x + p rows, its weights at
// w + p rows (null without); else (direct == 0) through this rank's staging.
struct CombinePeer {
    const uint8_t* x;
    const float* w;
    int direct;
};

// This rank's own entry (thread 0; the caller's next __syncthreads publishes it), and on the puts
// route every peer's: staging.
DEEPEP_DEVICE void combine_own_entry(CombinePeer* s_peer, const uint8_t* x, const float* topk_weights,
                                     const int* recv_offsets, int hidden_bytes, int num_topk, int with_weights_flag,
                                     int rank) {
    if (threadIdx.x != 0) return;
    for (int r = 0; r < kNumRanks; ++r) s_peer[r] = CombinePeer{nullptr, nullptr, 0};
    const long long row0 = recv_offsets[rank];
    s_peer[rank] = CombinePeer{x + row0 * hidden_bytes, with_weights_flag ? topk_weights + row0 * num_topk : nullptr, 1};
}

// Arrive at a per-kernel block counter (this rank's own memory); true in the block that arrives
// last, which resets the counter for the next kernel. The block's earlier reads and writes, peer
// memory included, are ordered before the arrival (fence.sys).
DEEPEP_DEVICE bool last_block_arrives(unsigned int* counter) {
    __shared__ bool s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        const unsigned int old = atomicAdd(counter, 1u);
        s_last = old == gridDim.x - 1;
        if (s_last) *counter = 0u;   // every block has arrived: nobody touches it again in this kernel
    }
    __syncthreads();
    return s_last;
}

// (Both routes compile these; only the stores route calls them.)
// Kernel start: post this rank's entry to every peer (block 0), then every block reads every peer's
// entry into `s_peer` (its wait is also the domain barrier), then arrives at the "ack" counter.
// Returns false (in every thread of the block) when a peer never posted.
DEEPEP_DEVICE bool combine_exchange_info(const uint8_t* x, const float* topk_weights, const int* recv_offsets,
                                         int hidden_bytes, int num_topk, int with_weights_flag, int pull,
                                         CombinePeer* s_peer, const PeerBases& peers, const Layout& layout,
                                         int rank, uint64_t seq, uint64_t timeout_ns, deepep::ErrorRecord* err) {
    __shared__ bool s_ok;
    uint8_t* mine = peers.base[rank];
    const long long parity = static_cast<long long>(seq & 1) * kNumRanks;
    if (blockIdx.x == 0 && threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank) {
        const int s = threadIdx.x;
        long long* e = at<long long>(peers.base[s], layout.combine_info) + (parity + rank) * 4;
        const long long row0 = recv_offsets[s];
        e[0] = pull ? kCombinePull : kCombinePush;
        e[1] = pull ? (x - mine) + row0 * hidden_bytes : -1;
        e[2] = pull && with_weights_flag ? (reinterpret_cast<const uint8_t*>(topk_weights) - mine) + row0 * num_topk * 4LL
                                         : -1;
        e[3] = static_cast<long long>(seq);
        __threadfence_system();
        st_release_sys_u64(at<uint64_t>(peers.base[s], layout.combine_info_flags) + rank, seq);
    }
    if (threadIdx.x == 0) s_ok = true;
    __syncthreads();
    if (threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank) {
        const int j = threadIdx.x;
        if (wait_flag(at<uint64_t>(mine, layout.combine_info_flags) + j, seq, timeout_ns, err, kPhaseCombineBarrier,
                      j, rank)) {
            const volatile long long* e = at<long long>(mine, layout.combine_info) + (parity + j) * 4;
            const bool direct = e[0] == kCombinePull;
            const long long x_off = e[1], w_off = e[2];
            s_peer[j] = CombinePeer{direct ? peers.base[j] + x_off : nullptr,
                                    direct && w_off >= 0 ? reinterpret_cast<const float*>(peers.base[j] + w_off) : nullptr,
                                    direct ? 1 : 0};
        } else {
            s_ok = false;
        }
    }
    // the ack: every block of this rank has read its entries (a timed-out block arrives too)
    if (last_block_arrives(at<unsigned int>(mine, layout.combine_done + 16LL * kNumRanks))) {
        if (threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank) {
            __threadfence_system();
            st_release_sys_u64(at<uint64_t>(peers.base[threadIdx.x], layout.combine_done) + kNumRanks + rank, seq);
        }
    }
    return s_ok;   // read after the counter's __syncthreads
}

// Kernel end (every block, after its reduce): arrive at the "done" counter; the last block tells
// every peer, then waits until no peer reads this rank's x any more (pull) or every peer has read
// this rank's entry (push).
DEEPEP_DEVICE void combine_finish(int pull, const PeerBases& peers, const Layout& layout, int rank, uint64_t seq,
                                  uint64_t timeout_ns, deepep::ErrorRecord* err) {
    uint8_t* mine = peers.base[rank];
    if (!last_block_arrives(at<unsigned int>(mine, layout.combine_done + 16LL * kNumRanks) + 1)) return;
    if (threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank) {
        const int j = threadIdx.x;
        __threadfence_system();
        st_release_sys_u64(at<uint64_t>(peers.base[j], layout.combine_done) + rank, seq);
        // after a recorded timeout (the peer is gone) no second wait: the call reports the first
        if (reinterpret_cast<const volatile int*>(err)[0] == deepep::kOk)
            wait_flag(at<uint64_t>(mine, layout.combine_done) + (pull ? 0 : kNumRanks) + j, seq, timeout_ns, err,
                      kPhaseCombineDone, j, rank);
    }
}

// ------------------------------------------------------------------------------------------------
// combine (bf16 or float32 rows; accumulation in float32 in rank order, as the reference).
//   every block first sends back: rows of remote source s (recv_offsets[s] .. recv_offsets[s+1])
//     go, in chunks of kChunk rows, to s's combine staging slot at their position
//     (row - recv_offsets[s]), weights behind the data; then s's chunk flag is raised.
//   then reduces, a warp per token: acc = bias0 + bias1 + sum over ranks r in order
//     with send_pos[t, r] >= 0 of (r == rank ? x[recv_offsets[rank] + send_pos[t, r]]
//     : staging[r][send_pos[t, r]]), after waiting for that row's chunk flag.
// Both phases are bound by the bytes each SM keeps in flight (one block of 16 warps per SM, at most
// 128 registers a thread), so both keep about 16 16-byte loads per lane outstanding.
//
// Pull mode (NVLink stores route only). A rank whose x (and weights) lie in its symmetric receive
// arena (a direct dispatch's outputs) lets its peers read its rows in place: it sends nothing, and
// a peer reduces from x's row over NVLink instead of its staging row (no flag wait). Modes are per
// rank and may mix within one operation (a rank that pushes sends to every peer as above).
//   start, block 0, thread s (s != rank): into s's combine_info[seq & 1][rank] {mode (1 pull,
//     2 push), region offset of x's row recv_offsets[s] (pull), of the weights' row (or -1), seq},
//     fence, release-store seq into s's combine_info_flags[rank]. Every block: thread j waits for
//     combine_info_flags[j] >= seq (phase 12) and reads entry [seq & 1][j] into shared memory. This
//     wait is also the barrier the domain barrier was: j posts from this kernel, so j's earlier
//     kernels (which used its staging) ended. The data of a pull peer was complete when it posted
//     (its x was written by work ordered before its kernel, fenced by its post).
//   end: two per-kernel block counters in this rank's control memory (combine_done): when every
//     block has read the entries ("ack") and when every block has reduced ("done"), the last block
//     release-stores seq into every peer's combine_done ack[rank] / done[rank]. The block that
//     finishes last then waits (phase 17): in pull mode for every peer's done (nobody reads this
//     rank's x any more, so the caller may free it and the arena reuse it), in push mode only for
//     every peer's ack (so that this rank's next entry cannot overwrite one a peer block has not
//     read yet: ranks whose routing has no rows between them never wait for each other otherwise).

// float to bf16, round to nearest even; a NaN keeps its top bits with the quiet bit set
DEEPEP_DEVICE unsigned short float_to_bf16_rn(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

// Two floats to packed bf16 (lo in the low half), round to nearest even, in one instruction. It
// equals float_to_bf16_rn on every value but NaN (subnormals and overflow to inf included); NaN
// gives the canonical 0x7fff, so callers redo NaN with float_to_bf16_rn to keep its bits.
DEEPEP_DEVICE uint32_t cvt_bf16x2_rn(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <typename T>
DEEPEP_DEVICE T* shfl_ptr(T* p, int src_lane) {
    return reinterpret_cast<T*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(p), src_lane));
}

constexpr int kCombineLoads = 16;   // 16-byte loads per lane in flight in both combine phases (64 registers)

// Send back: one warp copies rows A and B (B optional) of the same length, n16 16-byte pieces each.
// Both rows advance together in batches of kSteps pieces, two batches alternating (the loads of
// one are issued before the stores of the other), so kCombineLoads pieces per lane stay in flight:
// a warp's two rows of a chunk cost about 4-5 memory latencies.
// A load past the row's end yields zeros rather than leaving its registers unwritten: ptxas cannot
// see that the matching store is skipped too, so an unwritten register stays live from the
// kernel's start, and the kernel spills (here and in reduce_round).
DEEPEP_DEVICE void copy_row_pair(uint8_t* __restrict__ dst_a, const uint8_t* __restrict__ src_a,
                                 uint8_t* __restrict__ dst_b, const uint8_t* __restrict__ src_b, bool has_b,
                                 int n16, int lane) {
    constexpr int kSteps = kCombineLoads / 4;   // per row and batch
    constexpr int kBatch = kSteps * kWarpSize;
    const int4* __restrict__ sa = reinterpret_cast<const int4*>(src_a);
    const int4* __restrict__ sb = reinterpret_cast<const int4*>(src_b);
    int4* __restrict__ da = reinterpret_cast<int4*>(dst_a);
    int4* __restrict__ db = reinterpret_cast<int4*>(dst_b);
    const int nb = has_b ? n16 : 0;
    int4 p[2][kSteps], q[2][kSteps];   // p: even batches, q: odd batches; [0] row A, [1] row B
    auto load = [&](int4 (&v)[2][kSteps], int base) {
#pragma unroll
        for (int u = 0; u < kSteps; ++u) {
            const int i = base + u * kWarpSize;
            v[0][u] = i < n16 ? sa[i] : make_int4(0, 0, 0, 0);
            v[1][u] = i < nb ? sb[i] : make_int4(0, 0, 0, 0);
        }
    };
    auto store = [&](const int4 (&v)[2][kSteps], int base) {
#pragma unroll
        for (int u = 0; u < kSteps; ++u) {
            const int i = base + u * kWarpSize;
            if (i < n16) da[i] = v[0][u];
            if (i < nb) db[i] = v[1][u];
        }
    };
    load(p, lane);
    for (int base = lane; base < n16; base += 2 * kBatch) {
        load(q, base + kBatch);
        store(p, base);
        load(p, base + 2 * kBatch);
        store(q, base + kBatch);
    }
}

// Reduce one token from its N sources (bias0, bias1, then ranks ascending, whichever are present).
// Each round issues the loads of all N sources for kSteps pieces per lane (about kCombineLoads
// loads in flight), then adds them in source order; a piece's accumulator lives only between its
// adds and its store, so the loads get the registers.
template <int N>
constexpr int kReduceSteps = N <= 1 ? kCombineLoads : (kCombineLoads / N > 0 ? kCombineLoads / N : 1);

// One round: pieces lane + u * 32 (u < kSteps) from the round's start, of every source, into
// o + u * 32. Lane j < N holds the address of source j's round (`my_src`); each source's pointer is
// fetched from its lane here and dies once the round's loads are issued (N pointers held through
// the whole row would take the loads' registers). kGuard: the row's last round, where only the
// pieces u * 32 < left exist.
template <bool kBf16, int N, bool kGuard, typename Probe>
DEEPEP_DEVICE void reduce_round(unsigned long long my_src, int4* __restrict__ o, int lane, int left, bool do_probe,
                                Probe& probe) {
    constexpr int kPer = kBf16 ? 8 : 4;   // elements in 16 bytes
    constexpr int kSteps = kReduceSteps<N>;
    int4 v[N > 0 ? N : 1][kSteps];
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const int4* src = reinterpret_cast<const int4*>(__shfl_sync(0xffffffffu, my_src, j)) + lane;
#pragma unroll
        for (int u = 0; u < kSteps; ++u)
            if (!kGuard || u * kWarpSize < left) v[j][u] = __ldcg(src + u * kWarpSize);
            else v[j][u] = make_int4(0, 0, 0, 0);   // see copy_row_pair
    }
    if (do_probe) probe();
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
        float acc[kPer];
#pragma unroll
        for (int e = 0; e < kPer; ++e) acc[e] = 0.0f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const uint32_t* w = reinterpret_cast<const uint32_t*>(&v[j][u]);
#pragma unroll
            for (int e = 0; e < kPer; ++e) {
                float f;
                if constexpr (kBf16) f = __uint_as_float(e % 2 == 0 ? w[e / 2] << 16 : w[e / 2] & 0xffff0000u);
                else f = __uint_as_float(w[e]);
                acc[e] = __fadd_rn(acc[e], f);
            }
        }
        int4 r;
        uint32_t* rw = reinterpret_cast<uint32_t*>(&r);
        if constexpr (kBf16) {
            bool nan = false;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                rw[k] = cvt_bf16x2_rn(acc[2 * k], acc[2 * k + 1]);
                nan |= acc[2 * k] != acc[2 * k] || acc[2 * k + 1] != acc[2 * k + 1];
            }
            if (nan) {   // rare: one branch per piece
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    rw[k] = float_to_bf16_rn(acc[2 * k]) | (static_cast<uint32_t>(float_to_bf16_rn(acc[2 * k + 1])) << 16);
            }
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) rw[k] = __float_as_uint(acc[k]);
        }
        if (!kGuard || u * kWarpSize < left) o[u * kWarpSize] = r;
    }
}

// The whole row: lane j < N holds source j's row in `my_src`; n16 16-byte pieces a row, lane l
// takes pieces l, l + 32, ... `probe` runs once, after the second round's loads (the first round's
// if there is one), so that its own loads overlap them.
template <bool kBf16, int N, typename Probe>
DEEPEP_DEVICE void reduce_row(uint8_t* out, const uint8_t* my_src, int n16, int lane, Probe& probe) {
    constexpr int kRound = kReduceSteps<N> * kWarpSize;
    unsigned long long src = reinterpret_cast<unsigned long long>(my_src);   // an address: null past lane N
    int4* o = reinterpret_cast<int4*>(out) + lane;
    if (n16 <= 0) probe();
    const int probe_at = n16 > kRound ? 1 : 0;
    int base = 0, round = 0;
    for (; base + kRound <= n16; base += kRound, ++round) {   // full rounds: no guards
        reduce_round<kBf16, N, false>(src, o, lane, kRound, round == probe_at, probe);
        src += kRound * sizeof(int4);
        o += kRound;
    }
    if (base < n16) reduce_round<kBf16, N, true>(src, o, lane, n16 - base - lane, round == probe_at, probe);
}

// reduce_row for the runtime source count n (0 .. kNumRanks + 2): one instance per count.
template <bool kBf16, int N = 0, typename Probe>
DEEPEP_DEVICE void reduce_row_n(int n, uint8_t* out, const uint8_t* my_src, int n16, int lane, Probe& probe) {
    if constexpr (N < kNumRanks + 2) {
        if (n != N) {
            reduce_row_n<kBf16, N + 1>(n, out, my_src, n16, lane, probe);
            return;
        }
    }
    reduce_row<kBf16, N>(out, my_src, n16, lane, probe);
}

template <bool kBf16>
DEEPEP_DEVICE void combine_impl(const uint8_t* __restrict__ x, const float* __restrict__ topk_weights,
                                const uint8_t* __restrict__ bias0, const uint8_t* __restrict__ bias1,
                                const int* __restrict__ send_pos,
                                const int* __restrict__ recv_offsets, uint8_t* __restrict__ combined_x,
                                float* __restrict__ combined_weights, int num_tokens, int hidden,
                                int num_topk, int with_weights_flag, int row_bytes, int slot_rows, int pull,
                                const CombinePeer* __restrict__ peer_info, const PeerBases& peers, const Team& team,
                                const Layout& layout, int rank, uint64_t seq, uint64_t timeout_ns,
                                deepep::ErrorRecord* err) {
    constexpr int kElem = kBf16 ? 2 : 4;
    const int hidden_bytes = hidden * kElem;
    const int n16 = hidden_bytes >> 4;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const bool with_weights = with_weights_flag != 0;   // not the pointer: empty arrays are NULL

    // 1. send back: chunks of every remote source's row block, round-robin over all blocks (a rank
    //    in pull mode sends nothing: its peers read its x in place)
    if (!pull) {
        int chunk_id = 0;
        for (int s = 0; s < kNumRanks; ++s) {
            if (s == rank) continue;
            const int row0 = recv_offsets[s], rows = recv_offsets[s + 1] - recv_offsets[s];
            const int num_chunks = (rows + kChunk - 1) / kChunk;
            uint8_t* slot = row_slot(peers, layout, layout.combine_staging, rank, s, slot_rows, row_bytes);
            for (int c = 0; c < num_chunks; ++c, ++chunk_id) {
                if (chunk_id % static_cast<int>(gridDim.x) != static_cast<int>(blockIdx.x)) continue;
                const int p_end = min(rows, (c + 1) * kChunk);
                // rows p and p + num_warps together (with 16 warps: the warp's two rows of the chunk)
                for (int p = c * kChunk + warp; p < p_end; p += 2 * num_warps) {
                    const int p2 = p + num_warps;
                    const bool has2 = p2 < p_end;
                    const long long r = row0 + p, r2 = row0 + p2;
                    uint8_t* dst = slot + static_cast<long long>(p) * row_bytes;
                    uint8_t* dst2 = slot + static_cast<long long>(p2) * row_bytes;
                    const bool wlane = with_weights && lane < num_topk;
                    float w = 0.0f, w2 = 0.0f;   // loaded before the copy: no round trip after it
                    if (wlane) w = topk_weights[r * num_topk + lane];
                    if (wlane && has2) w2 = topk_weights[r2 * num_topk + lane];
                    copy_row_pair(dst, x + r * hidden_bytes, dst2, x + r2 * hidden_bytes, has2, n16, lane);
                    if (wlane) reinterpret_cast<float*>(dst + hidden_bytes)[lane] = w;
                    if (wlane && has2) reinterpret_cast<float*>(dst2 + hidden_bytes)[lane] = w2;
                }
                __syncthreads();
                if (warp == 0) {   // puts: the chunk's rows in one put first
                    send_rows(team, peers, layout, layout.combine_staging, rank, s, slot_rows, row_bytes,
                              c * kChunk, p_end - c * kChunk);
                    if (lane == 0)
                        remote_release_flag(team, s, at<uint64_t>(peers.base[s], layout.combine_flags) +
                                                         rank * layout.max_chunks + c, seq);
                }
            }
        }
    }

    // 2. reduce: a warp per token (warps over the grid, round-robin), lanes over the hidden dimension.
    //    Blocks are numbered backwards here: the blocks that got one chunk more to send (the first
    //    ones) get the fewer tokens.
    const int reducer = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
    const int token_stride = static_cast<int>(gridDim.x) * num_warps;
    uint8_t* mine = peers.base[rank];
    const uint64_t* flags = at<uint64_t>(mine, layout.combine_flags);
    const uint8_t* staging = at<uint8_t>(mine, layout.combine_staging);
    const int num_bias = (bias0 != nullptr) + (bias1 != nullptr);
    // lane r < kNumRanks follows rank r's copy of the token: its position, and its chunk flag
    auto flag_of = [&](int pos) { return flags + lane * layout.max_chunks + pos / kChunk; };
    auto pos_of = [&](int t) {
        return lane < kNumRanks && t < num_tokens ? send_pos[static_cast<long long>(t) * kNumRanks + lane] : -1;
    };
    // lane r's rank: rows read in place (own x, a pull peer's x) or from staging after a chunk flag.
    // The pointers stay in shared memory (volatile: re-read per token, not held in registers).
    const volatile CombinePeer* vpeer = peer_info;
    const bool direct_lane = lane < kNumRanks && vpeer[lane].direct != 0;
    const bool remote_lane = lane < kNumRanks && !direct_lane;   // waits for chunk flags
    int t = reducer * num_warps + warp;
    int pos = pos_of(t);
    bool ready = false;   // this lane's flag already seen >= seq (by the previous token's probe)
    for (; t < num_tokens; t += token_stride) {
        bool ok = true;
        if (remote_lane && pos >= 0 && !ready)   // the lanes of all ranks wait at once
            ok = wait_flag(flag_of(pos), seq, timeout_ns, err, kPhaseCombineRecv, lane, rank);
        if (!__all_sync(0xffffffffu, ok)) return;
        const bool present = lane < kNumRanks && pos >= 0;
        const unsigned mask = __ballot_sync(0xffffffffu, present);
        const uint8_t* row = nullptr;
        if (present)
            row = direct_lane ? vpeer[lane].x + static_cast<long long>(pos) * hidden_bytes
                              : staging + (static_cast<long long>(slot_of(lane, rank)) * slot_rows + pos) * row_bytes;
        // lane j gets the j-th source in the reference order: biases, then the present ranks
        const uint8_t* my_src = nullptr;
        if (lane < num_bias) my_src = (lane == 0 && bias0 != nullptr ? bias0 : bias1) + static_cast<long long>(t) * hidden_bytes;
#pragma unroll
        for (int r = 0; r < kNumRanks; ++r) {
            const uint8_t* p = shfl_ptr(row, r);
            if (((mask >> r) & 1u) && lane == num_bias + __popc(mask & ((1u << r) - 1u))) my_src = p;
        }
        const int n = num_bias + __popc(mask);
        const int pos_next = pos_of(t + token_stride);   // loaded now, used by mid_row
        bool ready_next = false;
        // Runs once inside the row, right after a round's loads were issued, so its own loads
        // overlap them instead of costing round trips of their own: it reads the next token's flags
        // (acquire: the next token's row loads come after it) and sums this token's weights.
        auto mid_row = [&]() {
            if (remote_lane && pos_next >= 0) ready_next = deepep::ld_acquire_sys(flag_of(pos_next)) >= seq;
            if (with_weights) {
                const float* wrow = !present ? nullptr
                                    : direct_lane ? (vpeer[lane].w == nullptr ? nullptr : vpeer[lane].w + static_cast<long long>(pos) * num_topk)
                                                  : reinterpret_cast<const float*>(row + hidden_bytes);
                float wv[kNumRanks];
#pragma unroll
                for (int r = 0; r < kNumRanks; ++r) {
                    const float* p = shfl_ptr(wrow, r);
                    wv[r] = ((mask >> r) & 1u) && lane < num_topk && p != nullptr ? __ldcg(p + lane) : 0.0f;
                }
                float w = 0.0f;
#pragma unroll
                for (int r = 0; r < kNumRanks; ++r)
                    if ((mask >> r) & 1u) w = __fadd_rn(w, wv[r]);
                if (lane < num_topk) combined_weights[static_cast<long long>(t) * num_topk + lane] = w;
            }
        };
        reduce_row_n<kBf16>(n, combined_x + static_cast<long long>(t) * hidden_bytes, my_src, n16, lane, mid_row);
        pos = pos_next;
        ready = ready_next;
    }
}

// The combine kernels' body: the fields under the names the entry points' parameters had (plain
// pointers, as those were: combine_impl's own __restrict__ parameters carry the aliasing facts, and
// its loads were never ld.global.nc), then the route's exchange and combine_impl.
template <bool kBf16>
DEEPEP_DEVICE void combine_entry(const CombineParams& p) {
    const uint8_t* x = p.x;
    const float* topk_weights = p.topk_weights;
    const uint8_t* bias0 = p.bias0;
    const uint8_t* bias1 = p.bias1;
    const int* send_pos = p.send_pos;
    const int* recv_offsets = p.recv_offsets;
    uint8_t* combined_x = p.combined_x;
    float* combined_weights = p.combined_weights;
    const int num_tokens = static_cast<int>(p.num_tokens), hidden = static_cast<int>(p.hidden);
    const int num_topk = static_cast<int>(p.num_topk), with_weights_flag = static_cast<int>(p.with_weights);
    const int row_bytes = static_cast<int>(p.row_bytes), slot_rows = static_cast<int>(p.slot_rows);
    const int pull = static_cast<int>(p.pull);
    const auto [rank, timeout_ns, err, peers, team, layout, seq] = TeamArgs::of(p);
    __shared__ CombinePeer s_peer[kNumRanks];
    const int hidden_bytes = hidden * (kBf16 ? 2 : 4);
    combine_own_entry(s_peer, x, topk_weights, recv_offsets, hidden_bytes, num_topk, with_weights_flag, rank);
    if constexpr (kPuts) {
        if (!domain_barrier(peers, team, layout, rank, seq, timeout_ns, err, kPhaseCombineBarrier)) return;
        combine_impl<kBf16>(x, topk_weights, bias0, bias1, send_pos, recv_offsets, combined_x, combined_weights,
                            num_tokens, hidden, num_topk, with_weights_flag, row_bytes, slot_rows, 0, s_peer, peers,
                            team, layout, rank, seq, timeout_ns, err);
    } else {
        const bool ok = combine_exchange_info(x, topk_weights, recv_offsets, hidden_bytes, num_topk, with_weights_flag,
                                              pull, s_peer, peers, layout, rank, seq, timeout_ns, err);
        if (ok)
            combine_impl<kBf16>(x, topk_weights, bias0, bias1, send_pos, recv_offsets, combined_x, combined_weights,
                                num_tokens, hidden, num_topk, with_weights_flag, row_bytes, slot_rows, pull, s_peer,
                                peers, team, layout, rank, seq, timeout_ns, err);
        combine_finish(pull, peers, layout, rank, seq, timeout_ns, err);
    }
}

// extern "C" entry points cannot be templates: one per element type
#define DEEPEP_COMBINE_ENTRY(NAME, BF16) \
    extern "C" __global__ void __launch_bounds__(512, 1) NAME(const CombineParams p) { combine_entry<BF16>(p); }

DEEPEP_COMBINE_ENTRY(intranode_combine_bf16, true)
DEEPEP_COMBINE_ENTRY(intranode_combine_f32, false)
