// Low-latency dispatch and combine (decode). Design and buffer layout: docs/low_latency.md.
//
// STATUS: compiled in CI, NOT yet run on GPUs and not wired into Buffer (issue #4). The launcher
// (deepep_cupy/low_latency.py) and tests/gpu/test_low_latency_gpu.py are ready for the first run.
//
// Every rank's low-latency region (inside its symmetric buffer, same offsets on all ranks) has two
// halves; an operation with sequence number `seq` uses half `seq & 1`:
//   recv_msgs      [R sources][M tokens][msg_bytes]   one message per (source token, this rank)
//   recv_meta      [R sources][meta_ints] int32       {num_tokens, entries per local expert [L]}
//   recv_flags     [R sources] uint64                 raised to seq after the source's messages
//   combine_rows   [M tokens][K slots][H] bf16        expert outputs for this rank's tokens
//   combine_flags  [R sources] uint64
//   send_msgs      [M tokens][msg_bytes]              messages assembled here (RDMA puts read it)
//   combine_stage  [R dests][M*K rows][H] bf16        combine rows staged for RDMA puts
//   meta_stage     [R dests][meta_ints] int32         metas staged for RDMA puts
// A message: 16-byte header {int32 source token, int32 seq tag, 2 x pad}, K int32 expert ids,
// K int32 slots (rank of this (token, k) among the source's entries for that expert), padded to
// 16 bytes, then the payload: bf16 [H], or fp8 [H] + float32 scales [H/128] (UE8M0: int32 words).
//
// Peers whose base pointer is non-zero are written with 16-byte stores over NVLink; a zero base
// means "use NVSHMEM puts" (RDMA, or forced for testing). Sequence numbers live in device memory:
// every kernel of an operation uses *seq_ptr + 1 and the operation's last kernel (a receive)
// advances *seq_ptr with a last-block pattern, so CUDA-graph replays stay in step.
#include "common/exception.cuh"
#include "common/nvshmem.cuh"
#include "common/utils.cuh"

#ifndef DEEPEP_NUM_RANKS
#error "DEEPEP_NUM_RANKS must be defined"
#endif

namespace {

constexpr int kNumRanks = DEEPEP_NUM_RANKS;
constexpr int kWarpSize = 32;
constexpr int kHeaderBytes = 16;

constexpr int kPhaseLLDispatchRecv = 20;  // names in deepep_cupy/kernel_errors.py
constexpr int kPhaseLLCombineRecv = 21;

struct LLLayout {
    long long half_bytes;
    long long recv_msgs;
    long long recv_meta;
    long long recv_flags;
    long long combine_rows;
    long long combine_flags;
    long long send_msgs;
    long long combine_stage;
    long long meta_stage;        // [R dests][meta_ints] int32, source of the meta puts
    int msg_bytes;
    int meta_ints;
    int max_tokens;   // M
    int max_topk;     // K the combine rows were sized for
};

struct LLShape {
    int num_tokens, hidden, num_topk, num_experts;   // T (this rank), H, K, E
    int use_fp8, round_scale, use_ue8m0;
};

// kernels take the shape as scalars (a launch argument cannot be a struct from CuPy)
#define LL_SHAPE_PARAMS int num_tokens_, int hidden_, int num_topk_, int num_experts_, int use_fp8_, \
                        int round_scale_, int use_ue8m0_
#define LL_SHAPE const LLShape shape{num_tokens_, hidden_, num_topk_, num_experts_, use_fp8_, round_scale_, use_ue8m0_}

DEEPEP_DEVICE uint8_t* half_base(uint8_t* region, const LLLayout& lay, uint64_t seq) {
    return region + static_cast<long long>(seq & 1) * lay.half_bytes;
}

DEEPEP_DEVICE void st_release_u64(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

DEEPEP_DEVICE void warp_copy16(void* dst, const void* src, int bytes, int lane) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int i = lane; i < (bytes >> 4); i += kWarpSize) d[i] = __ldcg(s + i);
}

DEEPEP_DEVICE float bf16_to_float(unsigned short b) { return __uint_as_float(static_cast<unsigned int>(b) << 16); }

DEEPEP_DEVICE unsigned short float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

// float -> e4m3fn, round to nearest even, saturating at +-448 (the reference clips first)
DEEPEP_DEVICE uint8_t float_to_e4m3(float f) {
    unsigned short packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(0.0f), "f"(f));
    return static_cast<uint8_t>(packed & 0xff);
}

