// One-copy ("direct") intranode dispatch. Included by intranode.cu (NVLink stores route only), whose
// helpers (Layout, PeerBases, at, slot_of, wait_flag, st_release_sys_u64) it uses.
//
// The staged dispatch (intranode_dispatch) moves a remote row twice: the sender copies x into the
// receiver's staging slot, the receiver copies staging into recv_x. Here each receiver tells every
// sender where its outputs are, and the sender writes each row once, straight into its final place:
//
//   receiver j, block 0, at kernel start: for every source s, writes into s's direct_info[j]
//       {mode, offsets (in j's symmetric region) of the first row from s in recv_x / scales /
//        top-k ids / weights / source index, row limit} and release-stores seq into s's
//        direct_flags[j]. mode 1 (direct): j's outputs live in its symmetric arena (the host took
//        them from deepep_cupy/arena.py). mode 2 (staged): they are ordinary memory, so rows for j
//        go through j's staging slot as in intranode_dispatch, and j copies them out.
//   every block, before its first chunk: waits for every peer's direct_flags entry (phase 16) and
//       reads the entries into shared memory. This wait is also the barrier that keeps a sender out
//       of a receiver whose previous kernels still run (the receiver posts it from this kernel).
//   send: token chunk c belongs to block c % gridDim.x; a warp takes a token, loads its row once
//       (16 bytes per lane, kCopyUnroll loads in flight) and stores it to every destination: own
//       outputs, direct peers' outputs, staged peers' staging rows. Then the chunk is published
//       to every peer: its row range (staged peers read it) and the chunk flag, after a fence.
//   receive: direct mode, wait until every chunk flag of every source is up (thread-parallel,
//       phase 11); staged mode, copy chunks out of staging as intranode_dispatch does.
//
// Why a receiver cannot overwrite an entry a sender still needs: receiver j posts the entries of
// operation n+1 from its kernel n+1, which starts after its kernel n ended, which waited for every
// chunk of every source; a source block reads the entries before it writes its first chunk.
// Ranks may differ in mode within one operation (one rank's arena full, another's not).

namespace {

// 16-byte loads in flight per lane in a row copy. 16 holds a whole FP8 row of hidden 7168 (14 a lane)
// and half a BF16 one; it fits the 128 registers a thread may have only at 2 ranks (126; at 4 ranks
// ptxas spilled, and at 8 the per-destination pointers alone take ~48 registers).
constexpr int kCopyUnroll = DEEPEP_NUM_RANKS <= 2 ? 16 : 8;
constexpr long long kNoLimit = 0x7fffffffLL;

enum DirectMode : int { kModeDirect = 1, kModeStaged = 2 };

// Every field is 8 bytes wide, so the host packs the struct as int64 words (intranode.py,
// DIRECT_PARAMS, same order; see common/params.cuh).
struct DirectDispatchParams {
    const uint8_t* x;                 // [T][hidden_bytes]
    const uint8_t* x_scales;          // [T][scale_bytes] (FP8) or null
    const int64_t* topk_idx;          // [T][K] or null (cached dispatch)
    const float* topk_weights;        // [T][K] or null
    int* send_pos;                    // [T][R]: row of token t in destination j's block, or -1 (written when fused)
    int* recv_info;                   // [R+1] receive offsets, [R] source token counts, ... (written when fused)
    uint8_t* recv_x;                  // this rank's outputs; in its arena when `direct`
    uint8_t* recv_x_scales;
    int64_t* recv_topk_idx;
    float* recv_topk_weights;
    int* recv_src_idx;                // null: not written (a cached dispatch keeps the handle's)
    const uint64_t* peer_bases;       // [R] every rank's region, mapped here
    const Layout* layout;
    const uint64_t* seq;
    deepep::ErrorRecord* err;
    unsigned long long timeout_ns;
    long long num_tokens;
    long long hidden_bytes;
    long long scale_bytes;
    long long num_topk;               // K of topk_idx / topk_weights (0 without)
    long long with_topk;              // explicit flags: a rank without tokens has null inputs
    long long with_weights;           //   yet receives top-k data from its peers
    long long num_local_experts;
    long long num_worst_tokens;       // > 0: outputs hold this many rows; rows past it are dropped
    long long rank;
    long long slot_rows;              // staged rows per source slot
    long long row_bytes;              // staged row bytes (data, scales, K ids, K weights, source)
    long long direct;                 // 1: outputs in this rank's arena (mode 1), 0: mode 2
    long long tma_producers;          // > 0: rows move by TMA bulk copies, this many producer warps a block
    long long tma_stages;             //   each with a ring of this many rows of dynamic shared memory
    unsigned long long* chunk_counters;  // TMA path: [max_chunks] arrivals at chunks several blocks write
    long long tma_split;              // TMA path: 0 balanced block ranges (RangeSplit), 1 grid stride (GridSplit)
    // A fresh dispatch with the count exchange inside (settings.intranode_notify = "fused", register
    // path only): is_token_in_rank non-null. The kernel then writes send_pos and recv_info itself
    // (the handle's copies) instead of reading notify's, and the receive layout into host_info.
    const bool* is_token_in_rank;     // [T][R]
    const int* num_tokens_per_rank;   // [R]
    const int* num_tokens_per_expert; // [R * num_local_experts]
    int* host_info;                   // pinned record the host polls (notify's layout), or null
    long long expert_alignment;
};
DEEPEP_PARAMS_CHECK(DirectDispatchParams, 37);

using deepep::ld_nc_16;   // common/utils.cuh

// One warp copies `n16` 16-byte words from `src` to every non-null dst[j]: each load once, all
// kUnroll (kCopyUnroll, or 8 for the "registers8" entry point) loads of a lane in flight before their stores.
template <int kUnroll>
DEEPEP_DEVICE void copy_row_to_all(const int4* __restrict__ src, int4* const (&dst)[kNumRanks], int n16,
                                   int lane) {
    for (int i0 = 0; i0 < n16; i0 += kUnroll * kWarpSize) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = i0 + u * kWarpSize + lane;
            if (i < n16) v[u] = ld_nc_16(src + i);
        }
#pragma unroll
        for (int j = 0; j < kNumRanks; ++j) {
            if (dst[j] == nullptr) continue;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int i = i0 + u * kWarpSize + lane;
                if (i < n16) dst[j][i] = v[u];
            }
        }
    }
}

// FP8 scales (hidden/128 floats, not always a multiple of 16 bytes): 4 bytes per lane. The first
// 64 words of a row are loaded by the caller ahead of the row's data (ScaleWords), so their latency
// overlaps the row's loads instead of following them; this loop takes the rest (hidden > 8192).
DEEPEP_DEVICE void copy_words_to_all(const int* __restrict__ src, int* const (&dst)[kNumRanks], int first, int words,
                                     int lane) {
    for (int i = first + lane; i < words; i += kWarpSize) {
        const int v = __ldg(src + i);
#pragma unroll
        for (int j = 0; j < kNumRanks; ++j)
            if (dst[j] != nullptr) dst[j][i] = v;
    }
}

// A row's first 2 x 32 scale words, one pair per lane, loaded before the row's data.
struct ScaleWords {
    int v0, v1;
    static constexpr int kWords = 2 * kWarpSize;
    DEEPEP_DEVICE static ScaleWords load(const int* __restrict__ src, int words, int lane) {
        ScaleWords s{0, 0};
        if (lane < words) s.v0 = __ldg(src + lane);
        if (lane + kWarpSize < words) s.v1 = __ldg(src + lane + kWarpSize);
        return s;
    }
    DEEPEP_DEVICE void store(int* const (&dst)[kNumRanks], int words, int lane) const {
#pragma unroll
        for (int j = 0; j < kNumRanks; ++j) {
            if (dst[j] == nullptr) continue;
            if (lane < words) dst[j][lane] = v0;
            if (lane + kWarpSize < words) dst[j][lane + kWarpSize] = v1;
        }
    }
};

