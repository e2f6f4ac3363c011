// Nearest-code lookup on a CUDA device (see lookup_cuda.h; the arithmetic mirrors lookup.cpp).
//
// Pipeline of one lookup, all on the legacy default stream:
//   prepare_rows   x chunk -> prepared queries (rows padded to kTile, D padded to kSlab), per-row
//                  distance offset, finite/norm check (first bad row via atomicMin)
//   scan_kernel    fused distance + argmin: a kTile x kTile (queries x codes) register-tiled
//                  FP32 "GEMM" whose epilogue keeps each row's running minimum; K is split over
//                  grid.y and the partial results meet in one packed uint64 atomicMin per row
//   finish_kernel  packed (score, index) keys -> indices and distances
// Memory per lookup: O(M) plus a bounded chunk of prepared queries; never M x K. All device memory
// (scratch, prepared codebooks, result arrays) is stream-ordered, from the per-device pool.
#include "lookup_cuda.h"

#include "cuda_errors.h"
#include "cuda_memory.h"

#include "checks.h"

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace fullvq::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Tiling of scan_kernel. A block of 256 threads (16 x 16) owns kTile query rows and walks
// kTile-code tiles; each thread accumulates an 8 x 8 micro-tile (rows ty*4 + {0..3, 64..67},
// codes tx*4 + {0..3, 64..67}). D is consumed in slabs of kSlab, copied to shared memory
// transposed ([d][row]) with cp.async, double-buffered so the next slab loads during the FMAs.
constexpr int kTile = 128;                 // query rows and codes per block tile
constexpr int kSlab = 8;                   // dimensions per shared-memory slab
constexpr int kThreads = 256;
constexpr int kMicro = 8;                  // micro-tile side
constexpr int kPitch = kTile + 4;          // padded smem row: conflict-free transposed stores
constexpr int kResidentSlabs = 8;          // D <= 64: the block's queries stay in smem for all K
constexpr int64_t kPrepFloats = 1 << 24;   // prepared-query chunk: 64 MB at most
constexpr unsigned long long kNoRow = ~0ull;
static_assert(kTile % (kThreads / kSlab) == 0 && kTile / 4 <= kThreads, "slab copies must tile the block");
static_assert(kTile == 16 * kMicro && kSlab == 8, "thread layout assumes 16 x 16 threads, 8-wide slabs");

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
int64_t ceil_div(int64_t n, int64_t m) { return (n + m - 1) / m; }

void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Per-device state created once: the device's memory pool (device_pool) and the scan grid capacity.
struct DeviceInfo {
    cudaMemPool_t pool;
    int resident_blocks;  // scan_kernel blocks that run at once on the whole device
};

template <class T>
T copy_to_host(const T* src) {
    T value;
    check(cudaMemcpyAsync(&value, src, sizeof(T), cudaMemcpyDeviceToHost, kStream), "cudaMemcpyAsync");
    check(cudaStreamSynchronize(kStream), "cudaStreamSynchronize");
    return value;
}

// ---------------------------------------------------------------------------------------------
// Input checks: the shape checks and messages are shared with the CPU path (checks.h).

// Throws for the first bad row flagged by prepare_rows. Synchronises the stream.
void check_rows(const char* what, const unsigned long long* bad_row, const double* squared_norms) {
    const unsigned long long row = copy_to_host(bad_row);
    if (row == kNoRow) return;
    const double squared_norm = copy_to_host(squared_norms + row);
    if (squared_norm <= kMaxSquaredNorm) reject_far_row(int64_t(row));  // flagged by RowTransform::far_check
    reject_row(what, int64_t(row), squared_norm);
}

// ---------------------------------------------------------------------------------------------
// Preparation kernels.

