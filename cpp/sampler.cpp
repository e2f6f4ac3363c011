// The CPU sampler (see sampler.h for the semantics). Per output row, on one thread:
//   pass 1  guided logits (CFG only, into a buffer), their maximum, the finite-value checks
//   pass 2  weights w and the bucket of each scaled logit (sampler_kernels.h), their sum; with
//           top-k or top-p also a histogram (count, weight) of the buckets
//   select  each cut (top-k: a count, top-p: a weight) is found in the histogram, then refined among
//           the tokens of one bucket by radix digits of the ranking key, sorting once few are left:
//           O(V) whatever k and top_p, no full sort
//   draw    inverse CDF over the kept tokens in token index order
// The O(V) passes run in the best SIMD kernel of this CPU (sampler_rows.h). Rows are spread over
// threads; every sum over a row runs on one thread in a fixed order, so the tokens depend neither
// on the thread count nor on the kernel.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"
#include "sampler_kernels.h"

namespace fullvq {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr size_t kSortBelow = 256;  // candidate sets this small are sorted instead of split further
constexpr int64_t kMinLogitsPerThread = 1 << 16;  // below this, a thread costs more than it saves

const SamplerKernel* const kKernels[] = {  // best first
#ifdef FULLVQ_X86_KERNELS
    &kSamplerAvx512, &kSamplerAvx2,
#endif
    &kSamplerScalar};

const SamplerKernel& pick_kernel(const std::string& name) {
    for (const SamplerKernel* k : kKernels)
        if (name == "auto" ? k->supported() : name == k->name) {
            if (!k->supported())
                throw std::invalid_argument("kernel '" + name + "' is not supported by this CPU; use kernel='auto' or "
                                            "one of fullvq_rt.cpu_kernels()");
            return *k;
        }
    throw std::invalid_argument("unknown kernel '" + name + "': expected 'auto' or one of fullvq_rt.cpu_kernels()");
}

std::string number(double x) {
    char text[32];
    std::snprintf(text, sizeof text, "%g", x);
    return text;
}

// Count and weight of a set of tokens.
struct Tally {
    int64_t count = 0;
    double mass = 0.0;
    Tally& operator+=(const Tally& o) {
        count += o.count;
        mass += o.mass;
        return *this;
    }
};

// A cut of the ranking is reached once the prefix holds `count` tokens or `mass` weight.
struct Goal {
    int64_t count;
    double mass;
    bool met(const Tally& t) const { return t.count >= count || t.mass >= mass; }
};

// The prefix of the ranking that ends at token `index` (ranking key `key`), and its tally: token
// i is kept iff key_i > key, or key_i == key and i <= index.
struct Cut {
    int32_t key;
    int64_t index;
    Tally kept;
    bool before(const Cut& o) const { return key > o.key || (key == o.key && index < o.index); }
};

struct Histogram {
    std::vector<int64_t> count = std::vector<int64_t>(kSamplerBuckets);
    std::vector<double> mass = std::vector<double>(kSamplerBuckets);
    void clear() {
        std::fill(count.begin(), count.end(), 0);
        std::fill(mass.begin(), mass.end(), 0.0);
    }
    void add(int j, float w) {
        ++count[j];
        mass[j] += w;
    }
    // The first bucket (in index order) where the goal is met, or the last non-empty one; `above`
    // gains the tally of the buckets before it.
    int pick(const Goal& goal, Tally& above) const {
        int chosen = -1;
        Tally before = above;
        for (int j = 0; j < kSamplerBuckets; ++j) {
            if (!count[j]) continue;
            chosen = j;
            before = above;
            above += Tally{count[j], mass[j]};
            if (goal.met(above)) break;
        }
        above = before;
        return chosen;
    }
};

// Per-thread buffers of V entries, kept between calls: fresh ones would cost page faults every call.
struct Workspace {
    std::vector<float> guided, weight;
    std::vector<uint16_t> bucket;
    std::vector<int32_t> candidates;
    Histogram first, digits;
    void fit(int64_t v, bool guided_rows) {
        if (guided_rows && int64_t(guided.size()) < v) guided.resize(v);
        if (int64_t(weight.size()) < v) weight.resize(v), bucket.resize(v), candidates.resize(v);
    }
};

// The idle workspaces, at most one per core.
class WorkspacePool {
public:
    std::unique_ptr<Workspace> take() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (idle_.empty()) return std::make_unique<Workspace>();
        std::unique_ptr<Workspace> ws = std::move(idle_.back());
        idle_.pop_back();
        return ws;
    }
    void give(std::unique_ptr<Workspace> ws) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (int(idle_.size()) < available_cores()) idle_.push_back(std::move(ws));
    }