// Where one peer wants this rank's rows (read from direct_info into shared memory).
struct DestInfo {
    long long off[5];     // x, scales, top-k ids, weights, source index: region offsets or -1
    long long limit;      // rows past this are dropped (num_worst_tokens)
    int mode;
};

// ---- where a token's copies go (both send paths) ------------------------------------------------

// What every send role needs about the destinations, fixed for the kernel.
struct SendTargets {
    const DirectDispatchParams& p;
    const DestInfo* dest;      // shared memory, [kNumRanks]
    PeerBases peers;
    const Layout& layout;
    int rank;
    const int* recv_offsets;   // [R+1]: p.recv_info, or shared memory when the kernel derives it (fused)

    // Row of token t's copy at destination j given its send position `pos` (own: its row of recv_x;
    // a peer: the position in the peer's block), or -1 when t does not go to j or the row is dropped
    // (num_worst_tokens here, or the receiver's row limit: both record the overflow elsewhere).
    DEEPEP_DEVICE long long row(int j, int pos) const {
        if (pos < 0) return -1;
        if (j == rank) {
            const long long r = static_cast<long long>(recv_offsets[rank]) + pos;
            return p.num_worst_tokens > 0 && r >= p.num_worst_tokens ? -1 : r;
        }
        if (dest[j].mode == kModeDirect && pos >= dest[j].limit) return -1;
        return pos;
    }
    // Start of row r's data at destination j: recv_x here, the peer's arena block (direct), or the
    // peer's staging slot (staged: the row's scales and top-k trailer follow the data).
    DEEPEP_DEVICE uint8_t* data(int j, long long r) const {
        if (j == rank) return p.recv_x + r * p.hidden_bytes;
        if (dest[j].mode == kModeDirect) return peers.base[j] + dest[j].off[0] + r * p.hidden_bytes;
        return at<uint8_t>(peers.base[j], layout.dispatch_staging) +
               (static_cast<long long>(slot_of(rank, j)) * p.slot_rows + r) * p.row_bytes;
    }
    DEEPEP_DEVICE int* scales(int j, long long r) const {
        if (j == rank) return reinterpret_cast<int*>(p.recv_x_scales + r * p.scale_bytes);
        if (dest[j].mode == kModeDirect) return reinterpret_cast<int*>(peers.base[j] + dest[j].off[1] + r * p.scale_bytes);
        return reinterpret_cast<int*>(data(j, r) + p.hidden_bytes);
    }
    // One warp: the top-k ids (as j's local ids, -1 elsewhere), weights (0 where not local) and source
    // index of token t at row r of destination j; `e` and `w` are lane k's expert id and weight.
    DEEPEP_DEVICE void store_meta(int j, long long r, int t, int64_t e, float w, int lane) const {
        const int num_topk = static_cast<int>(p.num_topk);
        const bool with_topk = p.with_topk != 0, with_weights = p.with_weights != 0;
        const long long num_local = p.num_local_experts;
        const bool local = e >= j * num_local && e < (j + 1) * num_local;
        const int64_t local_id = local ? e - j * num_local : -1;
        const float local_w = local ? w : 0.0f;
        if (j == rank) {
            if (with_topk && lane < num_topk) {
                p.recv_topk_idx[r * num_topk + lane] = local_id;
                if (with_weights) p.recv_topk_weights[r * num_topk + lane] = local_w;
            }
            if (lane == 0 && p.recv_src_idx != nullptr) p.recv_src_idx[r] = t;
        } else if (dest[j].mode == kModeDirect) {
            uint8_t* b = peers.base[j];
            if (with_topk && lane < num_topk && dest[j].off[2] >= 0) {
                at<int64_t>(b, dest[j].off[2])[r * num_topk + lane] = local_id;
                if (with_weights && dest[j].off[3] >= 0) at<float>(b, dest[j].off[3])[r * num_topk + lane] = local_w;
            }
            if (lane == 0 && dest[j].off[4] >= 0) at<int>(b, dest[j].off[4])[r] = t;
        } else {   // staged: int32 ids (global), weights, source behind the row's data and scales
            int* ids = reinterpret_cast<int*>(data(j, r) + p.hidden_bytes + p.scale_bytes);
            if (with_topk && lane < num_topk) {
                ids[lane] = static_cast<int>(e);
                if (with_weights) reinterpret_cast<float*>(ids + num_topk)[lane] = w;
            }
            if (lane == 0) ids[2 * num_topk] = t;
        }
    }
    // One warp: token t's scales (FP8) and top-k data to every destination whose row is rows[j] >= 0.
    DEEPEP_DEVICE void send_small(int t, const long long (&rows)[kNumRanks], int lane) const;
    // The thread for peer j != rank, once chunk c is written everywhere: for a staged peer the
    // chunk's row range (it copies them out), then the flag, each after a system fence (which orders
    // every row this block wrote before it: the caller synchronised with the writers).
    DEEPEP_DEVICE void publish(int j, int c, uint64_t seq) const {
        if (dest[j].mode == kModeStaged) {
            int first = 0, count = 0;
            const int t_end = min(static_cast<int>(p.num_tokens), (c + 1) * kChunk);
            for (int t = c * kChunk; t < t_end; ++t) {
                const int q = p.send_pos[static_cast<long long>(t) * kNumRanks + j];
                if (q >= 0) {
                    if (count == 0) first = q;
                    ++count;
                }
            }
            __threadfence_system();
            int* ranges = at<int>(peers.base[j], layout.dispatch_ranges) + 2 * (rank * layout.max_chunks + c);
            ranges[0] = first;
            ranges[1] = count;
        }
        __threadfence_system();
        st_release_sys_u64(at<uint64_t>(peers.base[j], layout.dispatch_flags) + rank * layout.max_chunks + c, seq);
    }
    // One thread of each writer of a chunk that several write, after a system fence that orders its
    // part before: counts the arrival at chunk_counters[c] (arrive_shared_chunk below) and, in the
    // last of `writers` to arrive, publishes the chunk to every peer itself. That thread observed the
    // other writers' arrivals, so its fences order their rows before the flags; a shuffle of the
    // outcome to other lanes would not, in the PTX memory model.
    DEEPEP_DEVICE void publish_when_last(int c, int writers, uint64_t seq) const;
};

// ---- TMA send path ----------------------------------------------------------------------------
// The warps of a block split into roles, so that rows stream through the SM's bulk-copy unit while
// ordinary warps do the per-token work:
//   warp 0, table:     per chunk, each token's destination rows (send_pos through SendTargets::row)
//                      into shared memory (one lane per token)
//   warp 1, publisher: per chunk, once every producer and small-data warp counted it done, the
//                      fence and the chunk flag to every peer (and, staged peers, the row range);
//                      for a chunk other blocks write too, an arrival first (the splits below)
//   warps 2 .. 2+P-1, producers (lane 0 only): a ring of `stages` whole-row buffers in dynamic
//                      shared memory; bulk-load row k (mbarrier), bulk-store it to every destination,
//                      refill the ring one row behind. A producer counts a chunk done once the
//                      bulk-store groups of its rows there completed (kTmaLag rows later)
//   the rest, small data: per token, scales, top-k ids, weights and source index (send_small)
// Chunk slots: chunk i of the block uses slot i % kTmaSlots; `ready` (table written), `count`
// (roles done) and `freed` (published: the table may be rewritten) hand the slot around.
constexpr int kTmaSlots = 4;
static_assert(kChunk == kWarpSize, "the table warp takes a chunk's tokens a lane each");
constexpr int kTmaLag = 2;           // rows a producer issues past a chunk before waiting for its writes
constexpr int kTmaMaxProducers = 8;
constexpr int kTmaMaxStages = 16;
constexpr int kTmaFixedWarps = 2;    // table, publisher

