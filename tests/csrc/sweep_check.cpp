// Host check of csrc/row_sweep.cuh, compiled with g++ by tests/test_cuda_sweep.py: the row sweep of
// the CUDA kernels, run for a block of threads one thread after another, over every misalignment of
// its pointers (an element offset of 0 .. 16 / sizeof - 1 for each) and row lengths around the vector
// width. For each case it checks that
//   - every entry of the row is consumed once, with the values stored at it in each row;
//   - every access is aligned to its width, and no read leaves [row start rounded down to 16 bytes,
//     row end), no store leaves the row;
//   - the body is vectorized for every pointer: at most 3 VEC single-entry accesses per pointer.
// Prints "ok <cases>" and exits 0, or prints the first failure and exits 1.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

struct Access {
  uintptr_t address;
  size_t bytes;
  size_t align;
};
static std::vector<Access> g_accesses;

#define KLOPS_TRACE_ACCESS(ptr, bytes, aligned_to) \
  g_accesses.push_back({reinterpret_cast<uintptr_t>(ptr), (bytes), (aligned_to)})

#include "../../csrc/row_sweep.cuh"

using klops::AlignedVec;

template <typename S>
S pattern(int64_t i, int tag) {
  if constexpr (sizeof(S) == 2) {
    return static_cast<S>((i * 7 + tag * 13 + 1) & 0xffff);
  } else {
    return static_cast<S>(i) + 0.25f * static_cast<float>(tag);
  }
}

// A row of n entries at an element offset of a 64-byte aligned buffer with poison around it.
template <typename S>
struct Row {
  std::vector<unsigned char> storage;
  S* data;
  Row(int64_t n, int offset, int tag) : storage((n + offset) * sizeof(S) + 192, 0xA5) {
    auto base = (reinterpret_cast<uintptr_t>(storage.data()) + 63) / 64 * 64;
    data = reinterpret_cast<S*>(base) + offset + 64 / sizeof(S);  // poison before and after
    for (int64_t i = 0; i < n; ++i) data[i] = pattern<S>(i, tag);
  }
};

static int g_failures = 0;

