// Reference oracle for sling's quantizers: calls the pinned llama.cpp's own ggml_quantize_chunk and
// type-traits to_float (libggml-base, built by scripts/setup-reference.sh) on the rows it is given.
//
//   ggml-quant-ref quant   TYPE NROWS NPERROW [IMATRIX.f32]  < rows.f32 > blocks.bin
//   ggml-quant-ref quant-each TYPE NROWS NPERROW [IMATRIX.f32] < rows.f32 > (status byte + row bytes) per row
//   ggml-quant-ref dequant TYPE NROWS NPERROW                < blocks.bin > rows.f32
//   ggml-quant-ref info    TYPE     -> "id blck_size type_size requires_imatrix"
//   ggml-quant-ref act     TYPE NROWS NPERROW                < rows.f32 > rows.f32
//       the activation rows as llama.cpp's CPU backend multiplies them with a TYPE weight: converted by
//       libggml-cpu to TYPE's vec_dot_type (its from_float, the build's SIMD code) and decoded back to f32
//   ggml-quant-ref act-type TYPE   -> the name of TYPE's vec_dot_type (ggml_get_type_traits_cpu)
//   ggml-quant-ref bench   TYPE NROWS NPERROW REPS [IMATRIX.f32] < rows.f32 -> timings (see bench below)
//
// TYPE is a ggml type name as ggml_type_name prints it (q4_K, iq4_xs, ...). Rows are little-endian f32;
// the importance weights (llama-quantize's quant_weights) are NPERROW f32 values shared by all rows.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/wait.h>
#include "ggml.h"
#include "ggml-cpu.h"

static enum ggml_type type_by_name(const char *name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *n = ggml_type_name((enum ggml_type)t);
        if (n && strcmp(n, name) == 0 && ggml_blck_size((enum ggml_type)t) > 0) return (enum ggml_type)t;
    }
    fprintf(stderr, "unknown ggml type %s\n", name);
    exit(2);
}

