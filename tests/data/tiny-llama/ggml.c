#include <stdio.h>
#include <string.h>
#ifdef GGML_BACKEND_DL
#include <dlfcn.h>
#include <unistd.h>
#endif
const char *ggml_backend(void) {
#ifdef GGML_BACKEND_DL
    static char path[4096];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - 64);
    if (n <= 0) return "no-exe";
    path[n] = 0;
    strcpy(strrchr(path, '/') + 1, "libggml-cpu-generic.so");
    void *h = dlopen(path, RTLD_NOW);
    if (!h) return "module-missing";
    const char *(*name)(void) = (const char *(*)(void))dlsym(h, "ggml_cpu_variant");
    return name ? name() : "no-symbol";
#else
    return "static";
#endif
}
