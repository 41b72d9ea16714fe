const char *ggml_cpu_variant(void) { return "cpu-" VARIANT; }
