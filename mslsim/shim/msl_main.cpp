// Executable front end for the sanitizer modes: `kernel IN OUT`.
//
// IN:  "MSLSIM01", msl_launch_config, then per buffer: int64 nbytes,
//      int64 is_output, nbytes of contents.
// OUT: the contents of every output buffer, in order.
// Every buffer gets its own exact-size allocation so that AddressSanitizer
// reports the first byte read or written outside it.
// Exit status: 0 ok (warnings on stderr), 3 fault found by the simulator,
// anything else comes from a sanitizer.

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>
#include <vector>

#include "msl_rt.h"

namespace {
[[noreturn]] void die(const char* what) {
  fprintf(stderr, "mslsim: %s\n", what);
  exit(2);
}
void read_exact(FILE* f, void* p, size_t n) {
  if (n && fread(p, 1, n, f) != n) die("truncated launch file");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) die("usage: kernel LAUNCH_FILE OUTPUT_FILE");
  FILE* in = fopen(argv[1], "rb");
  if (!in) die("cannot open the launch file");
  char magic[8];
  read_exact(in, magic, 8);
  if (memcmp(magic, "MSLSIM01", 8) != 0) die("not a launch file");
  msl_launch_config cfg;
  read_exact(in, &cfg, sizeof cfg);
  std::vector<void*> buffers(cfg.nbuffers);
  std::vector<int64_t> sizes(cfg.nbuffers), outputs(cfg.nbuffers);
  for (int i = 0; i < cfg.nbuffers; ++i) {
    int64_t head[2];
    read_exact(in, head, sizeof head);
    sizes[i] = head[0];
    outputs[i] = head[1];
    buffers[i] = malloc(size_t(head[0] > 0 ? head[0] : 1));
    read_exact(in, buffers[i], size_t(head[0]));
  }
  fclose(in);

  cfg.ncount = 0;
  char msg[4096];
  int status = msl_launch(&cfg, buffers.data(), nullptr, nullptr, msg, sizeof msg);
  if (status != 0) {
    // _exit: suspended GPU threads still point into these buffers, and
    // freeing them would look like a race to TSan.
    fprintf(stderr, "mslsim: %s\n", msg);
    fflush(stderr);
    _exit(3);
  }
  if (msg[0]) fprintf(stderr, "%s", msg);

  FILE* out = fopen(argv[2], "wb");
  if (!out) die("cannot write the output file");
  for (int i = 0; i < cfg.nbuffers; ++i)
    if (outputs[i] && sizes[i] && fwrite(buffers[i], 1, size_t(sizes[i]), out) != size_t(sizes[i]))
      die("short write");
  fclose(out);
  for (void* p : buffers) free(p);
  return 0;
}
