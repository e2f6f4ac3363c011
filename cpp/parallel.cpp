#include "parallel.h"

#include <algorithm>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

namespace fullvq {

int available_cores() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1u, std::thread::hardware_concurrency());
}

void parallel_for(int n, const std::function<void(int)>& fn) {
    if (n <= 1) {
        if (n == 1) fn(0);
        return;
    }
    std::exception_ptr error;
    std::mutex error_mutex;
    auto run = [&](int i) {
        try {
            fn(i);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
        }
    };
    std::vector<std::thread> workers;
    workers.reserve(n - 1);
    for (int i = 1; i < n; ++i) workers.emplace_back(run, i);
    run(0);
    for (auto& w : workers) w.join();
    if (error) std::rethrow_exception(error);
}

}  // namespace fullvq