private:
    std::mutex mutex_;
    std::vector<std::unique_ptr<Workspace>> idle_;
};

WorkspacePool workspaces;

// One output row: its logits g (the input row, or the guided buffer), weights and buckets.
struct Row {
    const float* g;
    const float* w;
    const uint16_t* bucket;
    int64_t v;
};

// The exact flags of a row, for the error message of a row that pass 1 found bad.
uint32_t row_flags(const float* x, int64_t v) {
    uint32_t flags = 0;
    for (int64_t i = 0; i < v; ++i) flags |= value_flags(x[i]);
    return flags;
}

// The cut of the ranking where `goal` is met (the last token if rounding keeps the weight goal
// just out of reach). Tokens of higher buckets rank higher (the bucket falls as g falls), so the
// cut lies in the bucket the histogram picks; inside it, radix digits of the inverted ranking key
// (most significant first) narrow the candidates, which are then sorted by rank.
Cut select(const SamplerKernel& kernel, const Row& row, const Goal& goal, Workspace& ws) {
    Tally above;
    const int chosen = ws.first.pick(goal, above);
    int32_t* cand = ws.candidates.data();
    int32_t* end = cand + kernel.collect(row.bucket, row.v, uint16_t(chosen), cand);

    // digit of the ranking key as unsigned, inverted (digit 0 ranks highest); 11, 11 and 10 bits
    const auto digit = [&](int32_t i, int shift) {
        return int(((uint32_t(rank_key(row.g[i])) ^ 0x7FFFFFFFu) >> shift) & (kSamplerBuckets - 1));
    };
    for (int shift : {21, 10, 0}) {
        if (size_t(end - cand) <= kSortBelow) break;
        ws.digits.clear();
        for (const int32_t* i = cand; i != end; ++i) ws.digits.add(digit(*i, shift), row.w[*i]);
        const int d = ws.digits.pick(goal, above);
        end = std::remove_if(cand, end, [&](int32_t i) { return digit(i, shift) != d; });
    }
    std::sort(cand, end, [&](int32_t a, int32_t b) {
        const int32_t ka = rank_key(row.g[a]), kb = rank_key(row.g[b]);
        return ka > kb || (ka == kb && a < b);
    });
    for (const int32_t* i = cand; i != end; ++i) {
        above += Tally{1, row.w[*i]};
        if (goal.met(above) || i + 1 == end) return Cut{rank_key(row.g[*i]), *i, above};
    }
    throw std::logic_error("sampler: the selected bucket is empty");
}

// Samples output row b; writes the flags of its rows and returns its token (0 for a bad row).
int32_t sample_row(const SamplerKernel& kernel, const MatrixView& logits, int64_t b, int64_t batch,
                   const SamplingParams& p, Workspace& ws, uint32_t* input_flags, uint32_t* guided_flags) {
    const int64_t v = logits.cols;
    const float* cond = logits.data + b * logits.row_stride;
    Row row{cond, ws.weight.data(), ws.bucket.data(), v};
    bool clean = true;
    float top;
    if (guided_flags) {
        const float* uncond = logits.data + (b + batch) * logits.row_stride;
        row.g = ws.guided.data();
        top = kernel.guide(cond, uncond, float(p.cfg_scale), v, ws.guided.data(), &clean);
        const bool good = clean && top > -kInf;
        input_flags[b] = good ? kRowFinite : row_flags(cond, v);
        input_flags[b + batch] = good ? kRowFinite : row_flags(uncond, v);
        guided_flags[b] = good ? kRowFinite : row_flags(row.g, v);
        if (!good) return 0;
    } else {
        top = kernel.scan(cond, v, &clean);
        input_flags[b] = clean && top > -kInf ? kRowFinite : row_flags(cond, v);
        if (input_flags[b] != kRowFinite) return 0;
    }

    const bool top_k = p.top_k > 0 && p.top_k < v, top_p = p.top_p < 1.0;
    const double total = kernel.weigh(row.g, v, top, inverse_temperature(p.temperature), ws.weight.data(),
                                      top_k || top_p ? ws.bucket.data() : nullptr);
    Cut cut{std::numeric_limits<int32_t>::min(), v, Tally{v, total}};  // everything
    if (top_k || top_p) {
        ws.first.clear();
        for (int64_t i = 0; i < v; ++i) ws.first.add(row.bucket[i], row.w[i]);
    }
    if (top_k) cut = select(kernel, row, Goal{p.top_k, kInf}, ws);
    if (top_p) {
        const Goal nucleus_weight{std::numeric_limits<int64_t>::max(), p.top_p * cut.kept.mass};
        const Cut nucleus = select(kernel, row, nucleus_weight, ws);
        if (nucleus.before(cut)) cut = nucleus;
    }
    const double u = philox_uniform(p.seed, p.step, uint64_t(b));
    return kernel.draw(row.g, row.w, v, cut.key, cut.index, u * cut.kept.mass);
}

}  // namespace