// Per-column partial sums of rows [part * rows_per_part, ...) in double: partial (parts, D).
// Block (32, 8): 32 columns x 8 row lanes.
__global__ void column_sums(MatrixView m, int64_t rows_per_part, double* __restrict__ partial) {
    __shared__ double lanes[8][33];
    const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
    const int64_t r0 = int64_t(blockIdx.y) * rows_per_part;
    const int64_t r1 = min(m.rows, r0 + rows_per_part);
    double sum = 0.0;
    if (c < m.cols)
        for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) sum += m.data[r * m.row_stride + c * m.col_stride];
    lanes[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < m.cols) {
        double total = 0.0;
        for (int l = 0; l < 8; ++l) total += lanes[l][threadIdx.x];
        partial[int64_t(blockIdx.y) * m.cols + c] = total;
    }
}

// mean (D) = sum of partial (parts, D) over parts, in a fixed order (deterministic) / rows.
__global__ void column_means(const double* __restrict__ partial, int parts, int64_t cols, int64_t rows,
                             float* __restrict__ mean) {
    for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += int64_t(gridDim.x) * blockDim.x) {
        double total = 0.0;
        for (int p = 0; p < parts; ++p) total += partial[int64_t(p) * cols + c];
        mean[c] = float(total / double(rows));
    }
}

// *spread = the largest |v - mean|^2 over the rows of m, in double, as the bits of a non-negative
// double (which order like the numbers); it must start at 0. One warp per row.
__global__ void centred_spread(MatrixView m, const float* __restrict__ mean, unsigned long long* __restrict__ spread) {
    const int lane = threadIdx.x % 32;
    const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= m.rows) return;
    const float* row = m.data + r * m.row_stride;
    double sq = 0.0;
    for (int64_t c = lane; c < m.cols; c += 32) {
        const float t = row[c * m.col_stride] - mean[c];
        sq += double(t) * t;
    }
    for (int offset = 16; offset > 0; offset /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
    if (lane == 0) atomicMax(spread, static_cast<unsigned long long>(__double_as_longlong(sq)));
}

// How prepare_rows turns a source row v into a kernel row, as transform_row/prepare_queries do:
//   t = v - mean (float); cosine: t <- float(t / |t|) unless t == 0; out = t * scale.
struct RowTransform {
    const float* mean;  // (D) device; zeros for cosine
    float scale;        // s for codes; -2 s (l2) or -1 (cosine) for queries; s = l2_scale (1 for cosine)
    double norm_scale;  // s^2: l2 norm outputs are |t|^2 s^2
    bool far_check;     // queries with s > 1: flag rows with |t|^2 s^2 > 1e37 (reject_far_row)
    bool cosine;
    float cosine_norm;  // norm output of cosine rows: 0 (code bias) or 1 (query offset)
    float pad_norm;     // norm output of padding rows: +inf for codes (never chosen)
};

// One warp per row r < rows_p of src: out (rows_p, dp) row-major with zero padding,
// norm_out[r] = |t|^2 s^2 (l2) or cosine_norm, squared_norms[r] = |v|^2 in double, and
// *bad_row = min(row_base + r) over rows with a non-finite value, |v|^2 > 1e37 or (far_check)
// |t|^2 s^2 > 1e37.
__global__ void prepare_rows(MatrixView src, RowTransform tf, int64_t rows_p, int64_t dp, float* __restrict__ out,
                             float* __restrict__ norm_out, double* __restrict__ squared_norms,
                             unsigned long long* __restrict__ bad_row, int64_t row_base) {
    const int lane = threadIdx.x % 32;
    const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows_p) return;
    float* dst = out + r * dp;
    if (r >= src.rows) {
        for (int64_t c = lane; c < dp; c += 32) dst[c] = 0.f;
        if (lane == 0) norm_out[r] = tf.pad_norm;
        return;
    }
    const float* row = src.data + r * src.row_stride;
    double sq = 0.0, sq_t = 0.0;
    for (int64_t c = lane; c < src.cols; c += 32) {
        const float v = row[c * src.col_stride];
        const float t = v - tf.mean[c];
        sq += double(v) * v;
        sq_t += double(t) * t;
    }
    for (int offset = 16; offset > 0; offset /= 2) {  // xor tree: every lane gets the same sums
        sq += __shfl_xor_sync(0xffffffffu, sq, offset);
        sq_t += __shfl_xor_sync(0xffffffffu, sq_t, offset);
    }
    if (lane == 0) {
        squared_norms[r] = sq;
        if (!(sq <= kMaxSquaredNorm) || (tf.far_check && !(sq_t * tf.norm_scale <= kMaxSquaredNorm)))
            atomicMin(bad_row, static_cast<unsigned long long>(row_base + r));
        norm_out[r] = tf.cosine ? tf.cosine_norm : float(sq_t * tf.norm_scale);
    }
    const double inv = tf.cosine && sq_t > 0.0 ? 1.0 / sqrt(sq_t) : 1.0;
    for (int64_t c = lane; c < dp; c += 32) {
        float t = 0.f;
        if (c < src.cols) {
            t = row[c * src.col_stride] - tf.mean[c];
            if (tf.cosine) t = float(double(t) * inv);
        }
        dst[c] = t * tf.scale;
    }
}

