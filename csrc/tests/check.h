// A minimal check macro for the native tests: prints the failing expression and location, counts
// failures, and main() returns non-zero if any check failed (ctest reads the exit code).
#pragma once

#include <cmath>
#include <cstdio>

namespace dcx_test {
inline int& failures() {
  static int count = 0;
  return count;
}
inline int finish(const char* name) {
  if (failures() == 0) std::printf("%s: all checks passed\n", name);
  else std::printf("%s: %d check(s) failed\n", name, failures());
  return failures() == 0 ? 0 : 1;
}
}  // namespace dcx_test

#define CHECK(cond)                                                               \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);        \
      ++dcx_test::failures();                                                     \
    }                                                                             \
  } while (0)