int64_t check_sampling(const MatrixView& logits, const SamplingParams& p) {
    if (!(std::isfinite(p.cfg_scale) && p.cfg_scale >= 0.0))
        throw std::invalid_argument("cfg_scale must be finite and >= 0 (1.0 = no guidance), got " +
                                    number(p.cfg_scale));
    if (!(std::isfinite(p.temperature) && p.temperature > 0.0))
        throw std::invalid_argument("temperature must be finite and > 0, got " + number(p.temperature));
    if (p.top_k < 0) throw std::invalid_argument("top_k must be >= 0 (0 = off), got " + std::to_string(p.top_k));
    if (!(p.top_p > 0.0 && p.top_p <= 1.0))
        throw std::invalid_argument("top_p must be in (0, 1] (1.0 = off), got " + number(p.top_p));
    const std::string shape = "(" + std::to_string(logits.rows) + ", " + std::to_string(logits.cols) + ")";
    if (logits.cols < 1) throw std::invalid_argument("logits has shape " + shape + ": expected (R, V) with V >= 1");
    if (logits.cols > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("logits has " + std::to_string(logits.cols) +
                                    " columns: at most 2**31 - 1 are supported (int32 tokens)");
    if (logits.rows > 0 && logits.cols > 1 && logits.col_stride != 1)
        throw std::invalid_argument("logits columns must be contiguous (column stride 1, got " +
                                    std::to_string(logits.col_stride) + "): pass a C-contiguous array");
    if (p.cfg_scale == 1.0) return logits.rows;
    if (logits.rows % 2)
        throw std::invalid_argument("logits has shape " + shape + " but cfg_scale=" + number(p.cfg_scale) +
                                    " needs an even number of rows: [0, B) conditional, [B, 2B) unconditional");
    return logits.rows / 2;
}

void check_row_flags(const uint32_t* input, int64_t rows, const uint32_t* guided, int64_t batch) {
    for (int64_t r = 0; r < rows; ++r) {
        const std::string name = "logits row " + std::to_string(r);
        if (input[r] & kRowNaN) throw std::invalid_argument(name + " contains NaN");
        if (input[r] & kRowPosInf)
            throw std::invalid_argument(name + " contains +inf: only -inf (a masked token) may be non-finite");
        if (!(input[r] & kRowFinite))
            throw std::invalid_argument(name + " is all -inf: at least one token must have a finite logit");
    }
    for (int64_t b = 0; guided && b < batch; ++b) {
        if (guided[b] & (kRowNaN | kRowPosInf))
            throw std::invalid_argument("the guided logits of row " + std::to_string(b) +
                                        " overflow float32: lower cfg_scale or the magnitude of the logits");
        if (!(guided[b] & kRowFinite))
            throw std::invalid_argument("every token of guided row " + std::to_string(b) +
                                        " is masked: a token that is -inf in row " + std::to_string(b) + " or row " +
                                        std::to_string(b + batch) + " is -inf after guidance");
    }
}

void sample(const MatrixView& logits, const SamplingParams& p, int32_t* tokens, int threads,
            const std::string& kernel_name) {
    const int64_t batch = check_sampling(logits, p);
    const SamplerKernel& kernel = pick_kernel(kernel_name);
    if (batch == 0) return;
    const bool cfg = batch != logits.rows;
    std::vector<uint32_t> input_flags(logits.rows, 0), guided_flags(cfg ? batch : 0, 0);
    const int cores = threads > 0 ? threads : available_cores();
    const int64_t by_work = std::max<int64_t>(1, logits.rows * logits.cols / kMinLogitsPerThread);
    const int tasks = int(std::min<int64_t>({cores, batch, by_work}));
    parallel_for(tasks, [&](int t) {
        std::unique_ptr<Workspace> ws = workspaces.take();
        ws->fit(logits.cols, cfg);
        for (int64_t b = batch * t / tasks; b < batch * (t + 1) / tasks; ++b)
            tokens[b] = sample_row(kernel, logits, b, batch, p, *ws, input_flags.data(),
                                   cfg ? guided_flags.data() : nullptr);
        workspaces.give(std::move(ws));
    });
    check_row_flags(input_flags.data(), logits.rows, cfg ? guided_flags.data() : nullptr, batch);
}

}  // namespace fullvq