struct TmaSendShared {
    int drow[kTmaSlots][kChunk][kNumRanks];
    int ready[kTmaSlots];
    int count[kTmaSlots];
    int freed[kTmaSlots];
    uint64_t bars[kTmaMaxProducers][kTmaMaxStages];
};

using deepep::tma::smem_u32;
DEEPEP_DEVICE int ld_acquire_cta(const int* ptr) {
    int v;
    asm volatile("ld.acquire.cta.shared::cta.s32 %0, [%1];" : "=r"(v) : "r"(smem_u32(ptr)) : "memory");
    return v;
}
DEEPEP_DEVICE void st_release_cta(int* ptr, int v) {
    asm volatile("st.release.cta.shared::cta.s32 [%0], %1;" ::"r"(smem_u32(ptr)), "r"(v) : "memory");
}
DEEPEP_DEVICE void add_release_cta(int* ptr, int v) {
    asm volatile("red.release.cta.shared::cta.add.s32 [%0], %1;" ::"r"(smem_u32(ptr)), "r"(v) : "memory");
}
// Wait until *ptr >= v, written by other warps of this block. They depend only on this block's own
// progress, so a timeout here means a bug (or a bulk copy that never completes): an error, not a hang.
DEEPEP_DEVICE bool wait_block_geq(const int* ptr, int v, const DirectDispatchParams& p, int rank) {
    if (ld_acquire_cta(ptr) >= v) return true;   // (the common case: no clock read)
    return deepep::wait_until([&] { return ld_acquire_cta(ptr) >= v; }, p.timeout_ns, p.err, kPhaseDirectSend,
                              rank, rank);
}

// ---- how the TMA path splits the tokens over the blocks ----------------------------------------
// Each split says, for this block: count() local chunks; token(i, l), the token at index l (< kChunk)
// of local chunk i's table, or -1; producer(w), which of those rows producer warp w moves, in order
// (ProducerRows: rows(), chunk_of(q), index_of(q), token_of(q), rows_through(i) = rows of chunks <= i);
// and publish(i, ...), the publisher warp's work once local chunk i is written.

// One thread of each writer of a shared chunk, after a system fence that orders the writer's part of
// it before: counts the arrival; true in the last of `writers`, which publishes. The counter's high
// word tags it with the operation (low 32 bits of seq), so a count left by an earlier operation (one
// that gave up part-way) reads as zero and nothing needs resetting. Lock-free: each failed
// compare-and-swap means another writer arrived, so it loops at most `writers` times.
DEEPEP_DEVICE bool arrive_shared_chunk(unsigned long long* counter, uint64_t seq, int writers) {
    const unsigned long long tag = static_cast<unsigned long long>(static_cast<uint32_t>(seq)) << 32;
    unsigned long long old = *reinterpret_cast<volatile unsigned long long*>(counter);
    for (;;) {
        const unsigned long long count = (old & ~0xffffffffull) == tag ? (old & 0xffffffffull) : 0;
        const unsigned long long prev = atomicCAS(counter, old, tag | (count + 1));
        if (prev == old) return static_cast<int>(count + 1) == writers;
        old = prev;
    }
}

DEEPEP_DEVICE void SendTargets::publish_when_last(int c, int writers, uint64_t seq) const {
    if (!arrive_shared_chunk(p.chunk_counters + c, seq, writers)) return;
    __threadfence_system();   // the other writers' parts before the flags
    for (int j = 0; j < kNumRanks; ++j)
        if (j != rank) publish(j, c, seq);
}

// Tokens [c kChunk, end) of global chunk c.
DEEPEP_DEVICE int chunk_end_token(int c, int num_tokens) { return min(num_tokens, (c + 1) * kChunk); }

// settings.intranode_copy = "tma": block b sends tokens [b T / G, (b+1) T / G) (G blocks), so blocks
// differ by at most one token. The range is cut at the global chunk boundaries: local chunk i is
// global chunk chunk(i). A chunk the range does not hold whole is shared with the neighbouring
// blocks; its flag goes up when the last of them arrives.
struct RangeSplit {
    int num_tokens, lo, hi, P;
    DEEPEP_DEVICE static RangeSplit of(int num_tokens, int producers) {
        const long long t = num_tokens;
        return {num_tokens, static_cast<int>(t * blockIdx.x / gridDim.x),
                static_cast<int>(t * (blockIdx.x + 1) / gridDim.x), producers};
    }
    DEEPEP_DEVICE int count() const { return hi > lo ? (hi - 1) / kChunk - lo / kChunk + 1 : 0; }
    DEEPEP_DEVICE int chunk(int i) const { return lo / kChunk + i; }
    DEEPEP_DEVICE int first_token(int i) const { return max(lo, chunk(i) * kChunk); }
    DEEPEP_DEVICE int end_token(int i) const { return min(hi, (chunk(i) + 1) * kChunk); }
    DEEPEP_DEVICE int token(int i, int l) const {
        const int t = first_token(i) + l;
        return t < end_token(i) ? t : -1;
    }
    DEEPEP_DEVICE bool whole(int i) const {
        return first_token(i) == chunk(i) * kChunk && end_token(i) == chunk_end_token(chunk(i), num_tokens);
    }
    // The block whose range holds token t: the largest b with b T / G <= t.
    DEEPEP_DEVICE int block_of(int t) const {
        return static_cast<int>((static_cast<long long>(t + 1) * gridDim.x - 1) / num_tokens);
    }
    // One warp: how many blocks hold tokens of local chunk i (a lane per token; empty ranges hold none).
    DEEPEP_DEVICE int writers(int i, int lane) const {
        const int t = chunk(i) * kChunk + lane;
        const bool starts = t < chunk_end_token(chunk(i), num_tokens) && (lane == 0 || block_of(t) != block_of(t - 1));
        return __popc(__ballot_sync(0xffffffffu, starts));
    }
    // Producer w: rows w, w + P, ... of each local chunk. Only the first and the last local chunk can
    // be partial, so its rows are n_first of chunk 0, then kChunk / P of each middle chunk, then those
    // of the last.
    struct ProducerRows;   // (below: it holds a copy of the split)
    DEEPEP_DEVICE ProducerRows producer(int w) const;
    // The publisher warp, local chunk i written (acquired by every lane): lane j publishes a whole
    // chunk to peer j; a shared one lane 0 counts, publishing it if its block arrived last.
    DEEPEP_DEVICE void publish(int i, int lane, const SendTargets& to, uint64_t seq) const {
        const int c = chunk(i);
        if (whole(i)) {
            if (lane < kNumRanks && lane != to.rank) to.publish(lane, c, seq);
            return;
        }
        const int n_writers = writers(i, lane);
        if (lane != 0) return;
        __threadfence_system();   // this block's part before the count
        to.publish_when_last(c, n_writers, seq);
    }
};

struct RangeSplit::ProducerRows {
    RangeSplit s;
    int w, n_first, n;
    DEEPEP_DEVICE int per_chunk() const { return kChunk / s.P; }
    DEEPEP_DEVICE int rows() const { return n; }
    DEEPEP_DEVICE int chunk_of(int q) const { return q < n_first ? 0 : 1 + (q - n_first) / per_chunk(); }
    DEEPEP_DEVICE int index_of(int q) const { return w + (q < n_first ? q : (q - n_first) % per_chunk()) * s.P; }
    DEEPEP_DEVICE int token_of(int q) const { return s.first_token(chunk_of(q)) + index_of(q); }
    DEEPEP_DEVICE int rows_through(int i) const { return i == 0 ? n_first : min(n, n_first + i * per_chunk()); }
};
DEEPEP_DEVICE RangeSplit::ProducerRows RangeSplit::producer(int w) const {
    auto rows_in = [&](int i) {
        const int len = end_token(i) - first_token(i);
        return len > w ? (len - w + P - 1) / P : 0;
    };
    const int chunks = count();
    const int n_first = chunks > 0 ? rows_in(0) : 0;
    const int n = chunks > 1 ? n_first + (chunks - 2) * (kChunk / P) + rows_in(chunks - 1) : n_first;
    return {*this, w, n_first, n};
}

