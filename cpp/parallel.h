// Minimal fork-join over std::thread: the lookup's only threading primitive.
#pragma once

#include <functional>

namespace fullvq {

// Number of cores this process may run on (its affinity mask where the OS has one).
int available_cores();

// Runs fn(0) .. fn(n-1) on n threads (the caller runs fn(0)) and rethrows the first exception.
void parallel_for(int n, const std::function<void(int)>& fn);

}  // namespace fullvq
