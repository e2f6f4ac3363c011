// Python bindings of the core (the only file that sees Python headers). Arrays arrive as
// untyped nanobind ndarrays and are checked here, so that a wrong dtype, shape or device is a
// ValueError naming expected vs actual rather than a generic TypeError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "gather.h"
#include "generation.h"
#include "lookup.h"
#include "lookup_cuda.h"
#include "sampler.h"
#include "sampler_cuda.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace fullvq {
namespace {

using AnyArray = nb::ndarray<nb::ro>;

std::string shape_of(const AnyArray& a) {
    std::string s = "(";
    for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string dtype_name(nb::dlpack::dtype t) {
    const char* kind = t.code == uint8_t(nb::dlpack::dtype_code::Float)    ? "float"
                       : t.code == uint8_t(nb::dlpack::dtype_code::Int)    ? "int"
                       : t.code == uint8_t(nb::dlpack::dtype_code::UInt)   ? "uint"
                       : t.code == uint8_t(nb::dlpack::dtype_code::Bool)   ? "bool"
                       : t.code == uint8_t(nb::dlpack::dtype_code::Complex) ? "complex"
                                                                             : "bfloat";
    return t.code == uint8_t(nb::dlpack::dtype_code::Bool) ? "bool" : kind + std::to_string(t.bits);
}

bool on_cuda(const AnyArray& a) { return a.device_type() == nb::device::cuda::value; }

// A float32 (rows, cols) view of `a`, or std::invalid_argument naming what was expected.
MatrixView matrix_view(const AnyArray& a, const char* name, const char* expected_shape) {
    if (a.dtype() != nb::dtype<float>())
        throw std::invalid_argument(std::string(name) + " must be float32, got " + dtype_name(a.dtype()));
    if (a.ndim() != 2)
        throw std::invalid_argument(std::string(name) + " must have shape " + expected_shape + ", got " +
                                    std::to_string(a.ndim()) + "-D array of shape " + shape_of(a));
    return MatrixView{static_cast<const float*>(a.data()), int64_t(a.shape(0)), int64_t(a.shape(1)),
                      a.stride(0), a.stride(1)};
}

template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> host_vector(int64_t n) {
    T* data = new T[size_t(n)];
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T, nb::ndim<1>>(data, {size_t(n)}, owner);
}

template <class T>
nb::ndarray<nb::array_api, T, nb::ndim<1>> device_vector(int64_t n, int device) {
    T* data = static_cast<T*>(cuda::device_alloc(size_t(n) * sizeof(T), device));
    struct Owner { void* ptr; int device; };
    nb::capsule owner(new Owner{data, device}, [](void* p) noexcept {
        auto* o = static_cast<Owner*>(p);
        cuda::device_free(o->ptr, o->device);
        delete o;
    });
    return nb::ndarray<nb::array_api, T, nb::ndim<1>>(data, {size_t(n)}, owner, {}, nb::dtype<T>(),
                                                       nb::device::cuda::value, device);
}

void require_cuda() {
    if (!cuda::compiled())
        throw std::invalid_argument("got a CUDA array, but this build of fullvq_rt has no CUDA support: pass a "
                                    "CPU array, or rebuild with a CUDA toolkit installed");
}

void require_same_device(const AnyArray& x, bool codebook_on_cuda, int codebook_device) {
    if (on_cuda(x) != codebook_on_cuda || (codebook_on_cuda && x.device_id() != codebook_device))
        throw std::invalid_argument(
            "x and the codebook are on different devices (x on " +
            std::string(on_cuda(x) ? "cuda:" + std::to_string(x.device_id()) : "cpu") + ", codebook on " +
            (codebook_on_cuda ? "cuda:" + std::to_string(codebook_device) : "cpu") +
            "): move both to the same device");
}

// Results of one lookup: indices, and distances when asked for.
nb::object host_lookup(int64_t m, bool with_distances, const auto& run) {
    auto indices = host_vector<int32_t>(m);
    std::optional<nb::ndarray<nb::numpy, float, nb::ndim<1>>> distances;
    if (with_distances) distances = host_vector<float>(m);
    {
        nb::gil_scoped_release unlocked;
        run(indices.data(), distances ? distances->data() : nullptr);
    }
    if (!with_distances) return nb::cast(indices);
    return nb::make_tuple(indices, *distances);
}

nb::object device_lookup(int64_t m, int device, bool with_distances, const auto& run) {
    auto indices = device_vector<int32_t>(m, device);
    std::optional<nb::ndarray<nb::array_api, float, nb::ndim<1>>> distances;
    if (with_distances) distances = device_vector<float>(m, device);
    {
        nb::gil_scoped_release unlocked;
        run(indices.data(), distances ? distances->data() : nullptr);
    }
    if (!with_distances) return nb::cast(indices);
    return nb::make_tuple(indices, *distances);
}

// One codebook on either device; the Python Codebook wraps this.
class AnyCodebook {
public:
    AnyCodebook(const AnyArray& codes, const std::string& metric, const std::string& kernel) {
        const MatrixView view = matrix_view(codes, "codebook", "(K, D)");
        const Metric m = parse_metric(metric);
        if (on_cuda(codes)) {
            require_cuda();
            nb::gil_scoped_release unlocked;
            gpu_ = std::make_unique<cuda::DeviceCodebook>(view, m, int(codes.device_id()));
        } else {
            nb::gil_scoped_release unlocked;
            cpu_ = std::make_unique<Codebook>(view, m, kernel);
        }
        metric_ = metric;
    }

    nb::object nearest(const AnyArray& x, bool return_distances, int threads) const {
        require_same_device(x, bool(gpu_), gpu_ ? gpu_->device() : 0);
        const std::string shape = "(M, " + std::to_string(dim()) + ")";
        const MatrixView view = matrix_view(x, "x", shape.c_str());
        if (gpu_)
            return device_lookup(view.rows, gpu_->device(), return_distances,
                                 [&](int32_t* i, float* d) { gpu_->nearest(view, i, d); });
        return host_lookup(view.rows, return_distances,
                           [&](int32_t* i, float* d) { cpu_->nearest(view, i, d, threads); });
    }

    int64_t size() const { return gpu_ ? gpu_->size() : cpu_->size(); }
    int64_t dim() const { return gpu_ ? gpu_->dim() : cpu_->dim(); }
    const std::string& metric() const { return metric_; }
    std::string device() const { return gpu_ ? "cuda:" + std::to_string(gpu_->device()) : "cpu"; }
    std::string kernel() const { return gpu_ ? "cuda" : cpu_->kernel_name(); }

private:
    std::unique_ptr<Codebook> cpu_;
    std::unique_ptr<cuda::DeviceCodebook> gpu_;
    std::string metric_;
};

nb::object nearest_once(const AnyArray& x, const AnyArray& codes, const std::string& metric, bool return_distances,
                        int threads, const std::string& kernel) {
    require_same_device(x, on_cuda(codes), on_cuda(codes) ? int(codes.device_id()) : 0);  // before any preparation
    if (on_cuda(codes)) return AnyCodebook(codes, metric, kernel).nearest(x, return_distances, threads);
    const MatrixView cb = matrix_view(codes, "codebook", "(K, D)");
    const std::string shape = "(M, " + std::to_string(cb.cols) + ")";
    const MatrixView view = matrix_view(x, "x", shape.c_str());
    const Metric m = parse_metric(metric);
    return host_lookup(view.rows, return_distances, [&](int32_t* i, float* d) {
        fullvq::nearest(view, cb, m, i, d, threads, kernel);
    });
}

// codes (K, D) float32, ids (B, H, W) int32/int64 C-contiguous -> (B, D, H, W) float32.
nb::ndarray<nb::numpy, float, nb::ndim<4>> gather_nchw_py(const AnyArray& codes, const AnyArray& ids) {
    const MatrixView cb = matrix_view(codes, "codebook", "(K, D)");
    const auto t = ids.dtype();
    const bool int32 = t == nb::dtype<int32_t>(), int64 = t == nb::dtype<int64_t>();
    if (!int32 && !int64)
        throw std::invalid_argument("ids must be int32 or int64, got " + dtype_name(t));
    if (ids.ndim() != 3)
        throw std::invalid_argument("ids must have shape (B, H, W), got " + std::to_string(ids.ndim()) +
                                    "-D array of shape " + shape_of(ids));
    if (on_cuda(ids) || on_cuda(codes))
        throw std::invalid_argument("gather_nchw takes CPU arrays");
    const int64_t b = ids.shape(0), h = ids.shape(1), w = ids.shape(2);
    const bool contiguous = (w == 1 || ids.stride(2) == 1) && (h == 1 || ids.stride(1) == w) &&
                            (b == 1 || ids.stride(0) == h * w);  // a size-1 axis may have any stride
    if (!contiguous && b * h * w != 0)  // an empty grid reads nothing, whatever its strides
        throw std::invalid_argument("ids must be C-contiguous (np.ascontiguousarray)");
    float* data = new float[size_t(b * cb.cols * h * w)];
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<float*>(p); });
    nb::ndarray<nb::numpy, float, nb::ndim<4>> out(data, {size_t(b), size_t(cb.cols), size_t(h), size_t(w)}, owner);
    nb::gil_scoped_release unlocked;
    if (int32)
        gather_nchw(cb, static_cast<const int32_t*>(ids.data()), b, h, w, data);
    else
        gather_nchw(cb, static_cast<const int64_t*>(ids.data()), b, h, w, data);
    return out;
}