// settings.intranode_copy = "tma-grid": tokens in groups of P (the block's producer count) dealt to
// the blocks in turn: group m of block b is tokens [(m G + b) P, +P). Local chunk i is the block's
// groups [i B, (i+1) B), B = kChunk / P, so its table still holds kChunk tokens (index l: token l % P
// of group i B + l / P), and producer w's q-th row is token (q G + b) P + w: its successive rows lie
// G P tokens apart, the split under which the copy probe's bulk copies ran fastest (intranode.md).
// Every global chunk is written by the blocks of its groups (16 of them for P = 2), each arriving
// once per group; the last arrival publishes it.
struct GridSplit {
    int num_tokens, P, groups;   // groups: this block's, m with (m G + b) P < T
    DEEPEP_DEVICE static GridSplit of(int num_tokens, int producers) {
        const int total = (num_tokens + producers - 1) / producers, b = blockIdx.x, G = gridDim.x;
        return {num_tokens, producers, total > b ? (total - b + G - 1) / G : 0};
    }
    DEEPEP_DEVICE int batch() const { return kChunk / P; }
    DEEPEP_DEVICE int count() const { return (groups + batch() - 1) / batch(); }
    DEEPEP_DEVICE int group_first(int m) const { return (m * static_cast<int>(gridDim.x) + static_cast<int>(blockIdx.x)) * P; }
    DEEPEP_DEVICE int token(int i, int l) const {
        const int m = i * batch() + l / P;
        const int t = m < groups ? group_first(m) + l % P : num_tokens;
        return t < num_tokens ? t : -1;
    }
    struct ProducerRows;   // (below: it holds a copy of the split)
    // every group of the block but a last one (the grid's last, when P does not divide T) too short for w
    DEEPEP_DEVICE ProducerRows producer(int w) const;
    // The publisher warp, local chunk i written (acquired by every lane): lane g arrives for the
    // chunk's g-th group, and publishes that group's global chunk if it arrived last.
    DEEPEP_DEVICE void publish(int i, int lane, const SendTargets& to, uint64_t seq) const {
        const int m = i * batch() + lane;
        if (lane >= batch() || m >= groups) return;
        const int c = group_first(m) / kChunk;
        __threadfence_system();   // this block's group before its count
        to.publish_when_last(c, (chunk_end_token(c, num_tokens) - c * kChunk + P - 1) / P, seq);
    }
};

struct GridSplit::ProducerRows {
    GridSplit s;
    int w, n;
    DEEPEP_DEVICE int rows() const { return n; }
    DEEPEP_DEVICE int chunk_of(int q) const { return q / s.batch(); }
    DEEPEP_DEVICE int index_of(int q) const { return w + (q % s.batch()) * s.P; }
    DEEPEP_DEVICE int token_of(int q) const { return s.group_first(q) + w; }
    DEEPEP_DEVICE int rows_through(int i) const { return min(n, (i + 1) * s.batch()); }
};
DEEPEP_DEVICE GridSplit::ProducerRows GridSplit::producer(int w) const {
    return {*this, w, groups == 0 || group_first(groups - 1) + w < num_tokens ? groups : groups - 1};
}

// wait_block_geq for a whole-warp role, with one outcome for every lane: a lane that timed out must
// not leave the others behind in the role's full-warp collectives (__syncwarp, ballots).
DEEPEP_DEVICE bool warp_waits(const int* ptr, int v, const SendTargets& to) {
    return __all_sync(0xffffffffu, wait_block_geq(ptr, v, to.p, to.rank));
}

template <typename Split>
DEEPEP_DEVICE void tma_table_role(const SendTargets& to, TmaSendShared& sh, const Split& split, int lane) {
    for (int i = 0; i < split.count(); ++i) {
        const int slot = i % kTmaSlots;
        if (i >= kTmaSlots && !warp_waits(&sh.freed[slot], i - kTmaSlots + 1, to)) return;
        const int t = split.token(i, lane);
#pragma unroll
        for (int j = 0; j < kNumRanks; ++j)
            sh.drow[slot][lane][j] =
                t >= 0 ? static_cast<int>(to.row(j, to.p.send_pos[static_cast<long long>(t) * kNumRanks + j])) : -1;
        __syncwarp();
        if (lane == 0) st_release_cta(&sh.ready[slot], i + 1);
    }
}

template <typename Split>
DEEPEP_DEVICE void tma_small_role(const SendTargets& to, TmaSendShared& sh, const Split& split, int role_warp,
                                  int num_role_warps, int lane) {
    for (int i = 0; i < split.count(); ++i) {
        const int slot = i % kTmaSlots;
        if (!warp_waits(&sh.ready[slot], i + 1, to)) return;
        for (int l = role_warp; l < kChunk; l += num_role_warps) {
            const int t = split.token(i, l);
            if (t < 0) continue;
            long long rows[kNumRanks];
#pragma unroll
            for (int j = 0; j < kNumRanks; ++j) rows[j] = sh.drow[slot][l][j];
            to.send_small(t, rows, lane);
        }
        __syncwarp();
        if (lane == 0) add_release_cta(&sh.count[slot], 1);
    }
}

template <typename Split>
DEEPEP_DEVICE void tma_publisher_role(const SendTargets& to, TmaSendShared& sh, const Split& split, uint64_t seq,
                                      int expected, int lane) {
    for (int i = 0; i < split.count(); ++i) {
        const int slot = i % kTmaSlots;
        if (!warp_waits(&sh.count[slot], expected, to)) return;
        split.publish(i, lane, to, seq);
        __syncwarp();
        if (lane == 0) {
            sh.count[slot] = 0;
            st_release_cta(&sh.freed[slot], i + 1);
        }
    }
}

