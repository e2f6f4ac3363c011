// The CPU scan kernels: one per instruction set, chosen at run time (dispatch in lookup.cpp).
#pragma once

#include <cstdint>

namespace fullvq {

// One chunk of packed codes scanned against m prepared query rows.
struct ScanArgs {
    const float* x;         // (m, d) prepared rows, contiguous
    int64_t m, d;
    const float* panels;    // (n_panels, d, P) codes, P = Kernel::panel_width
    const float* bias;      // (n_panels * P), +inf for padding codes
    int64_t n_panels;
    int64_t k_begin;        // global index of the chunk's first code
    float* best_val;        // (m) running minimum (+inf to start), replaced only by a strictly smaller value
    int32_t* best_idx;      // (m) its index
};

struct Kernel {
    const char* name;
    int panel_width;        // codes per packed panel
    bool (*supported)();    // can this CPU (and OS) run it?
    void (*scan)(const ScanArgs&);
};

extern const Kernel kAvx512Kernel;  // x86-64 only (FULLVQ_X86_KERNELS)
extern const Kernel kAvx2Kernel;    // x86-64 only
extern const Kernel kScalarKernel;

}  // namespace fullvq