// ---------------------------------------------------------------------------------------------
// The scan.

// Order-preserving float <-> uint32 map: a < b  <=>  key(a) < key(b) for non-NaN floats, with
// -0 folded into +0 so that equal scores always tie-break on the index.
__device__ __forceinline__ uint32_t score_key(float s) {
    const uint32_t b = __float_as_uint(s == 0.f ? 0.f : s);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_score(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Position in the tile of a thread's micro-tile element i (0..7), for thread coordinate t.
__device__ __forceinline__ int micro_offset(int t, int i) { return t * 4 + (i & 3) + (i & 4) * 16; }

__device__ __forceinline__ void load_micro(float (&f)[kMicro], const float* smem_row, int t) {
    const float4 lo = *reinterpret_cast<const float4*>(smem_row + t * 4);
    const float4 hi = *reinterpret_cast<const float4*>(smem_row + 64 + t * 4);
    f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w, f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
}

// Queues async copies (cp.async, no registers) of rows [0, kTile) x dims [0, kSlab) of a row-major
// matrix into slab[d][row]. `src` is this thread's element: base + (tid / kSlab) * dp + tid % kSlab;
// copy e takes rows 32 e + tid / kSlab, so each warp reads 4 rows x 32 contiguous bytes and
// writes 32 distinct banks.
__device__ __forceinline__ void copy_slab(float (*slab)[kPitch], const float* src, int64_t dp, int tid) {
    constexpr int kRowsPerCopy = kThreads / kSlab;
#pragma unroll
    for (int e = 0; e < kTile / kRowsPerCopy; ++e)
        __pipeline_memcpy_async(&slab[tid % kSlab][e * kRowsPerCopy + tid / kSlab], src + e * kRowsPerCopy * dp,
                                sizeof(float));
}

// acc[i][j] += sum over the slab's dims of xs[d][row i] * cs[d][code j], d ascending (the CPU's
// order, so scores round identically). kFirst starts from the tile's bias (smem row kSlab of cs).
template <bool kFirst>
__device__ __forceinline__ void accumulate(float (&acc)[kMicro][kMicro], const float (*xs)[kPitch],
                                           const float (*cs)[kPitch], int tx, int ty) {
    float a[kMicro], b[kMicro];
    if constexpr (kFirst) {
        float bias[kMicro];
        load_micro(a, xs[0], ty);
        load_micro(b, cs[0], tx);
        load_micro(bias, cs[kSlab], tx);
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], bias[j]);
    }
#pragma unroll
    for (int d = kFirst ? 1 : 0; d < kSlab; ++d) {
        load_micro(a, xs[d], ty);
        load_micro(b, cs[d], tx);
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

// Folds a finished tile (codes k0 + micro_offset(tx, j)) into each row's running minimum. Tiles
// come in increasing code order and j runs in increasing code order, so taking strictly smaller
// minima, and the first j equal to the tile minimum, keeps the lowest index among ties.
__device__ __forceinline__ void update_best(const float (&acc)[kMicro][kMicro], float (&best)[kMicro],
                                            uint32_t (&best_idx)[kMicro], uint32_t k0, int tx) {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
        float m = acc[i][0];
#pragma unroll
        for (int j = 1; j < kMicro; ++j) m = fminf(m, acc[i][j]);
        if (m < best[i]) {
            int first = kMicro - 1;
#pragma unroll
            for (int j = kMicro - 2; j >= 0; --j)
                if (acc[i][j] == m) first = j;
            best[i] = m;
            best_idx[i] = k0 + uint32_t(micro_offset(tx, first));
        }
    }
}

// Block (blockIdx.x, blockIdx.y): query rows [128 bx, +128) of xq (rows_p, dp) against code tiles
// [by * tiles_per_block, +tiles_per_block) of codes (n_tiles * 128, dp) with bias (n_tiles * 128).
// keys[r] (r < rows) ends as the min over blocks of (score_key << 32 | index).
__global__ void __launch_bounds__(kThreads, 2)
scan_kernel(const float* __restrict__ xq, const float* __restrict__ codes, const float* __restrict__ bias,
            int64_t dp, int n_slabs, int n_tiles, int tiles_per_block, int64_t rows,
            unsigned long long* __restrict__ keys) {
    __shared__ __align__(16) float xs[kResidentSlabs][kSlab][kPitch];
    __shared__ __align__(16) float cs[2][kSlab + 1][kPitch];  // row kSlab: the tile's bias

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int64_t m0 = int64_t(blockIdx.x) * kTile;
    const int kt_begin = blockIdx.y * tiles_per_block;
    const int kt_end = min(kt_begin + tiles_per_block, n_tiles);
    const bool resident = n_slabs <= kResidentSlabs;  // else xs[0..1] double-buffer the queries
    constexpr int kBiasCopies = kTile / 4;           // threads that copy the bias row, 16 bytes each

    // This thread's element of slab 0 of the block's queries, and of the current code slab.
    const int64_t own = (tid / kSlab) * dp + tid % kSlab;
    const float* x_src = xq + m0 * dp + own;
    const float* c_src = codes + int64_t(kt_begin) * kTile * dp + own;
    const float* b_src = bias + int64_t(kt_begin) * kTile + tid * 4;

    // Stage (kt_begin, slab 0), and every query slab when they fit.
    for (int s = 0; s < (resident ? n_slabs : 1); ++s) copy_slab(xs[s], x_src + s * kSlab, dp, tid);
    copy_slab(cs[0], c_src, dp, tid);
    if (tid < kBiasCopies) __pipeline_memcpy_async(&cs[0][kSlab][tid * 4], b_src, 4 * sizeof(float));
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();

    float acc[kMicro][kMicro], best[kMicro];
    uint32_t best_idx[kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) best[i] = __int_as_float(0x7f800000), best_idx[i] = 0;

    int buf = 0, s = 0, kt = kt_begin;
    for (;;) {
        int next_s = s + 1, next_kt = kt;
        if (next_s == n_slabs) next_s = 0, ++next_kt;
        const bool more = next_kt < kt_end;
        if (more) {  // fetch the next slab into the other buffer while this one is multiplied
            // The other buffer was last read before the previous barrier: safe to overwrite.
            c_src += next_s == 0 ? (kTile - 1) * dp + kSlab : kSlab;
            copy_slab(cs[buf ^ 1], c_src, dp, tid);
            if (!resident) copy_slab(xs[buf ^ 1], x_src + next_s * kSlab, dp, tid);
            if (next_s == 0) {
                b_src += kTile;
                if (tid < kBiasCopies) __pipeline_memcpy_async(&cs[buf ^ 1][kSlab][tid * 4], b_src, 4 * sizeof(float));
            }
            __pipeline_commit();
        }

        const float (*x_slab)[kPitch] = xs[resident ? s : buf];
        if (s == 0)
            accumulate<true>(acc, x_slab, cs[buf], tx, ty);
        else
            accumulate<false>(acc, x_slab, cs[buf], tx, ty);
        if (s == n_slabs - 1) update_best(acc, best, best_idx, uint32_t(kt) * kTile, tx);
        if (!more) break;

        __pipeline_wait_prior(0);
        __syncthreads();
        buf ^= 1, s = next_s, kt = next_kt;
    }

    // Row i's 16 candidates sit in the 16 lanes sharing ty (lane bits 0-3 = tx): shuffle-reduce.
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
        unsigned long long key = (static_cast<unsigned long long>(score_key(best[i])) << 32) | best_idx[i];
        for (int offset = 8; offset > 0; offset /= 2) key = min(key, __shfl_xor_sync(0xffffffffu, key, offset));
        const int64_t r = m0 + micro_offset(ty, i);
        if (tx == 0 && r < rows) atomicMin(keys + r, key);
    }
}