static void *read_all(FILE *f, size_t want) {
    char *buf = malloc(want ? want : 1);
    size_t got = fread(buf, 1, want, f);
    if (got != want) { fprintf(stderr, "short input: %zu of %zu bytes\n", got, want); exit(2); }
    return buf;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t fnv1a64(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    return h;
}

// bench: single-thread timing of ggml_quantize_chunk (the call llama-quantize's workers make) on the rows read
// from stdin, REPS times, and of the type's to_float over the result, REPS times; only those calls are timed
// (clock_gettime, CLOCK_MONOTONIC). Prints, one line each:
//   quantize S1 .. SREPS      seconds per call
//   dequantize S1 .. SREPS    seconds per pass of to_float over all rows (row by row)
//   fnv1a64 HEX               FNV-1a of the quantized bytes (to check both benchmarks produced the same bytes)
// scripts/bench/quantize.py drives it; kernels/examples/qbench.rs is sling's counterpart (same protocol).
static int bench(enum ggml_type t, long long nrows, long long n_per_row, int reps, const char *imatrix_path) {
    size_t row_bytes = ggml_row_size(t, n_per_row);
    float *src = read_all(stdin, sizeof(float) * nrows * n_per_row);
    float *imatrix = NULL;
    if (imatrix_path) {
        FILE *f = fopen(imatrix_path, "rb");
        if (!f) { perror(imatrix_path); return 2; }
        imatrix = read_all(f, sizeof(float) * n_per_row);
        fclose(f);
    }
    void *dst = malloc(row_bytes * nrows + 1);
    float *back = malloc(sizeof(float) * nrows * n_per_row + 1);
    ggml_quantize_init(t);
    printf("quantize");
    for (int i = 0; i < reps; i++) {
        double t0 = now_s();
        size_t n = ggml_quantize_chunk(t, src, dst, 0, nrows, n_per_row, imatrix);
        double dt = now_s() - t0;
        if (n != row_bytes * nrows) { fprintf(stderr, "ggml_quantize_chunk wrote %zu bytes\n", n); return 3; }
        printf(" %.9f", dt);
    }
    printf("\n");
    const struct ggml_type_traits *tr = ggml_get_type_traits(t);
    if (tr->to_float) {
        printf("dequantize");
        for (int i = 0; i < reps; i++) {
            double t0 = now_s();
            for (long long r = 0; r < nrows; r++)
                tr->to_float((const char *)dst + r * row_bytes, back + r * n_per_row, n_per_row);
            printf(" %.9f", now_s() - t0);
        }
        printf("\n");
    }
    printf("fnv1a64 %016llx\n", (unsigned long long)fnv1a64(dst, row_bytes * nrows));
    return 0;
}

// quant-each: every row quantized on its own in a forked child (the type's grids built once, before forking), so
// that a row llama.cpp aborts on (a GGML_ASSERT, e.g. an i-quant grid search given a NaN) costs one child, not the
// whole batch. Writes per row one status byte (1: quantized, 0: the child failed) and the row's bytes (zeros when
// it failed).
static int quant_each(enum ggml_type t, long long nrows, long long n_per_row, const float *src, const float *imatrix) {
    size_t row_bytes = ggml_row_size(t, n_per_row);
    unsigned char *row = malloc(row_bytes + 1);
    setenv("GGML_NO_BACKTRACE", "1", 1); // ggml_abort would otherwise attach gdb (seconds per abort)
    ggml_quantize_init(t);
    for (long long r = 0; r < nrows; r++) {
        fflush(stdout); // nothing buffered for a child to write again (glibc's abort may flush streams)
        int fd[2];
        if (pipe(fd) != 0) { perror("pipe"); return 3; }
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 3; }
        if (pid == 0) {
            close(fd[0]);
            // ggml prints its "Oops, did not find grid point" diagnostics on stdout before aborting: not into ours.
            int null = open("/dev/null", O_WRONLY);
            if (null >= 0) dup2(null, 1);
            size_t n = ggml_quantize_chunk(t, src + r * n_per_row, row, 0, 1, n_per_row, imatrix);
            size_t off = 0;
            while (off < n) {
                ssize_t w = write(fd[1], row + off, n - off);
                if (w <= 0) _exit(4);
                off += (size_t)w;
            }
            _exit(n == row_bytes ? 0 : 3);
        }
        close(fd[1]);
        size_t got = 0;
        for (;;) {
            ssize_t k = read(fd[0], row + got, row_bytes - got);
            if (k <= 0) break;
            got += (size_t)k;
            if (got == row_bytes) break;
        }
        close(fd[0]);
        int status = 0;
        waitpid(pid, &status, 0);
        unsigned char ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 && got == row_bytes;
        if (!ok) memset(row, 0, row_bytes);
        fwrite(&ok, 1, 1, stdout);
        fwrite(row, 1, row_bytes, stdout);
    }
    return 0;
}

