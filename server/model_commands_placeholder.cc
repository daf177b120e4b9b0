#include <cstdio>

#include "server/commands.h"

namespace sy::server {
int MakeModelCommand(int, char**) { std::fprintf(stderr, "make-model: not built yet\n"); return 1; }
int RunCommand(int, char**) { std::fprintf(stderr, "run: not built yet\n"); return 1; }
}  // namespace sy::server
