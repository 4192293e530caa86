// `parallel_blocks(n, f)`: f(begin, end) over [0, n) split across the calling
// thread's OpenMP team, for the engine's kernels (amx_woq.cpp, avx2_woq.cpp,
// avx512_woq.cpp, cpu_ops.cpp).
//
// Not at::parallel_for: inlined into an extension, its first call on a thread resets
// that thread's team to the process default, which a worker sets to one thread for
// every thread but the engine's (threads.py): the engine's 1-row decode steps then
// ran on one core (24 -> 38 ms).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace tokenyard {

template <typename F>
void parallel_blocks(int64_t n, const F& f) {
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = (n + threads - 1) / threads;
    const int64_t begin = std::min(n, tid * per), end = std::min(n, begin + per);
    if (begin < end) f(begin, end);
  }
}

}  // namespace tokenyard