// `act`: decodes one row of vec_dot_type `vt` blocks (q8_0, q8_1, q8_K have no to_float in ggml) to f32.
static int act_decode(enum ggml_type vt, const unsigned char *b, float *y, long long n) {
    const struct ggml_type_traits *tr = ggml_get_type_traits(vt);
    if (vt == GGML_TYPE_F32) { memcpy(y, b, sizeof(float) * n); return 0; }
    if (vt == GGML_TYPE_Q8_0 || vt == GGML_TYPE_Q8_1) {
        // block_q8_0 { ggml_half d; int8_t qs[32]; }, block_q8_1 { ggml_half d, s; int8_t qs[32]; }
        size_t head = vt == GGML_TYPE_Q8_0 ? 2 : 4, bs = ggml_type_size(vt);
        for (long long i = 0; i < n / 32; i++) {
            const unsigned char *blk = b + i * bs;
            ggml_fp16_t h; memcpy(&h, blk, 2);
            float d = ggml_fp16_to_fp32(h);
            for (int j = 0; j < 32; j++) y[i * 32 + j] = d * (float)(int8_t)blk[head + j];
        }
        return 0;
    }
    if (vt == GGML_TYPE_Q8_K) {
        // block_q8_K { float d; int8_t qs[256]; int16_t bsums[16]; }; dequantize_row_q8_K: d * qs[j]
        size_t bs = ggml_type_size(vt);
        for (long long i = 0; i < n / 256; i++) {
            const unsigned char *blk = b + i * bs;
            float d; memcpy(&d, blk, 4);
            for (int j = 0; j < 256; j++) y[i * 256 + j] = d * (float)(int8_t)blk[4 + j];
        }
        return 0;
    }
    if (!tr->to_float) return 1;
    tr->to_float(b, y, n);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: ggml-quant-ref quant|dequant|info TYPE [NROWS NPERROW [IMATRIX]]\n"); return 2; }
    enum ggml_type t = type_by_name(argv[2]);
    if (strcmp(argv[1], "info") == 0) {
        printf("%d %lld %zu %d\n", (int)t, (long long)ggml_blck_size(t), ggml_type_size(t),
               (int)ggml_quantize_requires_imatrix(t));
        return 0;
    }
    if (strcmp(argv[1], "act-type") == 0) {
        ggml_cpu_init();
        printf("%s\n", ggml_type_name(ggml_get_type_traits_cpu(t)->vec_dot_type));
        return 0;
    }
    if (argc < 5) { fprintf(stderr, "need NROWS NPERROW\n"); return 2; }
    long long nrows = atoll(argv[3]), n_per_row = atoll(argv[4]);
    if (strcmp(argv[1], "bench") == 0) {
        if (argc < 6) { fprintf(stderr, "need NROWS NPERROW REPS [IMATRIX]\n"); return 2; }
        return bench(t, nrows, n_per_row, atoi(argv[5]), argc > 6 ? argv[6] : NULL);
    }
    size_t row_bytes = ggml_row_size(t, n_per_row);
    if (strcmp(argv[1], "quant") == 0 || strcmp(argv[1], "quant-each") == 0) {
        float *src = read_all(stdin, sizeof(float) * nrows * n_per_row);
        float *imatrix = NULL;
        if (argc > 5) {
            FILE *f = fopen(argv[5], "rb");
            if (!f) { perror(argv[5]); return 2; }
            imatrix = read_all(f, sizeof(float) * n_per_row);
            fclose(f);
        }
        if (strcmp(argv[1], "quant-each") == 0) return quant_each(t, nrows, n_per_row, src, imatrix);
        void *dst = malloc(row_bytes * nrows + 1);
        ggml_quantize_init(t);
        size_t n = ggml_quantize_chunk(t, src, dst, 0, nrows, n_per_row, imatrix);
        if (n != row_bytes * nrows) { fprintf(stderr, "ggml_quantize_chunk wrote %zu bytes\n", n); return 3; }
        fwrite(dst, 1, n, stdout);
        return 0;
    }
    if (strcmp(argv[1], "dequant") == 0) {
        void *src = read_all(stdin, row_bytes * nrows);
        float *dst = malloc(sizeof(float) * nrows * n_per_row + 1);
        const struct ggml_type_traits *tr = ggml_get_type_traits(t);
        if (!tr->to_float) { fprintf(stderr, "no to_float for %s\n", argv[2]); return 3; }
        for (long long r = 0; r < nrows; r++)
            tr->to_float((const char *)src + r * row_bytes, dst + r * n_per_row, n_per_row);
        fwrite(dst, sizeof(float), nrows * n_per_row, stdout);
        return 0;
    }
    if (strcmp(argv[1], "act") == 0) {
        ggml_cpu_init();
        enum ggml_type vt = ggml_get_type_traits_cpu(t)->vec_dot_type;
        ggml_from_float_t from = ggml_get_type_traits_cpu(vt)->from_float;
        size_t vrow = ggml_row_size(vt, n_per_row);
        float *src = read_all(stdin, sizeof(float) * nrows * n_per_row);
        unsigned char *q = malloc(vrow + 1);
        float *out = malloc(sizeof(float) * n_per_row + 1);
        for (long long r = 0; r < nrows; r++) {
            if (vt == GGML_TYPE_F32) memcpy(q, src + r * n_per_row, vrow);
            else if (!from) { fprintf(stderr, "no from_float for %s\n", ggml_type_name(vt)); return 3; }
            else from(src + r * n_per_row, q, n_per_row);
            if (act_decode(vt, q, out, n_per_row)) { fprintf(stderr, "cannot decode %s\n", ggml_type_name(vt)); return 3; }
            fwrite(out, sizeof(float), n_per_row, stdout);
        }
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