// logits (R, V) float32 on either device -> tokens (B,) int32 on the same device.
nb::object sample_logits(const AnyArray& logits, double cfg_scale, double temperature, int64_t top_k, double top_p,
                         uint64_t seed, uint64_t step, int threads, const std::string& kernel) {
    const MatrixView view = matrix_view(logits, "logits", "(R, V)");
    const SamplingParams params{cfg_scale, temperature, top_k, top_p, seed, step};
    const int64_t batch = check_sampling(view, params);
    if (on_cuda(logits)) {
        require_cuda();
        const int device = int(logits.device_id());
        auto tokens = device_vector<int32_t>(batch, device);
        {
            nb::gil_scoped_release unlocked;
            cuda::sample(view, params, tokens.data(), device);
        }
        return nb::cast(tokens);
    }
    auto tokens = host_vector<int32_t>(batch);
    {
        nb::gil_scoped_release unlocked;
        sample(view, params, tokens.data(), threads, kernel);
    }
    return nb::cast(tokens);
}

// A C-contiguous float32 array of exactly `shape`, or std::invalid_argument.
const float* exact_float_array(const AnyArray& a, const char* name, std::initializer_list<int64_t> shape) {
    std::string want = "(";
    for (int64_t n : shape) want += (want.size() > 1 ? ", " : "") + std::to_string(n);
    want += ")";
    if (a.dtype() != nb::dtype<float>())
        throw std::invalid_argument(std::string(name) + " must be float32, got " + dtype_name(a.dtype()));
    bool same = a.ndim() == shape.size() && !on_cuda(a);
    int64_t expected_stride = 1, axis = int64_t(shape.size());
    for (auto n = std::rbegin(shape); same && n != std::rend(shape); ++n) {
        --axis;
        same = int64_t(a.shape(size_t(axis))) == *n && (*n == 1 || a.stride(size_t(axis)) == expected_stride);
        expected_stride *= *n;
    }
    if (!same)
        throw std::invalid_argument(std::string(name) + " must be a C-contiguous CPU array of shape " + want +
                                    ", got shape " + shape_of(a));
    return static_cast<const float*>(a.data());
}

