// The sampler on a CUDA device (see sampler_cuda.h; semantics in sampler.h). One block per output
// row, on the legacy default stream, with scratch from the device's memory pool (cuda_memory.h):
//   weigh_rows    guided logits g, their maximum, the row flags, weights w and their sum; with
//                 top-k or top-p also the sort keys (row, inverted ranking key) and token indices
//   (host)        row flags -> ValueError for bad logits (synchronises)
//   radix sort    (only with top-k or top-p) the whole batch at once, stable: each row's tokens in
//                 ranking order, equal logits by lower index; ping-pongs between two buffers of
//                 keys and indices (cub::DoubleBuffer), so CUB allocates no third copy
//   choose_rows   the cut (top-k: a count; top-p: a scan of the sorted weights), then the Philox
//                 draw: a scan of the kept weights in token index order
// The block reductions and scans have a fixed order, so the tokens are deterministic.
#include "sampler_cuda.h"

#include "cuda_errors.h"
#include "cuda_memory.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace fullvq::cuda {
namespace {

constexpr int kThreads = 512;  // per block (one output row)
constexpr int kItems = 4;      // consecutive tokens per thread per scan step

struct MaxOp {
    template <class T>
    __device__ T operator()(const T& a, const T& b) const { return a < b ? b : a; }
};

using FloatReduce = cub::BlockReduce<float, kThreads>;
using DoubleReduce = cub::BlockReduce<double, kThreads>;
using IndexReduce = cub::BlockReduce<long long, kThreads>;
using DoubleScan = cub::BlockScan<double, kThreads>;

union TempStorage {
    typename FloatReduce::TempStorage float_reduce;
    typename DoubleReduce::TempStorage double_reduce;
    typename IndexReduce::TempStorage index_reduce;
    typename DoubleScan::TempStorage scan;
};

// The block-wide sum of value(i) over i in [0, n), in a fixed order; valid in every thread.
template <class Value>
__device__ double block_sum(int64_t n, Value value, TempStorage& tmp) {
    __shared__ double result;
    double local = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) local += value(i);
    local = DoubleReduce(tmp.double_reduce).Sum(local);
    if (threadIdx.x == 0) result = local;
    __syncthreads();
    const double total = result;
    __syncthreads();
    return total;
}

// The first i in [0, n) with value(i) > 0 whose inclusive prefix sum is >= target (> target if
// strict), or -1; valid in every thread.
template <class Value>
__device__ int64_t first_reaching(int64_t n, Value value, double target, bool strict, TempStorage& tmp) {
    __shared__ unsigned long long found;
    double carry = 0.0;
    for (int64_t base = 0; base < n; base += int64_t(kThreads) * kItems) {
        const int64_t first = base + int64_t(threadIdx.x) * kItems;
        double items[kItems], local = 0.0;
        for (int k = 0; k < kItems; ++k) {
            items[k] = first + k < n ? value(first + k) : 0.0;
            local += items[k];
        }
        double before, chunk;
        DoubleScan(tmp.scan).ExclusiveSum(local, before, chunk);
        if (threadIdx.x == 0) found = ~0ull;
        __syncthreads();
        double cum = carry + before;
        for (int k = 0; k < kItems; ++k) {
            cum += items[k];
            if (items[k] > 0.0 && (strict ? cum > target : cum >= target)) {
                atomicMin(&found, static_cast<unsigned long long>(first + k));
                break;
            }
        }
        __syncthreads();
        const unsigned long long hit = found;
        __syncthreads();
        if (hit != ~0ull) return int64_t(hit);
        carry += chunk;
    }
    return -1;
}

// Block b: guided logits g, row flags (input rows [0, R), guided rows at R + b), weights w; with
// keys, also the sort keys (b << 32 | the ranking key as unsigned, inverted: ascending = best first)
// and the token indices.
__global__ void __launch_bounds__(kThreads)
weigh_rows(MatrixView x, int64_t batch, bool guided, float scale, float inv_t, float* __restrict__ g,
           float* __restrict__ w, unsigned long long* __restrict__ keys, int32_t* __restrict__ index,
           uint32_t* __restrict__ flags) {
    __shared__ TempStorage tmp;
    __shared__ float row_max;
    const int64_t b = blockIdx.x, v = x.cols;
    const float* cond = x.data + b * x.row_stride;
    const float* uncond = guided ? x.data + (b + batch) * x.row_stride : nullptr;
    float* gb = g + b * v;
    float* wb = w + b * v;

    float top = -__builtin_huge_valf();
    uint32_t fc = 0, fu = 0, fg = 0;
    for (int64_t i = threadIdx.x; i < v; i += kThreads) {
        const float c = cond[i];
        float gi = c;
        fc |= value_flags(c);
        if (guided) {
            const float u = uncond[i];
            fu |= value_flags(u);
            gi = guided_logit(c, u, scale);
            fg |= value_flags(gi);
        }
        gb[i] = gi;
        top = fmaxf(top, gi);
    }
    fc = __reduce_or_sync(~0u, fc);
    fu = __reduce_or_sync(~0u, fu);
    fg = __reduce_or_sync(~0u, fg);
    if (threadIdx.x % 32 == 0) {
        atomicOr(flags + b, fc);
        if (guided) {
            atomicOr(flags + b + batch, fu);
            atomicOr(flags + 2 * batch + b, fg);
        }
    }
    top = FloatReduce(tmp.float_reduce).Reduce(top, MaxOp());
    if (threadIdx.x == 0) row_max = top;
    __syncthreads();
    top = row_max;

    for (int64_t i = threadIdx.x; i < v; i += kThreads) {
        wb[i] = exp_nonpositive((gb[i] - top) * inv_t);
        if (keys) {
            keys[b * v + i] = (static_cast<unsigned long long>(b) << 32) | (uint32_t(rank_key(gb[i])) ^ 0x7FFFFFFFu);
            index[b * v + i] = int32_t(i);
        }
    }
}

