/* kvserve: mlx-rs seeds its RandomState from the Darwin-only
 * mach_approximate_time(). Off Darwin, provide it as monotonic nanoseconds. */
#include <stdint.h>
#include <time.h>

uint64_t mach_approximate_time(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
