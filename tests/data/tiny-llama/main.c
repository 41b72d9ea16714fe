#include <stdio.h>
const char *ggml_backend(void);
int main(void) { printf("%s: %s\n", TOOL, ggml_backend()); return 0; }