// The loop's KV cache as a numpy view that keeps the loop alive.
nb::ndarray<nb::numpy, float, nb::ndim<5>> cache_view(SamplingLoop& loop, float* data) {
    const CacheShape& s = loop.shape();
    return {data, {size_t(s.layers), size_t(loop.rows()), size_t(s.heads), size_t(s.seq_len), size_t(s.head_dim)},
            nb::handle()};
}

}  // namespace
}  // namespace fullvq

NB_MODULE(_core, m) {
    using namespace fullvq;
    m.doc() = "fullvq_rt native core (private: use the fullvq_rt package API).";

    m.def("nearest", &nearest_once, "x"_a, "codebook"_a, "metric"_a = "l2", "return_distances"_a = false,
          "num_threads"_a = 0, "kernel"_a = "auto",
          "Index (M,) int32 of the nearest row of codebook (K, D) for each row of x (M, D), both float32.");
    m.def("gather_nchw", &gather_nchw_py, "codebook"_a, "ids"_a,
          "Code vectors (B, D, H, W) float32 of token ids (B, H, W) int32/int64 into codebook (K, D) float32.");
    m.def("sample_logits", &sample_logits, "logits"_a, "cfg_scale"_a = 1.0, "temperature"_a = 1.0, "top_k"_a = 0,
          "top_p"_a = 1.0, "seed"_a = 0, "step"_a = 0, "num_threads"_a = 0, "kernel"_a = "auto",
          "One sampling step: tokens (B,) int32 from logits (R, V) float32 (R = 2B with guidance).");
    nb::class_<SamplingLoop>(m, "SamplingLoop",
                             "The generator's loop state between network calls: KV cache, draws, tokens, next input.")
        .def("__init__",
             [](SamplingLoop* self, int64_t images, int64_t layers, int64_t heads, int64_t seq_len, int64_t head_dim,
                int64_t vocab, double cfg_scale, double temperature, int64_t top_k, double top_p, uint64_t seed,
                int threads) {
                 new (self) SamplingLoop(images, CacheShape{layers, heads, seq_len, head_dim}, vocab,
                                         SamplingParams{cfg_scale, temperature, top_k, top_p, seed, 0}, threads);
             },
             "images"_a, "layers"_a, "heads"_a, "seq_len"_a, "head_dim"_a, "vocab"_a, "cfg_scale"_a, "temperature"_a,
             "top_k"_a, "top_p"_a, "seed"_a, "num_threads"_a = 0)
        .def_prop_ro("guided", &SamplingLoop::guided, "Whether rows are doubled for classifier-free guidance.")
        .def_prop_ro("rows", &SamplingLoop::rows)
        .def_prop_ro("position", &SamplingLoop::position, "Tokens drawn so far.")
        .def_prop_ro("k_cache", [](SamplingLoop& l) { return cache_view(l, l.k_cache()); }, nb::rv_policy::reference_internal,
                     "(L, R, H, T, hd) float32 keys, written by step().")
        .def_prop_ro("v_cache", [](SamplingLoop& l) { return cache_view(l, l.v_cache()); }, nb::rv_policy::reference_internal)
        .def("step",
             [](SamplingLoop& l, const AnyArray& logits, const AnyArray& k, const AnyArray& v) {
                 const CacheShape& s = l.shape();
                 const MatrixView view = matrix_view(logits, "logits", "(R, V)");
                 const float* kd = exact_float_array(k, "k", {s.layers, l.rows(), s.heads, 1, s.head_dim});
                 const float* vd = exact_float_array(v, "v", {s.layers, l.rows(), s.heads, 1, s.head_dim});
                 {
                     nb::gil_scoped_release unlocked;
                     l.step(view, kd, vd);
                 }
                 return nb::ndarray<nb::numpy, const int64_t, nb::ndim<1>>(l.next_input(), {size_t(l.rows())},
                                                                            nb::handle());
             },
             "logits"_a, "k"_a, "v"_a, nb::rv_policy::reference_internal,
             "Writes k, v (L, R, H, 1, hd) at the current position, draws the next token of every image from "
             "logits (R, V) and returns the next input (R,) int64 (a view, rewritten by the next step).")
        .def("tokens",
             [](const SamplingLoop& l) {
                 const int64_t b = l.images(), t = l.shape().seq_len;
                 int32_t* data = new int32_t[size_t(b * t)];
                 std::copy_n(l.tokens(), b * t, data);
                 nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<int32_t*>(p); });
                 return nb::ndarray<nb::numpy, int32_t, nb::ndim<2>>(data, {size_t(b), size_t(t)}, owner);
             },
             "The tokens drawn so far, (B, T) int32 (a copy; zeros past the position).");
    m.def("cpu_kernels", &available_kernels, "CPU kernels this machine can run, best first.");
    m.def("cuda_available", [] { return cuda::device_count() > 0; },
          "Whether the CUDA kernels are built and a device is usable.");

    nb::class_<AnyCodebook>(m, "Codebook")
        .def(nb::init<const AnyArray&, const std::string&, const std::string&>(), "codebook"_a, "metric"_a = "l2",
             "kernel"_a = "auto")
        .def("nearest", &AnyCodebook::nearest, "x"_a, "return_distances"_a = false, "num_threads"_a = 0)
        .def_prop_ro("size", &AnyCodebook::size)
        .def_prop_ro("dim", &AnyCodebook::dim)
        .def_prop_ro("metric", &AnyCodebook::metric)
        .def_prop_ro("device", &AnyCodebook::device)
        .def_prop_ro("kernel", &AnyCodebook::kernel);
}
