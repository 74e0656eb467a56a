/* Intel AMX (Advanced Matrix Extensions) support the kernels share. Header-only, static inline;
 * compiled only where the including kernel is built for a CPU with AMX-TILE and AMX-BF16
 * (``-march=native`` on Sapphire Rapids and later defines __AMX_TILE__ / __AMX_BF16__); on other
 * CPUs SLIMLM_AMX is not defined and kernels keep their AVX-512 / portable paths.
 *
 * Linux hands a process the (8 KB) tile state only once it asks for it (arch_prctl
 * ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); oneDNN asks when it first runs an AMX primitive, but a
 * kernel may run before any has. ``amx_ready`` asks once per process (the permission is per
 * process and cannot be taken back) and says whether tiles may be used; ``SLIMLM_AMX=0`` in the
 * environment makes it say no, so the AVX-512 paths can be compared against the AMX ones.
 *
 * Every thread that runs tile instructions loads a configuration first (``amx_configure``; the
 * tile registers are per thread) and releases it when done (``_tile_release``), so a thread that
 * later runs only AVX-512 code does not carry the tile state through context switches. */
#ifndef SLIMLM_AMX_H
#define SLIMLM_AMX_H

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define SLIMLM_AMX 1
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* unistd.h declares syscall only under _DEFAULT_SOURCE, which -std=c11 leaves off (an implicit
 * declaration is an error from GCC 14) */
extern long syscall(long number, ...);

#define SLIMLM_ARCH_REQ_XCOMP_PERM 0x1023
#define SLIMLM_XFEATURE_XTILEDATA 18

/* 1 when this process may run tile instructions (and SLIMLM_AMX is not "0"), else 0. */
static int amx_ready(void) {
    static int granted = -1; /* -1: not asked yet (a race only asks twice: the call is idempotent) */
    const char *env = getenv("SLIMLM_AMX");
    if (env && env[0] == '0') return 0;
    if (granted < 0) granted = syscall(SYS_arch_prctl, SLIMLM_ARCH_REQ_XCOMP_PERM, SLIMLM_XFEATURE_XTILEDATA) == 0;
    return granted;
}

/* The 64-byte tile configuration (palette 1): per tile its rows and bytes per row. */
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg_t;

/* Load a configuration in which tile i has rows[i] rows of colsb[i] bytes (n tiles, n <= 8). */
static inline void amx_configure(int n, const int *rows, const int *colsb) {
    amx_tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < n; ++i) {
        cfg.rows[i] = (uint8_t)rows[i];
        cfg.colsb[i] = (uint16_t)colsb[i];
    }
    _tile_loadconfig(&cfg);
}
#endif

#endif