// Lane 0 of producer warp `w`: its rows (Split::producer) in order through a ring of `stages` rows.
template <typename Split>
DEEPEP_DEVICE void tma_producer_role(const SendTargets& to, TmaSendShared& sh, const Split& split, uint8_t* ring,
                                     int w, int stages) {
    const DirectDispatchParams& p = to.p;
    const int row_bytes = static_cast<int>(p.hidden_bytes);
    const int block_chunks = split.count();
    const auto mine = split.producer(w);
    const int n = mine.rows();
    uint64_t* bars = sh.bars[w];
    for (int s = 0; s < stages; ++s) deepep::tma::init_barrier(bars + s);
    deepep::tma::fence_barrier_init();
    auto stage = [&](int k) { return ring + static_cast<long long>(k % stages) * row_bytes; };
    int loaded = 0;   // rows whose bulk load was issued: [0, loaded)
    auto issue_load = [&](int k) {
        deepep::tma::load(stage(k), p.x + static_cast<long long>(mine.token_of(k)) * row_bytes, row_bytes,
                          bars + k % stages);
        loaded = k + 1;
    };
    // wait until chunk i's table is written; on a timeout let the loads in flight land first (they
    // write the ring and its barriers, and read this rank's own x, so they complete)
    auto wait_ready = [&](int i) {
        if (wait_block_geq(&sh.ready[i % kTmaSlots], i + 1, p, to.rank)) return true;
        for (int kk = max(0, loaded - stages); kk < loaded; ++kk)
            deepep::tma::wait_barrier(bars + kk % stages, (kk / stages) & 1);
        deepep::tma::wait_done<0>();
        return false;
    };
    for (int k = 0; k < min(stages, n); ++k) issue_load(k);
    int signalled = 0;   // local chunks counted done so far
    int waited = -1;     // the last chunk whose table this producer waited for
    for (int k = 0; k < n; ++k) {
        const int i = mine.chunk_of(k), slot = i % kTmaSlots, l = mine.index_of(k);
        for (; waited < i; ++waited)   // (with a chunk before it that has no rows of this producer)
            if (!wait_ready(waited + 1)) return;
        deepep::tma::wait_barrier(bars + k % stages, (k / stages) & 1);
#pragma unroll
        for (int j = 0; j < kNumRanks; ++j) {
            const int r = sh.drow[slot][l][j];
            if (r >= 0) deepep::tma::store(to.data(j, r), stage(k), row_bytes);
        }
        deepep::tma::commit();
        if (k >= 1 && k - 1 + stages < n) {   // row k-1's stores have read its stage: refill it
            deepep::tma::wait_read<1>();
            issue_load(k - 1 + stages);
        }
        // chunks whose rows' bulk writes completed (all but the newest kTmaLag rows') are counted; a
        // chunk's slot must be ready before its count (else it could land in the count of the chunk
        // that used the slot before): every chunk up to `waited` is
        while (signalled <= waited && mine.rows_through(signalled) <= k + 1 - kTmaLag) {
            deepep::tma::wait_done<kTmaLag>();   // the chunk's bulk writes, ordered before the count
            add_release_cta(&sh.count[signalled % kTmaSlots], 1);
            ++signalled;
        }
    }
    deepep::tma::wait_done<0>();
    // the rest, including chunks without rows of this producer
    for (; signalled < block_chunks; ++signalled) {
        for (; waited < signalled; ++waited)
            if (!wait_ready(waited + 1)) return;
        add_release_cta(&sh.count[signalled % kTmaSlots], 1);
    }
}

// The TMA path's roles for one split (see "TMA send path" above).
template <typename Split>
DEEPEP_DEVICE void tma_send(const SendTargets& to, TmaSendShared& sh, const Split& split, uint8_t* s_ring, uint64_t seq,
                            int producers, int warp, int num_warps, int lane) {
    const int stages = static_cast<int>(to.p.tma_stages);
    const int small_warps = num_warps - kTmaFixedWarps - producers;
    if (warp == 0) {
        tma_table_role(to, sh, split, lane);
    } else if (warp == 1) {
        tma_publisher_role(to, sh, split, seq, producers + small_warps, lane);
    } else if (warp < kTmaFixedWarps + producers) {
        const int w = warp - kTmaFixedWarps;
        if (lane == 0)
            tma_producer_role(to, sh, split, s_ring + static_cast<long long>(w) * stages * to.p.hidden_bytes, w, stages);
    } else {
        tma_small_role(to, sh, split, warp - kTmaFixedWarps - producers, small_warps, lane);
    }
}

DEEPEP_DEVICE void SendTargets::send_small(int t, const long long (&rows)[kNumRanks], int lane) const {
    const int scale_bytes = static_cast<int>(p.scale_bytes), num_topk = static_cast<int>(p.num_topk);
    if (scale_bytes) {
        int* dscale[kNumRanks];
#pragma unroll
        for (int j = 0; j < kNumRanks; ++j) dscale[j] = rows[j] >= 0 ? scales(j, rows[j]) : nullptr;
        const int words = scale_bytes >> 2;
        const int* src = reinterpret_cast<const int*>(p.x_scales + static_cast<long long>(t) * scale_bytes);
        ScaleWords::load(src, words, lane).store(dscale, words, lane);
        copy_words_to_all(src, dscale, ScaleWords::kWords, words, lane);
    }
    const int64_t e = (p.with_topk && lane < num_topk) ? __ldg(p.topk_idx + static_cast<long long>(t) * num_topk + lane) : -1;
    const float w = (p.with_weights && lane < num_topk) ? __ldg(p.topk_weights + static_cast<long long>(t) * num_topk + lane) : 0.0f;
#pragma unroll
    for (int j = 0; j < kNumRanks; ++j)
        if (rows[j] >= 0) store_meta(j, rows[j], t, e, w, lane);
}

}  // namespace

// ---- the fused count exchange: a fresh dispatch without the notify kernel ----------------------
// settings.intranode_notify = "fused" (register path). Every rank posts one direct_info entry per
// receiver holding all its peers need from it: as a receiver, where its outputs are (mode, region
// offsets of its blocks' first rows, the row limit as an absolute row); as a source, its token
// count and the rows it sends to each rank. With every source's row of counts a sender derives
// where its first row goes in each receiver's blocks (the rows of lower-ranked sources come first)
// and each receiver its receive offsets: one exchange instead of notify's plus the data kernel's.
// The per-expert counts go into the notify slots, for the receive layout the host polls. Each
// block derives its tokens' send positions from is_token_in_rank itself (scan_send_window).
//
// direct_info entry (int64 words, by seq parity: a fused block that sends nothing still reads its
// peers' entries, possibly after they started the next operation):
//   [0] mode, [1..5] region offsets of x / scales / top-k ids / weights / source index (staged
//   path: of the poster's first row from this source; fused: of row 0), [6] row limit (staged
//   path: relative to that first row; fused: absolute), [7] the poster's token count (fused),
//   [8..11] the poster's rows to each rank, int32 [8] (fused)
constexpr int kDirectInfoWords = 16;
static_assert(kNumRanks <= 8, "a direct_info entry holds 8 counts");

// The entry that rank `s` posted for operation `seq` in the region at `base`.
DEEPEP_DEVICE long long* direct_entry(uint8_t* base, const Layout& layout, uint64_t seq, int s) {
    return at<long long>(base, layout.direct_info) + (static_cast<long long>(seq & 1) * kNumRanks + s) * kDirectInfoWords;
}

constexpr int kScanWindow = 64;   // own chunks whose send positions one scan derives
constexpr int kScanBatch = 4;     // chunks a warp loads before its ballots

struct FusedShared {
    int counts[kNumRanks][kNumRanks];        // [s][k]: rows source s sends to rank k
    int recv_offsets[kNumRanks + 1];
    int src_tokens[kNumRanks];
    int prefix[kScanWindow][kNumRanks];      // rows to j before own chunk k0 + k (bucket sums first)
    uint32_t mask[kScanWindow][kNumRanks];   // which tokens (lanes) of own chunk k0 + k go to j
    int carry[kNumRanks];                    // rows to j before the window's first own chunk
};

