// Sanitized builds only (SY_SANITIZE): raises the stack size that libraries ask for their
// threads.
//
// prometheus-cpp's HTTP server (civetweb, a Debian shared library) starts its threads with a
// fixed, small stack (pthread_attr_setstacksize). Under AddressSanitizer glibc's getnameinfo
// in such a thread overflows it: one scrape of /metrics killed a sanitized daemon. This
// definition interposes the libc one for the executables it is linked into (the `switchyard`
// binary and the test executables, which export it: -Wl,--export-dynamic-symbol) and forwards
// with at least 1 MiB. Not part of any library.
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <cstddef>

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  return real(attr, std::max<size_t>(size, size_t{1} << 20));
}