// indices[r], distances[r] = max(0, offset[r] + score) from keys[r], r < m.
__global__ void finish_kernel(const unsigned long long* __restrict__ keys, const float* __restrict__ offset,
                              double unscale, int64_t m, int32_t* __restrict__ indices, float* __restrict__ distances) {
    for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < m; r += int64_t(gridDim.x) * blockDim.x) {
        const unsigned long long key = keys[r];
        indices[r] = int32_t(uint32_t(key));
        if (distances) distances[r] = float(double(fmaxf(0.f, offset[r] + key_score(uint32_t(key >> 32)))) * unscale);
    }
}

// ---------------------------------------------------------------------------------------------
// Host side: per-device state and launchers.

const DeviceInfo& device_info(int device) {  // the device must be current
    static std::mutex mutex;
    static std::map<int, DeviceInfo> infos;  // never destroyed: pools outlive any static teardown
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = infos.find(device);
    if (found != infos.end()) return found->second;

    DeviceInfo info{};
    int sms = 0, per_sm = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, scan_kernel, kThreads, 0),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    info.resident_blocks = std::max(1, sms * per_sm);
    info.pool = device_pool(device);
    return infos.emplace(device, info).first->second;
}

unsigned grid_1d(int64_t n, int threads) { return unsigned(std::clamp<int64_t>(ceil_div(n, threads), 1, 1 << 20)); }