// Block 0 of a fused dispatch: this rank's entry and notify slot at every rank (its own too: the
// receive layout sums its own slot), then a release of each peer's flag.
DEEPEP_DEVICE void post_fused_entries(const DirectDispatchParams& p, const PeerBases& peers, const Layout& layout,
                                      int rank, uint64_t seq) {
    const int num_local = static_cast<int>(p.num_local_experts);
    const long long parity = static_cast<long long>(seq & 1) * kNumRanks * layout.notify_ints;
    for (int s = 0; s < kNumRanks; ++s) {   // slot `rank` at s: [0] rows to s, [1] tokens, [2 + l] per expert of s
        int* slot = at<int>(peers.base[s], layout.notify_slots) + parity + rank * layout.notify_ints;
        for (int i = threadIdx.x; i < 2 + num_local; i += blockDim.x)
            slot[i] = notify_slot_word(p.num_tokens_per_rank, p.num_tokens_per_expert, static_cast<int>(p.num_tokens),
                                       num_local, s, i);
    }
    if (threadIdx.x < kNumRanks) {
        const int s = threadIdx.x;
        long long* e = direct_entry(peers.base[s], layout, seq, rank);
        const uint8_t* own = peers.base[rank];
        auto region_off = [&](const void* q) -> long long {
            return q == nullptr ? -1 : reinterpret_cast<const uint8_t*>(q) - own;
        };
        e[0] = p.direct ? kModeDirect : kModeStaged;
        e[1] = region_off(p.recv_x);
        e[2] = region_off(p.recv_x_scales);
        e[3] = region_off(p.recv_topk_idx);
        e[4] = region_off(p.recv_topk_weights);
        e[5] = region_off(p.recv_src_idx);
        e[6] = p.num_worst_tokens > 0 ? p.num_worst_tokens : kNoLimit;
        e[7] = p.num_tokens;
        int* counts = reinterpret_cast<int*>(e + 8);
#pragma unroll
        for (int k = 0; k < kNumRanks; ++k) counts[k] = p.num_tokens_per_rank[k];
    }
    __syncthreads();   // every thread's words before the flags
    if (threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank) {
        __threadfence_system();
        st_release_sys_u64(at<uint64_t>(peers.base[threadIdx.x], layout.direct_flags) + rank, seq);
    }
}

// Every block of a fused dispatch: wait for every peer's entry, then derive this rank's receive
// offsets and, per peer j, where this rank's first row goes in j's outputs (into dest[j]). False,
// in every thread, when a wait timed out (recorded).
DEEPEP_DEVICE bool gather_fused_entries(const DirectDispatchParams& p, const PeerBases& peers, const Layout& layout,
                                        int rank, uint64_t seq, FusedShared& f, DestInfo* dest, bool& s_ok) {
    if (threadIdx.x == 0) s_ok = true;
    __syncthreads();
    uint8_t* mine = peers.base[rank];
    if (threadIdx.x < kNumRanks) {
        const int s = threadIdx.x;
        if (s == rank) {
#pragma unroll
            for (int k = 0; k < kNumRanks; ++k) f.counts[s][k] = p.num_tokens_per_rank[k];
            f.src_tokens[s] = static_cast<int>(p.num_tokens);
        } else if (wait_flag(at<uint64_t>(mine, layout.direct_flags) + s, seq, p.timeout_ns, p.err, kPhaseDirectInfo,
                             s, rank)) {
            const volatile long long* e = direct_entry(mine, layout, seq, s);
            const volatile int* counts = reinterpret_cast<const volatile int*>(e + 8);
#pragma unroll
            for (int k = 0; k < kNumRanks; ++k) f.counts[s][k] = counts[k];
            f.src_tokens[s] = static_cast<int>(e[7]);
            dest[s].mode = static_cast<int>(e[0]);
#pragma unroll
            for (int q = 0; q < 5; ++q) dest[s].off[q] = e[1 + q];
            dest[s].limit = e[6];
        } else {
            s_ok = false;
        }
    }
    __syncthreads();
    if (!s_ok) return false;
    if (threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank) {
        const int j = threadIdx.x;
        long long row0 = 0;   // rows of lower-ranked sources before this rank's in j's outputs
        for (int s = 0; s < rank; ++s) row0 += f.counts[s][j];
        const long long elem_bytes[5] = {p.hidden_bytes, p.scale_bytes, 8 * p.num_topk, 4 * p.num_topk, 4};
#pragma unroll
        for (int q = 0; q < 5; ++q)
            if (dest[j].off[q] >= 0) dest[j].off[q] += row0 * elem_bytes[q];
        if (dest[j].limit != kNoLimit) dest[j].limit = max(0LL, dest[j].limit - row0);
    }
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int s = 0; s < kNumRanks; ++s) {
            f.recv_offsets[s] = acc;
            acc += f.counts[s][rank];
        }
        f.recv_offsets[kNumRanks] = acc;
    }
    __syncthreads();
    return true;
}

// Block 0 of a fused dispatch, after the gather: recv_info (the handle's copy) and, where the host
// waits, the pinned record notify would have written (same layout, the seq word last); an empty
// layout after a timeout, so that the host's poll wakes and raises what was recorded.
DEEPEP_DEVICE void record_fused_layout(const DirectDispatchParams& p, const PeerBases& peers, const Layout& layout,
                                       int rank, uint64_t seq, const FusedShared& f, bool ok) {
    const int num_local = static_cast<int>(p.num_local_experts);
    const int align = static_cast<int>(p.expert_alignment);
    const volatile int* slots = at<int>(peers.base[rank], layout.notify_slots) +
                                static_cast<long long>(seq & 1) * kNumRanks * layout.notify_ints;
    const int num_info = 2 * kNumRanks + 1 + num_local;
    for (int i = threadIdx.x; i < num_info; i += blockDim.x) {
        const int v = !ok ? 0
                      : i <= kNumRanks ? f.recv_offsets[i]
                      : i <= 2 * kNumRanks ? f.src_tokens[i - kNumRanks - 1]
                      : aligned_expert_total(slots, layout.notify_ints, i - 2 * kNumRanks - 1, align);
        p.recv_info[i] = v;
        if (p.host_info != nullptr) p.host_info[i] = v;
    }
    if (p.host_info == nullptr) return;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        *host_seq_word(p.host_info, layout) = static_cast<long long>(seq);
    }
}

