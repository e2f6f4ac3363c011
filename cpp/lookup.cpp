#include "lookup.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "checks.h"
#include "kernels.h"
#include "parallel.h"

namespace fullvq {
namespace {

const Kernel* const kKernels[] = {  // best first
#ifdef FULLVQ_X86_KERNELS
    &kAvx512Kernel, &kAvx2Kernel,
#endif
    &kScalarKernel};

// Packed codes scanned per chunk: sized to stay resident in a core's L2 cache.
constexpr int64_t kChunkBytes = 256 * 1024;
// Below this many multiply-adds per thread, starting a thread costs more than it saves.
constexpr double kMinWorkPerThread = 4.0 * (1 << 20);

const Kernel& pick_kernel(const std::string& name) {
    std::string names;
    for (const Kernel* k : kKernels) {
        if (name == "auto" ? k->supported() : name == k->name) {
            if (!k->supported())
                throw std::invalid_argument("kernel '" + name + "' is not supported by this CPU; use "
                                            "kernel='auto' or one of fullvq_rt.cpu_kernels()");
            return *k;
        }
        names += std::string(names.empty() ? "" : ", ") + "'" + k->name + "'";
    }
    throw std::invalid_argument("unknown kernel '" + name + "': expected 'auto' or one of " + names);
}

// Rejects NaN/Inf and rows whose squared norm could overflow the float32 distance arithmetic;
// returns the column means (the l2 centring offset) and, if asked, the mean squared norm.
std::vector<float> check_rows(const MatrixView& m, const char* what, double* mean_squared_norm = nullptr) {
    std::vector<double> sum(m.cols, 0.0);
    double total = 0.0;
    for (int64_t r = 0; r < m.rows; ++r) {
        double sq = 0.0;
        for (int64_t c = 0; c < m.cols; ++c) {
            const float v = m.at(r, c);
            sq += double(v) * v;
            sum[c] += v;
        }
        if (!(sq <= kMaxSquaredNorm)) reject_row(what, r, sq);  // NaN or Inf make sq non-finite
        total += sq;
    }
    if (mean_squared_norm) *mean_squared_norm = m.rows ? total / double(m.rows) : 0.0;
    std::vector<float> mean(m.cols);
    for (int64_t c = 0; c < m.cols; ++c) mean[c] = m.rows ? float(sum[c] / m.rows) : 0.f;
    return mean;
}

// Row r transformed for the metric: l2 -> (v - mean) * scale, cosine -> v / |v| (zero stays zero).
// Returns the squared norm of the result before the scale (l2) or 1 (cosine, nonzero rows).
double transform_row(const MatrixView& m, int64_t r, Metric metric, const float* mean, float scale, float* out) {
    double sq = 0.0;
    for (int64_t c = 0; c < m.cols; ++c) {
        out[c] = metric == Metric::L2 ? m.at(r, c) - mean[c] : m.at(r, c);
        sq += double(out[c]) * out[c];
    }
    if (metric == Metric::Cosine && sq > 0.0) {
        const double inv = 1.0 / std::sqrt(sq);
        for (int64_t c = 0; c < m.cols; ++c) out[c] = float(out[c] * inv);
        sq = 1.0;
    }
    if (scale != 1.f)
        for (int64_t c = 0; c < m.cols; ++c) out[c] *= scale;
    return sq;
}

// The l2 codebook's largest squared distance from its mean, in double (see l2_scale).
double centred_spread(const MatrixView& codes, const float* mean) {
    double spread = 0.0;
    for (int64_t r = 0; r < codes.rows; ++r) {
        double sq = 0.0;
        for (int64_t c = 0; c < codes.cols; ++c) {
            const float t = codes.at(r, c) - mean[c];
            sq += double(t) * t;
        }
        spread = std::max(spread, sq);
    }
    return spread;
}

// The column means (zeros for cosine) and the power-of-two scale of a checked codebook.
std::pair<std::vector<float>, float> centring(const MatrixView& codes, Metric metric) {
    double mean_sq = 0.0;
    std::vector<float> mean = check_rows(codes, "codebook", &mean_sq);
    if (metric == Metric::Cosine) {
        std::fill(mean.begin(), mean.end(), 0.f);
        return {mean, 1.f};
    }
    // The codes' mean squared distance from their mean is mean_sq - |mean|^2, and the spread (the
    // largest) is at least that. Rounding (the float32 mean, sums of up to 2^31 rows in double)
    // stays under 1e-5 mean_sq: when the difference is 1 or more past it, the scale is 1 and the
    // second pass over the codebook is skipped.
    double mean_norm = 0.0;
    for (const float v : mean) mean_norm += double(v) * v;
    if (mean_sq - mean_norm - 1e-5 * mean_sq >= 1.0) return {mean, 1.f};
    return {mean, l2_scale(centred_spread(codes, mean.data()))};
}

int64_t panel_count(int64_t codes, int width) { return (codes + width - 1) / width; }

// Packs panels [panel0, panel0 + n) of the codebook: panels (n, D, P) and bias (n * P).
void pack_panels(const MatrixView& codes, Metric metric, const float* mean, float scale, int width, int64_t panel0,
                 int64_t n, float* panels, float* bias) {
    const int64_t d = codes.cols;
    std::vector<float> row(d);
    for (int64_t i = 0; i < n * width; ++i) {
        const int64_t k = panel0 * width + i;
        float* dst = panels + (i / width) * d * width + (i % width);
        if (k < codes.rows) {
            const double sq = transform_row(codes, k, metric, mean, scale, row.data());
            bias[i] = metric == Metric::L2 ? float(sq * scale * scale) : 0.f;
            for (int64_t c = 0; c < d; ++c) dst[c * width] = row[c];
        } else {  // padding: never chosen
            bias[i] = std::numeric_limits<float>::infinity();
            for (int64_t c = 0; c < d; ++c) dst[c * width] = 0.f;
        }
    }
}

// Queries prepared for the kernel: rows (M, D) = -2 (x - mean) * scale or -x/|x|, the per-row
// offset that turns the kernel's minimum into a distance, and 1 / scale^2, which undoes the scale.
struct Queries {
    std::vector<float> rows;
    std::vector<float> offset;
    double unscale;
};

Queries prepare_queries(const MatrixView& x, Metric metric, const float* mean, float scale) {
    check_rows(x, "x");
    const double scale2 = double(scale) * scale;
    Queries q{std::vector<float>(x.rows * x.cols), std::vector<float>(x.rows), 1.0 / scale2};
    for (int64_t r = 0; r < x.rows; ++r) {
        float* out = q.rows.data() + r * x.cols;
        const double sq = transform_row(x, r, metric, mean, metric == Metric::L2 ? -2.f * scale : -1.f, out);
        if (scale > 1.f && !(sq * scale2 <= kMaxSquaredNorm)) reject_far_row(r);
        q.offset[r] = metric == Metric::L2 ? float(sq * scale2) : 1.f;
    }
    return q;
}

int64_t chunk_panels(int64_t d, int width) {
    return std::max<int64_t>(1, kChunkBytes / int64_t(sizeof(float) * d * width));
}

int thread_count(int requested, int64_t m, int64_t k, int64_t d) {
    const int cores = requested > 0 ? requested : available_cores();
    const double work = double(m) * double(k) * double(d + 2);
    return int(std::max(1.0, std::min<double>(cores, work / kMinWorkPerThread)));
}

// Splits the scan over threads and merges their results. `chunk(t, panel0, n)` returns the packed
// panels and bias of [panel0, panel0 + n) for thread t. With many panels, each thread takes a
// contiguous range of codes for all rows (merged afterwards in code order, so ties still go to
// the lowest index); with few, each thread takes a range of rows.
template <class ChunkFn>
void run_scan(const Kernel& kernel, const Queries& q, int64_t m, int64_t d, int64_t n_panels, int threads,
              int32_t* indices, float* distances, ChunkFn&& chunk) {
    if (m == 0) return;
    const int64_t per_chunk = chunk_panels(d, kernel.panel_width);
    const bool split_codes = n_panels >= 2 * int64_t(threads) || m < int64_t(threads);
    const int tasks = int(std::min<int64_t>(threads, split_codes ? n_panels : m));

    std::vector<float> best(size_t(split_codes ? tasks : 1) * m, std::numeric_limits<float>::infinity());
    std::vector<int32_t> best_idx(best.size(), 0);

    parallel_for(tasks, [&](int t) {
        int64_t row0 = 0, rows = m, p0 = 0, p1 = n_panels;
        float* bv = best.data();
        int32_t* bi = best_idx.data();
        if (split_codes) {
            p0 = n_panels * t / tasks;
            p1 = n_panels * (t + 1) / tasks;
            bv += t * m;
            bi += t * m;
        } else {
            row0 = m * t / tasks;
            rows = m * (t + 1) / tasks - row0;
            bv += row0;
            bi += row0;
        }
        for (int64_t p = p0; p < p1; p += per_chunk) {
            const int64_t n = std::min(per_chunk, p1 - p);
            const auto [panels, bias] = chunk(t, p, n);
            kernel.scan(ScanArgs{q.rows.data() + row0 * d, rows, d, panels, bias, n, p * kernel.panel_width, bv, bi});
        }
    });

    for (int t = 1; t < (split_codes ? tasks : 1); ++t)
        for (int64_t i = 0; i < m; ++i)
            if (best[t * m + i] < best[i]) {
                best[i] = best[t * m + i];
                best_idx[i] = best_idx[t * m + i];
            }
    for (int64_t i = 0; i < m; ++i) {
        indices[i] = best_idx[i];
        if (distances) distances[i] = float(std::max(0.f, q.offset[i] + best[i]) * q.unscale);
    }
}

}  // namespace

Metric parse_metric(const std::string& name) {
    if (name == "l2") return Metric::L2;
    if (name == "cosine") return Metric::Cosine;
    throw std::invalid_argument("unknown metric '" + name + "': expected 'l2' or 'cosine'");
}

std::vector<std::string> available_kernels() {
    std::vector<std::string> names;
    for (const Kernel* k : kKernels)
        if (k->supported()) names.emplace_back(k->name);
    return names;
}

Codebook::Codebook(const MatrixView& codes, Metric metric, const std::string& kernel)
    : size_(codes.rows), dim_(codes.cols), metric_(metric), kernel_(&pick_kernel(kernel)) {
    check_codebook_shape(codes);
    std::tie(mean_, scale_) = centring(codes, metric);
    const int width = kernel_->panel_width;
    const int64_t n_panels = panel_count(size_, width);
    panels_.resize(size_t(n_panels) * dim_ * width);
    bias_.resize(size_t(n_panels) * width);
    const int tasks = thread_count(0, size_, 1, dim_);  // packing costs about K * D
    parallel_for(tasks, [&](int t) {
        const int64_t p0 = n_panels * t / tasks, p1 = n_panels * (t + 1) / tasks;
        pack_panels(codes, metric_, mean_.data(), scale_, width, p0, p1 - p0, panels_.data() + p0 * dim_ * width,
                    bias_.data() + p0 * width);
    });
}

const char* Codebook::kernel_name() const { return kernel_->name; }

void Codebook::nearest(const MatrixView& x, int32_t* indices, float* distances, int threads) const {
    check_dims(x, dim_);
    const Queries q = prepare_queries(x, metric_, mean_.data(), scale_);
    const int width = kernel_->panel_width;
    run_scan(*kernel_, q, x.rows, dim_, panel_count(size_, width), thread_count(threads, x.rows, size_, dim_),
             indices, distances, [&](int, int64_t p, int64_t) {
                 return std::pair<const float*, const float*>(panels_.data() + p * dim_ * width,
                                                              bias_.data() + p * width);
             });
}

void nearest(const MatrixView& x, const MatrixView& codes, Metric metric, int32_t* indices, float* distances,
             int threads, const std::string& kernel_name) {
    check_codebook_shape(codes);
    check_dims(x, codes.cols);
    const Kernel& kernel = pick_kernel(kernel_name);
    std::vector<float> mean;
    float scale;
    std::tie(mean, scale) = centring(codes, metric);
    const Queries q = prepare_queries(x, metric, mean.data(), scale);

    const int width = kernel.panel_width;
    const int64_t d = codes.cols;
    const int64_t per_chunk = chunk_panels(d, width);
    const int n_threads = thread_count(threads, x.rows, codes.rows, d);
    std::vector<std::vector<float>> panels(n_threads), bias(n_threads);
    run_scan(kernel, q, x.rows, d, panel_count(codes.rows, width), n_threads, indices, distances,
             [&](int t, int64_t p, int64_t n) {
                 panels[t].resize(size_t(per_chunk) * d * width);
                 bias[t].resize(size_t(per_chunk) * width);
                 pack_panels(codes, metric, mean.data(), scale, width, p, n, panels[t].data(), bias[t].data());
                 return std::pair<const float*, const float*>(panels[t].data(), bias[t].data());
             });
}

}  // namespace fullvq