void prepare(const MatrixView& src, const RowTransform& tf, int64_t rows_p, int64_t dp, float* out, float* norm_out,
             double* squared_norms, unsigned long long* bad_row, int64_t row_base) {
    constexpr int kRowsPerBlock = 8;  // one warp per row
    prepare_rows<<<unsigned(ceil_div(rows_p, kRowsPerBlock)), 32 * kRowsPerBlock, 0, kStream>>>(
        src, tf, rows_p, dp, out, norm_out, squared_norms, bad_row, row_base);
    check_launch("prepare_rows");
}

void column_mean(const MatrixView& codes, float* mean, const DeviceInfo& info) {
    const int parts = int(std::min<int64_t>(ceil_div(codes.rows, 256), 4096));
    const int64_t rows_per_part = ceil_div(codes.rows, parts);
    Scratch<double> partial(int64_t(parts) * codes.cols, info.pool);
    column_sums<<<dim3(unsigned(ceil_div(codes.cols, 32)), unsigned(parts)), dim3(32, 8), 0, kStream>>>(
        codes, rows_per_part, partial.get());
    check_launch("column_sums");
    column_means<<<grid_1d(codes.cols, 256), 256, 0, kStream>>>(partial.get(), parts, codes.cols, codes.rows, mean);
    check_launch("column_means");
}

