// The bytes ggml itself writes for rows of floats, for the reference-quantizer goldens in
// quants/tests/data (quants/src/iq_quant.rs): ggml_quantize_chunk, without an importance matrix
// or with IMATRIX.f32 (ROW_LENGTH weights, one per column, as llama-quantize passes them).
//   gcc -O2 -I LLAMA/ggml/include scripts/ggml-quantize-rows.c -L LLAMA_BUILD/bin -lggml-base -o /tmp/ggml-quantize-rows
//   LD_LIBRARY_PATH=LLAMA_BUILD/bin /tmp/ggml-quantize-rows TYPE_NUMBER INPUT.f32 ROW_LENGTH OUT.bin [IMATRIX.f32]
// (llama.cpp: the source vendored in the llama-cpp-python 0.3.36 sdist, built as BENCHMARKS.md says.)
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
int main(int argc, char** argv) {
    if (argc != 5 && argc != 6) return 2;
    enum ggml_type t = (enum ggml_type)atoi(argv[1]);
    long n = atol(argv[3]);
    FILE* f = fopen(argv[2], "rb");
    if (!f || n <= 0) return 3;
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    long rows = bytes / 4 / n;
    float* x = malloc(bytes);
    if (fread(x, 4, rows * n, f) != (size_t)(rows * n)) return 5;
    size_t out_bytes = rows * ggml_row_size(t, n);
    void* y = malloc(out_bytes);
    float* imatrix = NULL;
    if (argc == 6) {
        FILE* m = fopen(argv[5], "rb");
        imatrix = malloc(n * 4);
        if (!m || fread(imatrix, 4, n, m) != (size_t)n) return 6;
        fclose(m);
    }
    ggml_quantize_chunk(t, x, y, 0, rows, n, imatrix);
    FILE* o = fopen(argv[4], "wb");
    if (!o) return 4;
    fwrite(y, 1, out_bytes, o);
    fclose(o);
    return 0;
}