// Wait (one thread) until flag >= seq; false on timeout (recorded).
DEEPEP_DEVICE bool wait_seq(const uint64_t* flag, uint64_t seq, uint64_t timeout_ns, deepep::ErrorRecord* err,
                            int phase, int peer, int rank) {
    return deepep::wait_geq(flag, seq, timeout_ns, err, phase, peer, rank);
}

// Last block of the grid to call this (after its own work) gets true; the counter is left zero.
DEEPEP_DEVICE bool last_block_done(unsigned int* counter) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// prepare: for every expert e (a warp each), the rank of each (t, k) entry among this rank's
// entries for e, in (t, k) order, and the count per expert. Deterministic, no atomics.
extern "C" __global__ void __launch_bounds__(256)
ll_prepare(const int64_t* __restrict__ topk_idx, int num_entries, int num_experts,
           int* __restrict__ slots, int* __restrict__ counts) {
    const int lane = threadIdx.x % kWarpSize;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    const unsigned int lanes_below = (1u << lane) - 1u;
    for (int e = warp; e < num_experts; e += num_warps) {
        int running = 0;
        for (int base = 0; base < num_entries; base += kWarpSize) {
            const int j = base + lane;
            const bool hit = j < num_entries && topk_idx[j] == e;
            const unsigned int mask = __ballot_sync(0xffffffffu, hit);
            if (hit) slots[j] = running + __popc(mask & lanes_below);
            running += __popc(mask);
        }
        if (lane == 0) counts[e] = running;
    }
}