// Block b: the cut of row b (everything without `sorted`; else the first `count` tokens of the
// ranking, shortened to the top_p nucleus when top_p < 1), then the draw.
__global__ void __launch_bounds__(kThreads)
choose_rows(int64_t v, const float* __restrict__ g, const float* __restrict__ w, const int32_t* __restrict__ sorted,
            int64_t count, double top_p, uint64_t seed, uint64_t step, int32_t* __restrict__ tokens) {
    __shared__ TempStorage tmp;
    const int64_t b = blockIdx.x;
    const float* gb = g + b * v;
    const float* wb = w + b * v;

    int32_t cut_key = INT32_MIN;  // below every logit's key: keeps all
    int64_t cut_index = v;
    if (sorted) {
        const int32_t* sb = sorted + b * v;
        const auto ranked_weight = [&](int64_t r) { return double(wb[sb[r]]); };
        int64_t last = count - 1;
        if (top_p < 1.0) {
            const double kept = block_sum(count, ranked_weight, tmp);
            const int64_t hit = first_reaching(count, ranked_weight, top_p * kept, false, tmp);
            if (hit >= 0) last = hit;
        }
        cut_index = sb[last];
        cut_key = rank_key(gb[cut_index]);
    }
    const auto kept_weight = [&](int64_t i) {
        const int32_t k = rank_key(gb[i]);
        return k > cut_key || (k == cut_key && i <= cut_index) ? double(wb[i]) : 0.0;
    };
    const double total = block_sum(v, kept_weight, tmp);
    const double target = philox_uniform(seed, step, uint64_t(b)) * total;
    int64_t token = first_reaching(v, kept_weight, target, true, tmp);
    if (token < 0) {  // rounding left the target out of reach: the last kept token of positive weight
        long long last = -1;
        for (int64_t i = threadIdx.x; i < v; i += kThreads)
            if (kept_weight(i) > 0.0) last = i;
        token = IndexReduce(tmp.index_reduce).Reduce(last, MaxOp());
    }
    if (threadIdx.x == 0) tokens[b] = int32_t(token);
}

}  // namespace

void sample(const MatrixView& logits, const SamplingParams& p, int32_t* tokens, int device) {
    const int64_t batch = check_sampling(logits, p);
    if (batch == 0) return;
    const int64_t rows = logits.rows, v = logits.cols, n = batch * v;
    const bool guided = batch != rows, top_k = p.top_k > 0 && p.top_k < v, ranked = top_k || p.top_p < 1.0;
    DeviceGuard guard(device);
    const cudaMemPool_t pool = device_pool(device);

    Scratch<float> g(n, pool), w(n, pool);
    Scratch<uint32_t> flags(rows + (guided ? batch : 0), pool);
    Scratch<unsigned long long> keys(ranked ? 2 * n : 0, pool);  // the sort's two key buffers
    Scratch<int32_t> index(ranked ? 2 * n : 0, pool);            // and two index buffers
    check(cudaMemsetAsync(flags.get(), 0, size_t(rows + (guided ? batch : 0)) * sizeof(uint32_t), kStream),
          "cudaMemsetAsync");
    weigh_rows<<<unsigned(batch), kThreads, 0, kStream>>>(logits, batch, guided, float(p.cfg_scale),
                                                           inverse_temperature(p.temperature), g.get(), w.get(),
                                                           keys.get(), index.get(), flags.get());
    check(cudaGetLastError(), "weigh_rows");

    std::vector<uint32_t> host_flags(size_t(rows + (guided ? batch : 0)));
    check(cudaMemcpyAsync(host_flags.data(), flags.get(), host_flags.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost,
                          kStream),
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(kStream), "cudaStreamSynchronize");
    check_row_flags(host_flags.data(), rows, guided ? host_flags.data() + rows : nullptr, batch);

    const int32_t* sorted = nullptr;
    if (ranked) {
        int row_bits = 0;
        while ((int64_t(1) << row_bits) < batch) ++row_bits;
        // weigh_rows wrote the first halves; the sort may overwrite either half and says which
        // holds the result (Current()).
        cub::DoubleBuffer<unsigned long long> key_buffers(keys.get(), keys.get() + n);
        cub::DoubleBuffer<int32_t> index_buffers(index.get(), index.get() + n);
        size_t bytes = 0;
        const auto sort = [&](void* temp) {
            check(cub::DeviceRadixSort::SortPairs(temp, bytes, key_buffers, index_buffers, n, 0, 32 + row_bits,
                                                  kStream),
                  "cub::DeviceRadixSort::SortPairs");
        };
        sort(nullptr);  // sizes the temporary storage (small: no copy of keys or indices)
        const Scratch<unsigned char> temp(int64_t(bytes), pool);
        sort(temp.get());
        sorted = index_buffers.Current();
    }
    choose_rows<<<unsigned(batch), kThreads, 0, kStream>>>(v, g.get(), w.get(), sorted, top_k ? p.top_k : v, p.top_p,
                                                            p.seed, p.step, tokens);
    check(cudaGetLastError(), "choose_rows");
    check(cudaStreamSynchronize(kStream), "cudaStreamSynchronize");
}

}  // namespace fullvq::cuda