// The codebook's largest squared distance from `mean` (l2_scale's argument). Synchronises the stream.
double spread(const MatrixView& codes, const float* mean, const DeviceInfo& info) {
    constexpr int kRowsPerBlock = 8;  // one warp per row
    Scratch<unsigned long long> bits(1, info.pool);
    check(cudaMemsetAsync(bits.get(), 0, sizeof(unsigned long long), kStream), "cudaMemsetAsync");
    centred_spread<<<unsigned(ceil_div(codes.rows, kRowsPerBlock)), 32 * kRowsPerBlock, 0, kStream>>>(codes, mean,
                                                                                                       bits.get());
    check_launch("centred_spread");
    const unsigned long long value = copy_to_host(bits.get());
    double result;
    std::memcpy(&result, &value, sizeof result);
    return result;
}

// Code tiles per block for row_tiles x n_tiles of work: minimises (waves) x (tiles per block +
// a fixed per-block cost), so that small M still fills the device and the last wave is full.
int tiles_per_block(int64_t row_tiles, int n_tiles, int resident_blocks) {
    constexpr int kMaxWaves = 32;
    constexpr int64_t kBlockCost = 2;  // staging and merging, in tiles
    int best_tiles = n_tiles;
    int64_t best_cost = std::numeric_limits<int64_t>::max();
    for (int w = 1; w <= kMaxWaves; ++w) {
        const int64_t splits = std::clamp<int64_t>(int64_t(w) * resident_blocks / row_tiles, 1,
                                                   std::min<int64_t>(n_tiles, 65535));
        const int64_t tiles = ceil_div(n_tiles, splits);
        const int64_t blocks = row_tiles * ceil_div(n_tiles, tiles);
        const int64_t cost = ceil_div(blocks, resident_blocks) * (tiles + kBlockCost);
        if (cost < best_cost) best_cost = cost, best_tiles = int(tiles);
    }
    return best_tiles;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

cudaMemPool_t device_pool(int device) {
    static std::mutex mutex;
    static std::map<int, cudaMemPool_t> pools;  // never destroyed: pools outlive any static teardown
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = pools.find(device);
    if (found != pools.end()) return found->second;

    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool;
    check(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate");
    uint64_t keep = uint64_t(256) << 20;  // bytes left cached after a synchronisation
    const cudaError_t err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    if (err != cudaSuccess) {
        cudaMemPoolDestroy(pool);
        check(err, "cudaMemPoolSetAttribute");
    }
    return pools.emplace(device, pool).first->second;
}

int device_count() noexcept {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// Stream-ordered on the device's legacy default stream, like every kernel here: no device-wide
// synchronisation (cudaMalloc/cudaFree may synchronise the device).
void* device_alloc(size_t bytes, int device) {
    if (bytes == 0) return nullptr;
    DeviceGuard guard(device);
    void* ptr = nullptr;
    check(cudaMallocFromPoolAsync(&ptr, bytes, device_pool(device), kStream), "cudaMallocFromPoolAsync");
    return ptr;
}

// The block returns to the pool once the legacy default stream's earlier work is done; work on
// other non-blocking streams that still reads it must be finished by then (the owner's contract).
void device_free(void* ptr, int device) noexcept {
    if (!ptr) return;
    int previous = device;
    const bool switch_device = cudaGetDevice(&previous) == cudaSuccess && previous != device;
    if (switch_device) cudaSetDevice(device);
    cudaFreeAsync(ptr, kStream);
    if (switch_device) cudaSetDevice(previous);
}

DeviceCodebook::DeviceCodebook(const MatrixView& codes, Metric metric, int device)
    : size_(codes.rows), dim_(codes.cols), metric_(metric), device_(device) {
    check_codebook_shape(codes);
    DeviceGuard guard(device);
    const DeviceInfo& info = device_info(device);
    const int64_t kp = round_up(size_, kTile), dp = round_up(dim_, kSlab);
    try {
        codes_ = static_cast<float*>(device_alloc(size_t(kp * dp) * sizeof(float), device));
        bias_ = static_cast<float*>(device_alloc(size_t(kp) * sizeof(float), device));
        mean_ = static_cast<float*>(device_alloc(size_t(dim_) * sizeof(float), device));
        Scratch<double> squared_norms(size_, info.pool);
        Scratch<unsigned long long> bad_row(1, info.pool);
        check(cudaMemsetAsync(bad_row.get(), 0xff, sizeof(unsigned long long), kStream), "cudaMemsetAsync");
        if (metric == Metric::L2) {
            column_mean(codes, mean_, info);
            scale_ = l2_scale(spread(codes, mean_, info));
        } else {
            check(cudaMemsetAsync(mean_, 0, size_t(dim_) * sizeof(float), kStream), "cudaMemsetAsync");
        }
        const RowTransform tf{mean_, scale_, double(scale_) * scale_, false, metric == Metric::Cosine, 0.f,
                              std::numeric_limits<float>::infinity()};
        prepare(codes, tf, kp, dp, codes_, bias_, squared_norms.get(), bad_row.get(), 0);
        check_rows("codebook", bad_row.get(), squared_norms.get());
    } catch (...) {
        device_free(codes_, device);
        device_free(bias_, device);
        device_free(mean_, device);
        throw;
    }
}

DeviceCodebook::~DeviceCodebook() {
    device_free(codes_, device_);
    device_free(bias_, device_);
    device_free(mean_, device_);
}

void DeviceCodebook::nearest(const MatrixView& x, int32_t* indices, float* distances) const {
    check_dims(x, dim_);
    const int64_t m = x.rows;
    if (m == 0) return;
    DeviceGuard guard(device_);
    const DeviceInfo& info = device_info(device_);
    const int64_t dp = round_up(dim_, kSlab);
    const int n_tiles = int(ceil_div(size_, kTile));
    const int64_t chunk = std::max<int64_t>(kTile, kPrepFloats / dp / kTile * kTile);

    Scratch<unsigned long long> keys(m, info.pool), bad_row(1, info.pool);
    Scratch<double> squared_norms(m, info.pool);
    // offset takes the padding rows' norm outputs too, hence round_up(m, kTile).
    Scratch<float> offset(round_up(m, kTile), info.pool), xq(std::min(chunk, round_up(m, kTile)) * dp, info.pool);
    check(cudaMemsetAsync(keys.get(), 0xff, size_t(m) * sizeof(unsigned long long), kStream), "cudaMemsetAsync");
    check(cudaMemsetAsync(bad_row.get(), 0xff, sizeof(unsigned long long), kStream), "cudaMemsetAsync");

    const bool cosine = metric_ == Metric::Cosine;
    const double scale2 = double(scale_) * scale_;
    const RowTransform tf{mean_, cosine ? -1.f : -2.f * scale_, scale2, scale_ > 1.f, cosine, 1.f, 0.f};
    for (int64_t row0 = 0; row0 < m; row0 += chunk) {
        const int64_t rows = std::min(chunk, m - row0), rows_p = round_up(rows, kTile);
        const MatrixView part{x.data + row0 * x.row_stride, rows, x.cols, x.row_stride, x.col_stride};
        prepare(part, tf, rows_p, dp, xq.get(), offset.get() + row0, squared_norms.get() + row0, bad_row.get(), row0);

        const int64_t row_tiles = rows_p / kTile;
        const int tiles = tiles_per_block(row_tiles, n_tiles, info.resident_blocks);
        const dim3 grid(unsigned(row_tiles), unsigned(ceil_div(n_tiles, tiles)));
        scan_kernel<<<grid, kThreads, 0, kStream>>>(xq.get(), codes_, bias_, dp, int(dp / kSlab), n_tiles, tiles,
                                                    rows, keys.get() + row0);
        check_launch("scan_kernel");
    }
    finish_kernel<<<grid_1d(m, 256), 256, 0, kStream>>>(keys.get(), offset.get(), 1.0 / scale2, m, indices,
                                                         distances);
    check_launch("finish_kernel");
    check_rows("x", bad_row.get(), squared_norms.get());  // synchronises: the results are written
}

}  // namespace fullvq::cuda