#define CHECK(cond, ...)                      \
  do {                                        \
    if (!(cond)) {                            \
      if (g_failures++ == 0) {                \
        std::printf("FAILED %s: ", #cond);    \
        std::printf(__VA_ARGS__);             \
        std::printf("\n");                    \
      }                                       \
      return;                                 \
    }                                         \
  } while (0)

// One sweep as a kernel does it: `primary` sets the head (the stored row `out` in a backward, the
// row `a` in a forward), a and b are read with row_reader, out (if stored) is written per entry group.
template <typename Sa, typename Sb, bool BACKWARD>
void check_case(int64_t n, int off_a, int off_b, int off_out, int threads) {
  constexpr int VEC = 16 / (sizeof(Sa) > sizeof(Sb) ? sizeof(Sa) : sizeof(Sb));
  Row<Sa> a(n, off_a, 1);
  Row<Sb> b(n, off_b, 2);
  Row<Sa> out(n, off_out, 3);
  const int64_t head = BACKWARD ? klops::vec_head<VEC>(out.data, n) : klops::vec_head<VEC>(a.data, n);
  const auto read_a = klops::row_reader<VEC>(static_cast<const Sa*>(a.data), head);
  const auto read_b = klops::row_reader<VEC>(static_cast<const Sb*>(b.data), head);
  CHECK(BACKWARD || head == n || !read_a.shifted, "the primary row is never shifted");
  const auto plan = klops::plan_sweep<VEC>(n, head, read_a.shifted || read_b.shifted);
  std::vector<int> seen(n, 0);
  bool values_ok = true;
  g_accesses.clear();
  for (int tid = 0; tid < threads; ++tid) {
    klops::sweep_row<VEC>(
        n, plan, tid, threads,
        [&](int64_t j, auto width) { return std::make_pair(read_a(j, width), read_b(j, width)); },
        [&](int64_t j, auto entries) {
          constexpr int W = decltype(entries.first)::kWidth;
          AlignedVec<Sa, W> result;
          for (int i = 0; i < W; ++i) {
            values_ok = values_ok && memcmp(&entries.first.val[i], &a.data[j + i], sizeof(Sa)) == 0 &&
                        memcmp(&entries.second.val[i], &b.data[j + i], sizeof(Sb)) == 0;
            seen[j + i] += 1;
            result.val[i] = entries.first.val[i];
          }
          if (BACKWARD) klops::store_vec<W>(out.data + j, result);
        });
  }
  const char* what = BACKWARD ? "backward" : "forward";
  CHECK(values_ok, "%s n=%lld offsets a=%d b=%d out=%d: wrong values", what, (long long)n, off_a, off_b, off_out);
  for (int64_t i = 0; i < n; ++i) {
    CHECK(seen[i] == 1, "%s n=%lld offsets a=%d b=%d out=%d: entry %lld consumed %d times", what,
          (long long)n, off_a, off_b, off_out, (long long)i, seen[i]);
  }
  const struct {
    uintptr_t begin, end;
    bool stored;
    const char* name;
  } rows[] = {{reinterpret_cast<uintptr_t>(a.data), reinterpret_cast<uintptr_t>(a.data + n), false, "a"},
              {reinterpret_cast<uintptr_t>(b.data), reinterpret_cast<uintptr_t>(b.data + n), false, "b"},
              {reinterpret_cast<uintptr_t>(out.data), reinterpret_cast<uintptr_t>(out.data + n), true, "out"}};
  int singles[3] = {0, 0, 0};
  for (const Access& access : g_accesses) {
    CHECK(access.address % access.align == 0, "%s n=%lld: access misaligned", what, (long long)n);
    int r = -1;
    for (int k = 0; k < 3; ++k) {
      const uintptr_t lowest = rows[k].stored ? rows[k].begin : rows[k].begin / 16 * 16;
      if (access.address >= lowest && access.address + access.bytes <= rows[k].end) r = k;
    }
    CHECK(r >= 0, "%s n=%lld offsets a=%d b=%d out=%d: an access of %zu bytes outside every row", what,
          (long long)n, off_a, off_b, off_out, access.bytes);
    const size_t entry = r == 1 ? sizeof(Sb) : sizeof(Sa);
    singles[r] += access.bytes == entry;
  }
  for (int k = 0; k < 3; ++k) {
    CHECK(singles[k] <= 3 * VEC, "%s n=%lld offsets a=%d b=%d out=%d: %d single-entry accesses of %s",
          what, (long long)n, off_a, off_b, off_out, singles[k], rows[k].name);
  }
}

template <typename Sa, typename Sb>
int check_types() {
  const int64_t lengths[] = {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 31, 32, 33, 47, 63, 64, 65, 127, 130, 257, 1031};
  const int offsets_a = 16 / sizeof(Sa), offsets_b = 16 / sizeof(Sb);
  int cases = 0;
  for (int64_t n : lengths)
    for (int threads : {32, 64})
      for (int oa = 0; oa < offsets_a; ++oa)
        for (int ob = 0; ob < offsets_b; ++ob)
          for (int oo = 0; oo < offsets_a; ++oo) {
            check_case<Sa, Sb, true>(n, oa, ob, oo, threads);
            if (oo == 0) check_case<Sa, Sb, false>(n, oa, ob, 0, threads);
            cases += 1 + (oo == 0);
          }
  return cases;
}

int main() {
  // bf16 / fp16 storage (uint16_t) and fp32, alone and mixed as student / teacher.
  const int cases = check_types<uint16_t, uint16_t>() + check_types<float, float>() +
                    check_types<uint16_t, float>() + check_types<float, uint16_t>();
  if (g_failures) {
    std::printf("%d of %d cases failed\n", g_failures, cases);
    return 1;
  }
  std::printf("ok %d\n", cases);
  return 0;
}
