/* Force-included into llama.cpp's C++ sources when llama-cpp-python is built
 * (README "Set up": CMAKE_ARGS="-DCMAKE_CXX_FLAGS=-include<this file>").
 *
 * It repairs two defects of ggml's AMX matrix products (ggml-cpu/amx/mmq.cpp):
 *
 * 1. GCC (12.2 here) declares _tile_loadconfig's memory operand as 8 bytes
 *    (`"m" (*((const void **)__config))` in amxtileintrin.h), so the compiler
 *    treats the stores that fill a tile configuration's colsb/rows fields as
 *    dead and drops them: ggml_tile_config_init loads a configuration whose
 *    tiles are 0 rows and the first tileloadd stops the process with SIGILL
 *    (ggml-org/llama.cpp pull request 26954 describes the same defect).
 *    Here _tile_loadconfig gets an operand that covers all 64 bytes.
 * 2. ggml_tile_config_init loads the configuration once per thread and
 *    remembers that in a thread_local flag; when another library releases
 *    the tiles on that thread (PyTorch's oneDNN does after its bf16
 *    products), ggml's next tile load raises SIGILL. Here every call site of
 *    ggml_tile_config_init first lets ggml's own function run (renamed, and
 *    recording the configuration it loads), then reloads that configuration
 *    when the thread's tiles are found unconfigured.
 *
 * The exported marker lets edgevlm see that a build carries the repair
 * (edgevlm.amx_guard); builds without it are probed instead.
 */
#ifndef EDGEVLM_AMX_TILE_CONFIG_H
#define EDGEVLM_AMX_TILE_CONFIG_H
#ifdef __cplusplus
extern "C" __attribute__((weak, visibility("default"), used)) const int edgevlm_amx_tile_config_fix = 2;
#if defined(__AMX_TILE__) && defined(__x86_64__)
#include <immintrin.h>

struct alignas(64) edgevlm_tile_config { unsigned char bytes[64]; };
static thread_local edgevlm_tile_config edgevlm_loaded_tile_config;  // palette 0: nothing recorded yet

static inline __attribute__((always_inline)) void edgevlm_tile_loadconfig(const void *config) {
    __builtin_memcpy(edgevlm_loaded_tile_config.bytes, config, 64);
    __asm__ volatile("ldtilecfg %0" : : "m"(edgevlm_loaded_tile_config));
}
#define _tile_loadconfig(config) edgevlm_tile_loadconfig(config)

/* After ggml's own (renamed) ggml_tile_config_init: reload the configuration it loaded on this thread
 * when the tiles are found unconfigured (released by another library since). */
static inline void edgevlm_tile_config_check(void) {
    edgevlm_tile_config current;
    __asm__ volatile("sttilecfg %0" : "=m"(current));
    if (current.bytes[0] == 0 && edgevlm_loaded_tile_config.bytes[0] != 0) {
        __asm__ volatile("ldtilecfg %0" : : "m"(edgevlm_loaded_tile_config));
    }
}
/* ggml's definition `ggml_tile_config_init(void)` becomes `edgevlm_tile_config_init_original(void)`
 * (in ggml's own namespace); its call sites `ggml_tile_config_init()` become
 * `(edgevlm_tile_config_init_original(), edgevlm_tile_config_check())`. */
#define ggml_tile_config_init(...) EDGEVLM_TCI_SELECT(__VA_OPT__(DEFINITION))(__VA_ARGS__)
#define EDGEVLM_TCI_SELECT(kind) EDGEVLM_TCI_PASTE(kind)
#define EDGEVLM_TCI_PASTE(kind) EDGEVLM_TCI_##kind
#define EDGEVLM_TCI_DEFINITION(...) edgevlm_tile_config_init_original(__VA_ARGS__)
#define EDGEVLM_TCI_(...) (edgevlm_tile_config_init_original(), edgevlm_tile_config_check())
#endif
#endif
#endif