// ------------------------------------------------------------------------------------------------
// dispatch send: a block per token (grid-stride). Warps build the message in send_msgs (FP8 cast
// one 128-channel block per warp step), then warp r copies it to destination r if one of the
// token's experts lives there. The last block writes every destination's meta and raises its flag.
extern "C" __global__ void __launch_bounds__(512, 1)
ll_dispatch_send(const unsigned short* __restrict__ x, const int64_t* __restrict__ topk_idx,
                 const int* __restrict__ slots, const int* __restrict__ counts, LL_SHAPE_PARAMS,
                 uint8_t* region, const uint64_t* __restrict__ peer_regions, const LLLayout* lay_ptr,
                 int rank, const uint64_t* seq_ptr, unsigned int* done_counter) {
    const LLLayout lay = *lay_ptr;
    LL_SHAPE;
    const uint64_t seq = *reinterpret_cast<const volatile uint64_t*>(seq_ptr) + 1;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int H = shape.hidden, K = shape.num_topk;
    const int num_local = shape.num_experts / kNumRanks;
    uint8_t* half = half_base(region, lay, seq);
    uint8_t* send_msgs = half + lay.send_msgs;

    for (int t = blockIdx.x; t < shape.num_tokens; t += gridDim.x) {
        uint8_t* msg = send_msgs + static_cast<long long>(t) * lay.msg_bytes;
        int* header = reinterpret_cast<int*>(msg);
        int* ids = header + kHeaderBytes / 4;
        if (threadIdx.x == 0) {
            header[0] = t;
            header[1] = static_cast<int>(seq & 0x7fffffff);
        }
        if (threadIdx.x < K) {
            const long long j = static_cast<long long>(t) * K + threadIdx.x;
            ids[threadIdx.x] = static_cast<int>(topk_idx[j]);
            ids[K + threadIdx.x] = topk_idx[j] >= 0 ? slots[j] : -1;
        }
        uint8_t* payload = msg + (kHeaderBytes + 8 * K + 15) / 16 * 16;
        const unsigned short* row = x + static_cast<long long>(t) * H;
        if (shape.use_fp8 && shape.use_ue8m0) {   // padding bytes of the packed exponents are zero
            if (threadIdx.x < (H / 128 + 3) / 4) reinterpret_cast<int*>(payload + H)[threadIdx.x] = 0;
            __syncthreads();
        }
        if (!shape.use_fp8) {
            for (int i = threadIdx.x; i < H / 8; i += blockDim.x)
                reinterpret_cast<int4*>(payload)[i] = reinterpret_cast<const int4*>(row)[i];
        } else {
            // one warp per 128-channel block: 4 channels per lane
            float* scales = reinterpret_cast<float*>(payload + H);
            for (int b = warp; b < H / 128; b += num_warps) {
                const uint2 raw = reinterpret_cast<const uint2*>(row + b * 128)[lane];
                float v[4] = {bf16_to_float(raw.x & 0xffff), bf16_to_float(raw.x >> 16),
                              bf16_to_float(raw.y & 0xffff), bf16_to_float(raw.y >> 16)};
                float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
                amax = fmaxf(amax, 1e-4f);
                float scale, scale_inv;
                if (shape.round_scale) {
                    // 2^ceil(log2(amax / 448)) from the bits of the correctly rounded quotient
                    const float q = __fdiv_rn(amax, 448.0f);
                    const unsigned int bits = __float_as_uint(q);
                    const int p = static_cast<int>((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffff) ? 1 : 0);
                    scale_inv = __uint_as_float(static_cast<unsigned int>(p + 127) << 23);
                    scale = __uint_as_float(static_cast<unsigned int>(127 - p) << 23);
                    if (lane == 0) {
                        if (shape.use_ue8m0) payload[H + b] = static_cast<uint8_t>(p + 127);
                        else scales[b] = scale_inv;
                    }
                } else {
                    scale = __fdiv_rn(448.0f, amax);
                    scale_inv = __fdiv_rn(amax, 448.0f);
                    if (lane == 0) scales[b] = scale_inv;
                }
                unsigned int packed = 0;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float y = fminf(fmaxf(__fmul_rn(v[i], scale), -448.0f), 448.0f);
                    packed |= static_cast<unsigned int>(float_to_e4m3(y)) << (8 * i);
                }
                reinterpret_cast<unsigned int*>(payload + b * 128)[lane] = packed;
            }
        }
        __syncthreads();
        // warp r sends to rank r when one of the token's experts lives there
        if (warp < kNumRanks) {
            const int r = warp;
            bool needed = false;
            for (int k = 0; k < K; ++k) {
                const long long e = topk_idx[static_cast<long long>(t) * K + k];
                needed |= e >= 0 && e / num_local == r;
            }
            if (needed) {
                const long long off = (seq & 1) * lay.half_bytes + lay.recv_msgs +
                                      (static_cast<long long>(rank) * lay.max_tokens + t) * lay.msg_bytes;
                const uint64_t peer = peer_regions[r];
                if (peer != 0) {
                    warp_copy16(reinterpret_cast<uint8_t*>(peer) + off, msg, lay.msg_bytes, lane);
                } else {
                    __threadfence();   // the block's message writes are visible to the put engine
                    nvshmemx_putmem_nbi_warp(region + off, msg, lay.msg_bytes, r);
                }
            }
        }
        __syncthreads();
    }
    // make this block's stores / puts complete before the last block raises the flags
    if (threadIdx.x == 0) nvshmem_quiet();
    if (!last_block_done(done_counter)) return;
    if (threadIdx.x < kNumRanks) {
        const int r = threadIdx.x;
        const long long meta_off = (seq & 1) * lay.half_bytes + lay.recv_meta +
                                   static_cast<long long>(rank) * lay.meta_ints * 4;
        const long long flag_off = (seq & 1) * lay.half_bytes + lay.recv_flags + static_cast<long long>(rank) * 8;
        const uint64_t peer = peer_regions[r];
        if (peer != 0) {
            int* meta = reinterpret_cast<int*>(reinterpret_cast<uint8_t*>(peer) + meta_off);
            meta[0] = shape.num_tokens;
            for (int l = 0; l < num_local; ++l) meta[1 + l] = counts[r * num_local + l];
            __threadfence_system();
            st_release_u64(reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(peer) + flag_off), seq);
        } else {
            int* meta = reinterpret_cast<int*>(half + lay.meta_stage) + r * lay.meta_ints;
            meta[0] = shape.num_tokens;
            for (int l = 0; l < num_local; ++l) meta[1 + l] = counts[r * num_local + l];
            nvshmem_putmem(region + meta_off, meta, 4 * (1 + num_local), r);
            nvshmem_fence();
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(region + flag_off), seq, NVSHMEM_SIGNAL_SET, r);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// dispatch receive: wait for every source's flag, derive layout_begin[l][s] from the metas, then
// copy every (source, token, k) for a local expert into recv_x[l][begin + slot]. The last block
// advances the sequence number.
extern "C" __global__ void __launch_bounds__(512, 1)
ll_dispatch_recv(uint8_t* __restrict__ recv_x, uint8_t* __restrict__ recv_scales,
                 int* __restrict__ recv_count, int* __restrict__ recv_src_info, int* __restrict__ recv_src_k,
                 int* __restrict__ layout_begin, int* __restrict__ layout_count, LL_SHAPE_PARAMS,
                 uint8_t* region, const LLLayout* lay_ptr, int rank, uint64_t* seq_ptr,
                 unsigned int* done_counter, uint64_t timeout_ns, deepep::ErrorRecord* err) {
    const LLLayout lay = *lay_ptr;
    LL_SHAPE;
    const uint64_t seq = *reinterpret_cast<const volatile uint64_t*>(seq_ptr) + 1;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int H = shape.hidden, K = shape.num_topk, M = lay.max_tokens;
    const int num_local = shape.num_experts / kNumRanks;
    const int expert_lo = rank * num_local;
    uint8_t* half = half_base(region, lay, seq);
    const int slot_stride = kNumRanks * M;   // slots per local expert in recv_x
    const int scale_bytes = shape.use_fp8 ? (shape.use_ue8m0 ? (H / 128 + 3) / 4 * 4 : H / 32) : 0;
    const int data_bytes = shape.use_fp8 ? H : 2 * H;

    __shared__ bool ok;
    if (threadIdx.x == 0) {
        ok = true;
        for (int s = 0; s < kNumRanks && ok; ++s)
            ok = wait_seq(reinterpret_cast<uint64_t*>(half + lay.recv_flags) + s, seq, timeout_ns, err,
                          kPhaseLLDispatchRecv, s, rank);
    }
    __syncthreads();
    const volatile int* metas = reinterpret_cast<const int*>(half + lay.recv_meta);
    if (blockIdx.x == 0) {
        for (int l = threadIdx.x; l < num_local; l += blockDim.x) {
            int acc = 0;
            for (int s = 0; s < kNumRanks; ++s) {
                const int c = ok ? metas[s * lay.meta_ints + 1 + l] : 0;
                layout_begin[l * kNumRanks + s] = acc;
                layout_count[l * kNumRanks + s] = c;
                acc += c;
            }
            recv_count[l] = acc;
        }
    }
    if (ok) {
        // (source, token) pairs over all warps of the grid
        const int gwarp = blockIdx.x * num_warps + warp, gwarps = gridDim.x * num_warps;
        for (int s = 0; s < kNumRanks; ++s) {
            const int tokens = metas[s * lay.meta_ints];
            for (int t = gwarp; t < tokens; t += gwarps) {
                const uint8_t* msg = half + lay.recv_msgs + (static_cast<long long>(s) * M + t) * lay.msg_bytes;
                const int* header = reinterpret_cast<const int*>(msg);
                if (__ldcg(header + 1) != static_cast<int>(seq & 0x7fffffff)) continue;  // not sent to me
                const int* ids = header + kHeaderBytes / 4;
                const uint8_t* payload = msg + (kHeaderBytes + 8 * K + 15) / 16 * 16;
                for (int k = 0; k < K; ++k) {
                    const int e = __ldcg(ids + k);
                    if (e < expert_lo || e >= expert_lo + num_local) continue;
                    const int l = e - expert_lo;
                    int begin = 0;
                    for (int s2 = 0; s2 < s; ++s2) begin += metas[s2 * lay.meta_ints + 1 + l];
                    const long long pos = static_cast<long long>(l) * slot_stride + begin + __ldcg(ids + K + k);
                    warp_copy16(recv_x + pos * data_bytes, payload, data_bytes, lane);
                    if (scale_bytes)
                        for (int i = lane; i < scale_bytes / 4; i += kWarpSize)
                            reinterpret_cast<int*>(recv_scales + pos * scale_bytes)[i] =
                                __ldcg(reinterpret_cast<const int*>(payload + data_bytes) + i);
                    if (lane == 0) {
                        recv_src_info[pos] = __ldcg(header);
                        recv_src_k[pos] = k;
                    }
                }
            }
        }
    }
    if (last_block_done(done_counter) && threadIdx.x == 0) *seq_ptr = seq;
}

