// The simulator runtime's interface: what the shim calls at sync points, and
// the launch entry Python (ctypes) or msl_main.cpp calls. No MSL macros here:
// msl_rt.cpp includes this file without the shim.
#pragma once

#include <cstddef>
#include <cstdint>

namespace msl::rt {

constexpr int kSimdWidth = 32;
constexpr int kSlotBytes = 64;  // largest value a SIMD op exchanges (a float16 vector)

// What every lane of one SIMD group published at a completed SIMD op.
struct SimdSnapshot {
  uint32_t mask;  // lanes that took part; the others read poison
  alignas(16) unsigned char data[kSimdWidth][kSlotBytes];
};

// Per-thread values of the Metal attributes (uint3 as three uint32).
struct ThreadAttrs {
  uint32_t thread_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t threads_per_threadgroup[3];
  uint32_t dispatch_threads_per_threadgroup[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t thread_index_in_threadgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t thread_index_in_quadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t dispatch_quadgroups_per_threadgroup;
};

// Sync points. Each suspends the calling GPU thread until the scheduler
// completes the operation (see msl_rt.cpp for the rules).
const SimdSnapshot* simd_sync(const void* value, unsigned nbytes, unsigned line, unsigned col);
void barrier(unsigned mem_flags, unsigned line, unsigned col);
// Lets other threads run (atomic loads): a thread spinning on a flag that
// nothing else will set is reported as a deadlock instead of hanging.
void spin_point();

// Threadgroup memory: the same pointer for every thread of a group that
// reaches declaration `slot`; poisoned on first use.
void* tg_alloc(int slot, size_t size, size_t align);

// The calling GPU thread's lane in its SIMD group.
unsigned current_lane();

}  // namespace msl::rt

extern "C" {

enum msl_schedule { MSL_FORWARD = 0, MSL_REVERSE = 1, MSL_RANDOM = 2 };

struct msl_launch_config {
  int32_t grid[3];         // threads
  int32_t threadgroup[3];  // requested size, already clamped to the grid
  int32_t schedule;        // msl_schedule
  int32_t poison;          // byte that fills threadgroup memory and inactive SIMD lanes
  int32_t strict;          // a barrier some threads never reach is an error, not a warning
  int32_t workers;         // OS threads running groups
  uint64_t seed;           // for MSL_RANDOM
  int32_t nbuffers;
  int32_t ncount;          // address ranges whose loads are counted
};

// Runs the kernel linked next to the runtime. Returns 0 on success, 1 on a
// detected fault (message in msg). Warnings go to msg with status 0.
// count_ranges holds ncount [begin, end) pairs; counts receives bytes loaded.
int msl_launch(const msl_launch_config* cfg, void* const* buffers, const uint64_t* count_ranges,
               uint64_t* counts, char* msg, int msg_len);
}