// The register path deals global chunk c to block c % G: own chunk k of this block is chunk
// b + k G. One scan of is_token_in_rank gives, for own chunks k0 .. k0 + kScanWindow - 1, the rows
// to each destination before the chunk (f.prefix) and which of its tokens go there (f.mask).
// Bucket k holds the chunks [b + (k-1) G, b + k G) (from chunk 0 for k = 0); f.carry brings the rows
// before the window in and leaves with those before its last own chunk. Block-wide (barriers).
DEEPEP_DEVICE void scan_send_window(const DirectDispatchParams& p, FusedShared& f, int k0, int warp, int num_warps,
                                    int lane) {
    const int G = gridDim.x, b = blockIdx.x;
    const int num_tokens = static_cast<int>(p.num_tokens);
    const int own_chunks = ((num_tokens + kChunk - 1) / kChunk - b + G - 1) / G;   // (> 0: the caller's block sends)
    const int k_last = min(k0 + kScanWindow, own_chunks) - 1;
    for (int i = threadIdx.x; i < kScanWindow * kNumRanks; i += blockDim.x) f.prefix[i / kNumRanks][i % kNumRanks] = 0;
    if (k0 == 0 && threadIdx.x < kNumRanks) f.carry[threadIdx.x] = 0;
    __syncthreads();
    const int c_first = k0 == 0 ? 0 : b + (k0 - 1) * G;
    const int c_end = b + k_last * G + 1;   // through the window's last own chunk (its mask)
    const uint8_t* in_rank = reinterpret_cast<const uint8_t*>(p.is_token_in_rank);
    for (int c0 = c_first + warp * kScanBatch; c0 < c_end; c0 += num_warps * kScanBatch) {
        bool in[kScanBatch][kNumRanks];   // loads of kScanBatch chunks in flight before the ballots
#pragma unroll
        for (int u = 0; u < kScanBatch; ++u) {
            const int t = (c0 + u) * kChunk + lane;
            const bool valid = c0 + u < c_end && t < num_tokens;
#pragma unroll
            for (int j = 0; j < kNumRanks; ++j)
                in[u][j] = valid && __ldg(in_rank + static_cast<long long>(t) * kNumRanks + j) != 0;
        }
#pragma unroll
        for (int u = 0; u < kScanBatch; ++u) {
            const int c = c0 + u;   // (warp-uniform)
            if (c >= c_end) break;
            const int own = c >= b && (c - b) % G == 0 ? (c - b) / G - k0 : -1;
            const int bucket = (c < b ? 0 : (c - b) / G + 1) - k0;
#pragma unroll
            for (int j = 0; j < kNumRanks; ++j) {
                const uint32_t m = __ballot_sync(0xffffffffu, in[u][j]);
                if (lane == 0) {
                    if (own >= 0) f.mask[own][j] = m;
                    if (bucket + k0 <= k_last) atomicAdd(&f.prefix[bucket][j], __popc(m));
                }
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < kNumRanks) {
        const int j = threadIdx.x;
        int run = f.carry[j];
        for (int k = 0; k <= k_last - k0; ++k) {
            run += f.prefix[k][j];
            f.prefix[k][j] = run;
        }
        f.carry[j] = f.prefix[k_last - k0][j];
    }
    __syncthreads();
    // the window's send positions into send_pos (the handle's copy, which the send loop then reads
    // as it reads notify's): a warp per own chunk, a lane per token
    for (int k = warp; k <= k_last - k0; k += num_warps) {
        const int t = (b + (k0 + k) * G) * kChunk + lane;
        if (t >= num_tokens) continue;
#pragma unroll
        for (int j = 0; j < kNumRanks; ++j) {
            const uint32_t m = f.mask[k][j];
            p.send_pos[static_cast<long long>(t) * kNumRanks + j] =
                (m >> lane) & 1u ? f.prefix[k][j] + __popc(m & ((1u << lane) - 1u)) : -1;
        }
    }
    __syncthreads();
}

// The kernel body; kTma: the TMA send path (p.tma_producers > 0), else the register path. Two entry
// points, so that each path gets its own register allocation: the register path's 16 loads in
// flight take 126 of the 128 registers a thread may have at 2 ranks, and the TMA roles in the same
// function pushed it into spills.
template <bool kTma, int kUnroll = kCopyUnroll, bool kFused = false>
DEEPEP_DEVICE void dispatch_direct(const DirectDispatchParams& p) {
    static_assert(!(kTma && kFused), "the fused count exchange is the register path's");
    const PeerBases peers{reinterpret_cast<uint8_t* const*>(p.peer_bases)};
    const Layout layout = *p.layout;
    const uint64_t seq = *reinterpret_cast<const volatile uint64_t*>(p.seq);
    const int rank = static_cast<int>(p.rank);
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int num_tokens = static_cast<int>(p.num_tokens);
    const int hidden_bytes = static_cast<int>(p.hidden_bytes), scale_bytes = static_cast<int>(p.scale_bytes);
    const int num_topk = static_cast<int>(p.num_topk);
    const bool with_topk = p.with_topk != 0, with_weights = p.with_weights != 0;
    const int num_local = static_cast<int>(p.num_local_experts);
    const long long row_bytes = p.row_bytes;
    const int* recv_offsets = p.recv_info;
    const int* src_tokens = p.recv_info + kNumRanks + 1;
    const int num_worst = static_cast<int>(p.num_worst_tokens);
    const int num_chunks = (num_tokens + kChunk - 1) / kChunk;
    __shared__ DestInfo s_dest[kNumRanks];
    __shared__ bool s_ok;
    // the fused count exchange (register path only; the host never asks the TMA path for it)
    FusedShared* fs = nullptr;
    if constexpr (kFused) {
        __shared__ FusedShared s_fused;
        fs = &s_fused;
    }
    const int own_chunks = static_cast<int>(blockIdx.x) < num_chunks
                               ? (num_chunks - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x : 0;

    if constexpr (kFused) {
        // 0. post this rank's counts and output places to every rank; scan this block's first send
        //    positions while the peers' entries travel; then gather theirs
        if (blockIdx.x == 0) post_fused_entries(p, peers, layout, rank, seq);
        if (own_chunks > 0) scan_send_window(p, *fs, 0, warp, num_warps, lane);
        const bool ok = gather_fused_entries(p, peers, layout, rank, seq, *fs, s_dest, s_ok);
        if (blockIdx.x == 0) record_fused_layout(p, peers, layout, rank, seq, *fs, ok);
        if (!ok) return;
        recv_offsets = fs->recv_offsets;
        src_tokens = fs->src_tokens;
    } else if (blockIdx.x == 0 && threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank) {
        // 0. tell every source where its rows go (block 0, one thread per source)
        const int s = threadIdx.x;
        long long* e = direct_entry(peers.base[s], layout, seq, rank);
        const long long row0 = recv_offsets[s];
        const uint8_t* own = peers.base[rank];
        auto region_off = [&](const void* q, long long elem_bytes) -> long long {
            return q == nullptr ? -1 : (reinterpret_cast<const uint8_t*>(q) - own) + row0 * elem_bytes;
        };
        e[0] = p.direct ? kModeDirect : kModeStaged;
        e[1] = region_off(p.recv_x, hidden_bytes);
        e[2] = region_off(p.recv_x_scales, scale_bytes);
        e[3] = region_off(p.recv_topk_idx, 8LL * num_topk);
        e[4] = region_off(p.recv_topk_weights, 4LL * num_topk);
        e[5] = region_off(p.recv_src_idx, 4);
        e[6] = num_worst > 0 ? max(0LL, static_cast<long long>(num_worst) - row0) : kNoLimit;
        __threadfence_system();
        st_release_sys_u64(at<uint64_t>(peers.base[s], layout.direct_flags) + rank, seq);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0 && num_worst > 0 && recv_offsets[kNumRanks] > num_worst)
        deepep::record_error(p.err, deepep::kBadValue, kPhaseWorstOverflow, rank, rank);

    // 1. send
    // (blocks with tokens to send: the TMA path splits them by range or grid stride, the register
    // path by chunk)
    const int producers = kTma ? static_cast<int>(p.tma_producers) : 0;
    const bool grid_split = p.tma_split != 0;
    const int tma_chunks = !kTma ? 0
                           : grid_split ? GridSplit::of(num_tokens, producers).count()
                                        : RangeSplit::of(num_tokens, producers).count();
    if (!kFused && (kTma ? tma_chunks > 0 : own_chunks > 0)) {
        if (threadIdx.x == 0) s_ok = true;
        __syncthreads();
        if (threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank) {
            const int j = threadIdx.x;
            uint8_t* mine = peers.base[rank];
            if (wait_flag(at<uint64_t>(mine, layout.direct_flags) + j, seq, p.timeout_ns, p.err, kPhaseDirectInfo,
                          j, rank)) {
                const volatile long long* e = direct_entry(mine, layout, seq, j);
                s_dest[j].mode = static_cast<int>(e[0]);
                for (int f = 0; f < 5; ++f) s_dest[j].off[f] = e[1 + f];
                s_dest[j].limit = e[6];
            } else {
                s_ok = false;
            }
        }
        __syncthreads();
        if (!s_ok) return;
    }
    const SendTargets to{p, s_dest, peers, layout, rank, recv_offsets};
    if constexpr (kTma) {   // TMA path: roles (see "TMA send path" above)
        __shared__ TmaSendShared s_tma;
        extern __shared__ __align__(128) uint8_t s_ring[];
        if (threadIdx.x < kTmaSlots) {
            s_tma.ready[threadIdx.x] = 0;
            s_tma.count[threadIdx.x] = 0;
            s_tma.freed[threadIdx.x] = 0;
        }
        __syncthreads();
        if (grid_split)
            tma_send(to, s_tma, GridSplit::of(num_tokens, producers), s_ring, seq, producers, warp, num_warps, lane);
        else
            tma_send(to, s_tma, RangeSplit::of(num_tokens, producers), s_ring, seq, producers, warp, num_warps, lane);
        __syncwarp();
    } else {   // register path: a warp per token, 16-byte copies
        // (the fused path derives the send positions a window of own chunks at a time)
        for (int c = blockIdx.x, k = 0; c < num_chunks; c += gridDim.x, ++k) {   // own chunk k
            if (kFused && k > 0 && k % kScanWindow == 0) scan_send_window(p, *fs, k, warp, num_warps, lane);
            const int t_end = min(num_tokens, (c + 1) * kChunk);
            for (int t = c * kChunk + warp; t < t_end; t += num_warps) {
                // per destination: row there (own row in recv_x, or the peer's position), or -1
                int4* dx[kNumRanks];
                int* dscale[kNumRanks];
                long long drow[kNumRanks];
#pragma unroll
                for (int j = 0; j < kNumRanks; ++j) {
                    drow[j] = to.row(j, p.send_pos[static_cast<long long>(t) * kNumRanks + j]);
                    dx[j] = drow[j] < 0 ? nullptr : reinterpret_cast<int4*>(to.data(j, drow[j]));
                    dscale[j] = drow[j] < 0 || !scale_bytes ? nullptr : to.scales(j, drow[j]);
                }
                // The token's small loads (scales, top-k ids and weights: one lane per top-k slot) go first,
                // so they wait together with the row's data instead of one round trip after another (FP8
                // rows are half as long, so these rounds were a third of a token's latency).
                const int scale_words = scale_bytes >> 2;
                const int* scales = reinterpret_cast<const int*>(p.x_scales + static_cast<long long>(t) * scale_bytes);
                const ScaleWords head = scale_bytes ? ScaleWords::load(scales, scale_words, lane) : ScaleWords{0, 0};
                const int64_t e = (with_topk && lane < num_topk) ? __ldg(p.topk_idx + static_cast<long long>(t) * num_topk + lane) : -1;
                const float w = (with_weights && lane < num_topk) ? __ldg(p.topk_weights + static_cast<long long>(t) * num_topk + lane) : 0.0f;
                copy_row_to_all<kUnroll>(reinterpret_cast<const int4*>(p.x + static_cast<long long>(t) * hidden_bytes), dx,
                                hidden_bytes >> 4, lane);
                if (scale_bytes) {
                    head.store(dscale, scale_words, lane);
                    copy_words_to_all(scales, dscale, ScaleWords::kWords, scale_words, lane);
                }
#pragma unroll
                for (int j = 0; j < kNumRanks; ++j)
                    if (drow[j] >= 0) to.store_meta(j, drow[j], t, e, w, lane);
            }
            __syncthreads();
            // publish the chunk to every peer j (thread j)
            if (threadIdx.x < kNumRanks && static_cast<int>(threadIdx.x) != rank)
                to.publish(threadIdx.x, c, seq);
        }
    }

    // 2. receive
    uint8_t* mine = peers.base[rank];
    if (p.direct) {
        // every chunk of every source is up: chunk c of s is waited for by block c % gridDim.x
        for (int s = 0; s < kNumRanks; ++s) {
            if (s == rank) continue;
            const int chunks = (src_tokens[s] + kChunk - 1) / kChunk;
            for (int c = blockIdx.x + threadIdx.x * gridDim.x; c < chunks; c += blockDim.x * gridDim.x)
                if (!wait_flag(at<uint64_t>(mine, layout.dispatch_flags) + s * layout.max_chunks + c, seq,
                               p.timeout_ns, p.err, kPhaseDispatchRecv, s, rank))
                    break;
        }
    } else {
        __shared__ int s_range[2];
        for (int s = 0; s < kNumRanks; ++s) {
            if (s == rank) continue;
            const int chunks = (src_tokens[s] + kChunk - 1) / kChunk;
            const uint8_t* slot = at<uint8_t>(mine, layout.dispatch_staging) +
                                  static_cast<long long>(slot_of(s, rank)) * p.slot_rows * row_bytes;
            for (int c = blockIdx.x; c < chunks; c += gridDim.x) {
                if (threadIdx.x == 0) {
                    s_ok = wait_flag(at<uint64_t>(mine, layout.dispatch_flags) + s * layout.max_chunks + c, seq,
                                     p.timeout_ns, p.err, kPhaseDispatchRecv, s, rank);
                    const volatile int* ranges = at<int>(mine, layout.dispatch_ranges) + 2 * (s * layout.max_chunks + c);
                    s_range[0] = ranges[0];
                    s_range[1] = ranges[1];
                }
                __syncthreads();
                if (!s_ok) return;
                const int first = s_range[0], count = s_range[1];
                for (int i = warp; i < count; i += num_warps) {
                    const int pos = first + i;
                    const uint8_t* src = slot + static_cast<long long>(pos) * row_bytes;
                    const long long r = recv_offsets[s] + pos;
                    if (num_worst > 0 && r >= num_worst) continue;   // recorded at the start
                    warp_copy<true>(p.recv_x + r * hidden_bytes, src, hidden_bytes, lane);
                    if (scale_bytes)
                        warp_copy_words<true>(p.recv_x_scales + r * scale_bytes, src + hidden_bytes, scale_bytes, lane);
                    const int* ids = reinterpret_cast<const int*>(src + hidden_bytes + scale_bytes);
                    if (lane == 0 && p.recv_src_idx != nullptr) p.recv_src_idx[r] = __ldcg(ids + 2 * num_topk);
                    if (with_topk && lane < num_topk) {
                        const int e = __ldcg(ids + lane);
                        const bool local = e >= rank * num_local && e < (rank + 1) * num_local;
                        p.recv_topk_idx[r * num_topk + lane] = local ? e - rank * num_local : -1;
                        if (with_weights)
                            p.recv_topk_weights[r * num_topk + lane] =
                                local ? __ldcg(reinterpret_cast<const float*>(ids + num_topk) + lane) : 0.0f;
                    }
                }
                __syncthreads();
            }
        }
    }
    // padding rows of a num_worst_tokens dispatch: top-k ids -1, weights 0, source -1
    if (num_worst > 0 && p.recv_src_idx != nullptr) {
        const int total = recv_offsets[kNumRanks];
        for (int r = total + blockIdx.x * blockDim.x + threadIdx.x; r < num_worst; r += gridDim.x * blockDim.x) {
            p.recv_src_idx[r] = -1;
            for (int k = 0; k < num_topk && with_topk; ++k) {
                p.recv_topk_idx[static_cast<long long>(r) * num_topk + k] = -1;
                if (with_weights) p.recv_topk_weights[static_cast<long long>(r) * num_topk + k] = 0.0f;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(512, 1) intranode_dispatch_direct(const DirectDispatchParams p) {
    dispatch_direct<false>(p);
}
extern "C" __global__ void __launch_bounds__(512, 1) intranode_dispatch_direct_tma(const DirectDispatchParams p) {
    dispatch_direct<true>(p);
}
// settings.intranode_copy = "registers8": the register path with 8 loads a lane in flight (the
// default's kCopyUnroll is 16 at 2 ranks; the copy probe had 8 about 3 % faster there). At 4 and 8
// ranks it is the default's code.
extern "C" __global__ void __launch_bounds__(512, 1) intranode_dispatch_direct_r8(const DirectDispatchParams p) {
    dispatch_direct<false, 8>(p);
}
// settings.intranode_notify = "fused": a fresh dispatch whose kernel exchanges the counts itself
// (p.is_token_in_rank non-null), with either register path
extern "C" __global__ void __launch_bounds__(512, 1) intranode_dispatch_direct_fused(const DirectDispatchParams p) {
    dispatch_direct<false, kCopyUnroll, true>(p);
}
extern "C" __global__ void __launch_bounds__(512, 1) intranode_dispatch_direct_r8_fused(const DirectDispatchParams p) {
    dispatch_direct<false, 8, true>(p);
}