// ------------------------------------------------------------------------------------------------
// combine send: every received slot (l, pos < recv_count[l]) goes back to its source s as
// combine_rows[t][k] (t, k from the dispatch handle). NVLink peers: direct stores; others: the row
// is staged at combine_stage[s][t*K + k] and put. The last block raises every source's flag.
extern "C" __global__ void __launch_bounds__(512, 1)
ll_combine_send(const unsigned short* __restrict__ x, const int* __restrict__ recv_count,
                const int* __restrict__ recv_src_info, const int* __restrict__ recv_src_k,
                const int* __restrict__ layout_begin, const int* __restrict__ layout_count, LL_SHAPE_PARAMS,
                uint8_t* region, const uint64_t* __restrict__ peer_regions, const LLLayout* lay_ptr,
                int rank, const uint64_t* seq_ptr, unsigned int* done_counter) {
    const LLLayout lay = *lay_ptr;
    LL_SHAPE;
    const uint64_t seq = *reinterpret_cast<const volatile uint64_t*>(seq_ptr) + 1;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int H = shape.hidden, K = lay.max_topk, M = lay.max_tokens;
    const int num_local = shape.num_experts / kNumRanks;
    const int slot_stride = kNumRanks * M;
    uint8_t* half = half_base(region, lay, seq);
    const int gwarp = blockIdx.x * num_warps + warp, gwarps = gridDim.x * num_warps;
    for (int l = 0; l < num_local; ++l) {
        for (int pos = gwarp; pos < recv_count[l]; pos += gwarps) {
            int s = 0;
            while (s + 1 < kNumRanks && pos >= layout_begin[l * kNumRanks + s + 1]) ++s;
            const long long slot = static_cast<long long>(l) * slot_stride + pos;
            const int t = recv_src_info[slot], k = recv_src_k[slot];
            const unsigned short* row = x + slot * H;
            const long long dst_off = (seq & 1) * lay.half_bytes + lay.combine_rows +
                                      (static_cast<long long>(t) * K + k) * H * 2;
            const uint64_t peer = peer_regions[s];
            if (peer != 0) {
                warp_copy16(reinterpret_cast<uint8_t*>(peer) + dst_off, row, H * 2, lane);
            } else {
                uint8_t* stage = half + lay.combine_stage + ((static_cast<long long>(s) * M * K) + t * K + k) * H * 2;
                warp_copy16(stage, row, H * 2, lane);
                __syncwarp();
                nvshmemx_putmem_nbi_warp(region + dst_off, stage, H * 2, s);
            }
        }
    }
    if (threadIdx.x == 0) nvshmem_quiet();
    if (!last_block_done(done_counter)) return;
    if (threadIdx.x < kNumRanks) {
        const int s = threadIdx.x;
        const long long flag_off = (seq & 1) * lay.half_bytes + lay.combine_flags + static_cast<long long>(rank) * 8;
        const uint64_t peer = peer_regions[s];
        if (peer != 0) {
            __threadfence_system();
            st_release_u64(reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(peer) + flag_off), seq);
        } else {
            nvshmem_fence();
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(region + flag_off), seq, NVSHMEM_SIGNAL_SET, s);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// combine receive: wait for every rank's flag, then a warp per token sums w[t,k] * row[t][k] over
// valid k in ascending order (float32, round once to bf16). The last block advances the sequence.
extern "C" __global__ void __launch_bounds__(512, 1)
ll_combine_recv(const int64_t* __restrict__ topk_idx, const float* __restrict__ topk_weights,
                unsigned short* __restrict__ out, LL_SHAPE_PARAMS, uint8_t* region, const LLLayout* lay_ptr,
                int rank, uint64_t* seq_ptr, unsigned int* done_counter, uint64_t timeout_ns,
                deepep::ErrorRecord* err) {
    const LLLayout lay = *lay_ptr;
    LL_SHAPE;
    const uint64_t seq = *reinterpret_cast<const volatile uint64_t*>(seq_ptr) + 1;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int H = shape.hidden, K = shape.num_topk, KMAX = lay.max_topk;
    uint8_t* half = half_base(region, lay, seq);
    __shared__ bool ok;
    if (threadIdx.x == 0) {
        ok = true;
        for (int s = 0; s < kNumRanks && ok; ++s)
            ok = wait_seq(reinterpret_cast<uint64_t*>(half + lay.combine_flags) + s, seq, timeout_ns, err,
                          kPhaseLLCombineRecv, s, rank);
    }
    __syncthreads();
    if (ok) {
        const unsigned short* rows = reinterpret_cast<const unsigned short*>(half + lay.combine_rows);
        for (int t = blockIdx.x * num_warps + warp; t < shape.num_tokens; t += gridDim.x * num_warps) {
            for (int h = lane * 8; h < H; h += kWarpSize * 8) {
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int k = 0; k < K; ++k) {
                    if (topk_idx[static_cast<long long>(t) * K + k] < 0) continue;
                    const float w = topk_weights[static_cast<long long>(t) * K + k];
                    const int4 v = __ldcg(reinterpret_cast<const int4*>(rows + (static_cast<long long>(t) * KMAX + k) * H + h));
                    const unsigned short* e = reinterpret_cast<const unsigned short*>(&v);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, bf16_to_float(e[i])));
                }
                int4 o;
                unsigned short* ob = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
                for (int i = 0; i < 8; ++i) ob[i] = float_to_bf16(acc[i]);
                *reinterpret_cast<int4*>(out + static_cast<long long>(t) * H + h) = o;
            }
        }
    }
    if (last_block_done(done_counter) && threadIdx.x == 0) *seq_ptr = seq;
}
