// Which spqmm kernel runs, on how many threads, in what tiles: the one place that decides, for the
// CPU kernels (csrc/cpu/spqmm_cpu.cpp) and the CUDA ones (csrc/cuda/spqmm_cuda.cpp) alike.
// Torch-free; dcx._C exports the table (SPQMM_PLAN) so that the tests run every entry.
//
// A decision is a walk down kSpqmmPlan: the first rule of the machine's kind (isa) and the layer's
// mode (sparse, dense, or either with bf16 or int8 compute) whose batch bounds (rows_below, and
// min_rows where given) hold the call's rows and whose density, layer-size and code-width bounds
// hold. Each rule says what was measured to put it there (benchmarks/bench_spqmm.py, 4096 x 4096
// unless said, two threads, weights rotated past L3).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace dcx {

// CPU kinds: the rules of a kind serve it and the kinds above it (kAvx512Vnni: AVX-512 with VNNI
// and VBMI runs every AVX-512 rule and its own, which come first; kAvx512Amx, with AMX too, every rule of
// those two and its own).
enum class SpqmmIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kCuda = 3, kAvx512Vnni = 4, kAvx512Amx = 5 };

constexpr bool spqmm_avx512(SpqmmIsa isa) {
  return isa == SpqmmIsa::kAvx512 || isa == SpqmmIsa::kAvx512Vnni || isa == SpqmmIsa::kAvx512Amx;
}

// Whether a rule written for kind `rule` serves a call on kind `isa`.
constexpr bool spqmm_isa_serves(SpqmmIsa rule, SpqmmIsa isa) {
  return rule == isa || (rule == SpqmmIsa::kAvx512 && spqmm_avx512(isa)) ||
         (rule == SpqmmIsa::kAvx512Vnni && isa == SpqmmIsa::kAvx512Amx);
}

// sparse: codes with positions; dense: ids only (fp32 arithmetic, or bf16 where no bf16 rule
// serves); int8: a dense layer computed by the int8 kernels (core/spqmm_int8.h); bf16: a dense
// layer in bfloat16 compute (activations and weights rounded to bf16, float32 sums), which the
// dense rules serve where no bf16 rule does; sparse bf16 / sparse int8: a sparse layer in bfloat16
// / int8 compute, which the sparse rules (fp32 arithmetic) serve where no rule of its own does.
enum class SpqmmMode : int { kSparse = 0, kDense = 1, kInt8 = 2, kBf16 = 3, kSparseBf16 = 4, kSparseInt8 = 5 };

constexpr bool spqmm_sparse(SpqmmMode mode) {
  return mode == SpqmmMode::kSparse || mode == SpqmmMode::kSparseBf16 || mode == SpqmmMode::kSparseInt8;
}

constexpr bool spqmm_mode_serves(SpqmmMode rule, SpqmmMode mode) {
  return rule == mode || (rule == SpqmmMode::kDense && mode == SpqmmMode::kBf16) ||
         (rule == SpqmmMode::kSparse && spqmm_sparse(mode));
}

enum class SpqmmKernel : int {
  kSparseSteps = 0,  // sparse: the step kernel, `block` batch rows per pass (1, 2, 4 or 8)
  kSparseBatch = 1,  // sparse: batch rows in the vector lanes (x transposed), `block` per pass
                     //   (16 with AVX-512, else 8), each slot decoded once per pass
  kDenseRows = 2,    // dense: each weight decoded once per pass of `block` batch rows (1, 2, 4, 8)
  kDenseMany = 3,    // dense, AVX2: rows decoded once into L1, then applied to every batch row
  kInt8Rows = 4,     // dense, int8 compute: `block` batch rows per pass (1, 2, 4 or 8)
  kDecodeGemm = 5,   // W decoded once, in cache-sized blocks of rows, multiplied by the BLAS
  kInt8Many = 6,     // dense, int8 compute, AVX2: rows of W decoded once into int16 in L1, then
                     //   applied to every activation row (2 rows of W by 4 of x at a time)
  kInt8Fused = 7,    // dense, int8 compute, AVX-512 VNNI + VBMI: kInt8Gemm's rule in one pass, each
                     //   row of W decoded into int8 by its own table, u8 x s8 dot products with
                     //   16 activation rows in the lanes, 8 rows of W by 32 of x at a time
  kBf16Amx = 8,      // dense, bf16 compute, AMX: rows of W decoded in chunks into bf16 tiles,
                     //   32 rows of W by 32 of x per pass (core/spqmm_amx.h)
  kSparseAmx = 9,    // sparse, bf16 compute, AMX: the steps of two groups scattered chunk by
                     //   chunk into bf16 tiles, then as kBf16Amx (core/spqmm_amx.h)
  kInt8Gemm = 10,    // int8 compute (dense or sparse), many rows: W decoded once into int8 rows,
                     //   x quantized per row, ATen's int8 GEMM (the coarser rule in core/spqmm_int8.h)
  kSparseBatchBf16 = 11,  // sparse, bf16 compute, AVX512-BF16: kSparseBatch with the steps in pairs,
                          //   each lane's two weights one bf16 pair, vdpbf16ps (core/spqmm_avx512.h)
  kInt8Dots = 12,    // dense, int8 compute, AVX-512 VNNI + VBMI: kInt8Fused for fewer rows than
                     //   lanes, each row of x whole against 8 rows of W, partial dots in the lanes
  kSparseInt8 = 13,  // sparse, int8 compute, AVX-512 VNNI + VBMI: kInt8Gemm's rule on the steps, four
                     //   at a time, a row of x's activations for their 64 slots picked by one byte
                     //   permute, u8 x s8 dot products (core/spqmm_avx512.h sparse_q8)
};


// The fused int8 kernel in either order (one host path, the same tables and rule).
constexpr bool spqmm_fused_int8(SpqmmKernel kernel) {
  return kernel == SpqmmKernel::kInt8Fused || kernel == SpqmmKernel::kInt8Dots;
}

constexpr int64_t kSpqmmNoBound = std::numeric_limits<int64_t>::max();
// Layers of 4M weights and more, where some kernels pay that do not on smaller ones (the int8
// and bf16 rules say why).
constexpr int64_t kSpqmmLargeWeights = int64_t(1) << 22;

struct SpqmmRule {
  SpqmmIsa isa;
  SpqmmMode mode;
  int64_t rows_below;  // the rule serves calls with fewer batch rows than this
  double max_density;  // ... and a slot density (padding included) at most this (sparse mode)
  SpqmmKernel kernel;
  int block;           // batch rows per pass; 0: the smallest of 1, 2, 4, 8 that holds the rows
  int64_t min_weights = 0;  // ... and a layer of at least this many weights (N K)
  int64_t min_rows = 0;     // ... and at least this many batch rows
  int min_bits = 0;         // ... and codes of at least this many bits
};

// The table. Density is the slots' (steps * 16 / (N K)): about 1.4x the kept fraction at 10%.
// Times: 4096 x 4096, two threads, every weight rotated past L3, median microseconds per call, on
// an AMD EPYC (Zen 4, AVX-512; the AVX2 rows with DCX_CPU_ISA=avx2 on the same CPU) unless a rule
// says otherwise. "kernel / decode + GEMM" compares the rule's kernel with the BLAS path.
constexpr SpqmmRule kSpqmmPlan[] = {
    // Portable kernels (no AVX2): one row with the step kernel; sparse mode with the batch in the
    // inner loop (target_clones vectorises it) while its slots are few, past that, and any dense
    // layer from two rows, decode + GEMM, whose multiply-adds run at BLAS speed while the
    // portable decode costs several instructions per weight (not measured since the AVX2 kernels
    // came; CPUs without AVX2 are rare).
    {SpqmmIsa::kPortable, SpqmmMode::kSparse, 2, 1.0, SpqmmKernel::kSparseSteps, 1},
    {SpqmmIsa::kPortable, SpqmmMode::kSparse, 64, 0.3, SpqmmKernel::kSparseBatch, 8},
    {SpqmmIsa::kPortable, SpqmmMode::kSparse, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
    {SpqmmIsa::kPortable, SpqmmMode::kDense, 2, 1.0, SpqmmKernel::kDenseRows, 1},
    {SpqmmIsa::kPortable, SpqmmMode::kDense, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
    {SpqmmIsa::kPortable, SpqmmMode::kInt8, 16, 1.0, SpqmmKernel::kInt8Rows, 0},
    {SpqmmIsa::kPortable, SpqmmMode::kInt8, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},

    // AVX2. Sparse, one row: the step kernel (10%, 5 bits: 883). From two rows the batch kernel,
    // 8 rows per pass (10%: 2 rows 1,488 / 8,731; 16 rows 3,127 / 12,599; 128 rows 21,965 /
    // 34,874; fp32 F.linear 37,497); its cost follows the slots, decode + GEMM's the dense
    // product, so at 25% kept (slots 0.29) they tie at 64-128 rows (64: 18,169 / 25,406; 128:
    // 40,568 / 38,677).
    {SpqmmIsa::kAvx2, SpqmmMode::kSparse, 2, 1.0, SpqmmKernel::kSparseSteps, 1},
    {SpqmmIsa::kAvx2, SpqmmMode::kSparse, kSpqmmNoBound, 0.2, SpqmmKernel::kSparseBatch, 8},
    {SpqmmIsa::kAvx2, SpqmmMode::kSparse, 96, 1.0, SpqmmKernel::kSparseBatch, 8},
    {SpqmmIsa::kAvx2, SpqmmMode::kSparse, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
    // Dense fp32: each weight decoded for up to 8 rows; from 9 each row of W decoded once into
    // L1 for all of them; decode + GEMM from 24 rows (5 bits: 16 rows 7,158 / 8,295, 32 rows
    // 18,677 / 12,876; on a Zen 3 CPU, 1536 x 384 and 384 x 1536 tied at 24-32).
    {SpqmmIsa::kAvx2, SpqmmMode::kDense, 9, 1.0, SpqmmKernel::kDenseRows, 0},
    {SpqmmIsa::kAvx2, SpqmmMode::kDense, 24, 1.0, SpqmmKernel::kDenseMany, 0},
    {SpqmmIsa::kAvx2, SpqmmMode::kDense, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
    // Dense int8. Up to 4 rows each weight decoded per pass (4 bits, int8 rows / fp32 kernel: 1
    // row 880 / 1,154); from 5 the rows of W decoded once into L1 (int8 rows / int8 many / decode
    // + GEMM: 4 rows 1,531 / 1,626 / 3,763; 8 rows 2,479 / 2,285 / 4,477; 16 rows 4,669 / 3,805 /
    // 6,096); decode + GEMM past 160 rows (measured on AVX-512 below: 128 rows 26,948 / 29,237,
    // the gap closing by about 1% a row). Layers under 4M weights compute as dense fp32: the
    // AVX-512 measurements below, not repeated with AVX2. (No int8 GEMM here: torch runs
    // at::_int_mm through oneDNN only on CPUs with AVX-512 VNNI, and as a plain loop elsewhere.)
    {SpqmmIsa::kAvx2, SpqmmMode::kInt8, 5, 1.0, SpqmmKernel::kInt8Rows, 0, kSpqmmLargeWeights},
    {SpqmmIsa::kAvx2, SpqmmMode::kInt8, 160, 1.0, SpqmmKernel::kInt8Many, 0, kSpqmmLargeWeights},
    {SpqmmIsa::kAvx2, SpqmmMode::kInt8, 9, 1.0, SpqmmKernel::kDenseRows, 0},
    {SpqmmIsa::kAvx2, SpqmmMode::kInt8, 24, 1.0, SpqmmKernel::kDenseMany, 0},
    {SpqmmIsa::kAvx2, SpqmmMode::kInt8, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},

    // Dense bf16 with AMX (measured on a 2-core Intel Xeon, Sapphire Rapids class, 3.7 GHz; AMX /
    // the AVX-512 rules below, 4096 x 4096 4 bits, 6 bits on the smaller layers): the AMX kernel
    // from one row on layers of 4M weights and more (4096 x 4096: 1 row 965 / 1,239; 16 rows
    // 1,141 / 5,978 (decode + oneDNN's bf16 GEMM); 128 rows 4,150 / 8,849; 256 rows 7,506 /
    // 13,428; 512 rows 16,967 / 20,488; 1,024 rows 48,988 / 40,669), on smaller ones from 8 (1
    // row: 384 x 384 39 / 28, 1536 x 384 97 / 64, 384 x 1536 118 / 61; 8 rows 42 / 46, 106 /
    // 131, 115 / 115; 16 rows 45 / 170, 127 / 296, 130 / 277; 512 rows 372 / 476, 841 / 1,114,
    // 1,056 / 1,194; 2,048 rows 1,446 / 867, 4,333 / 2,734, 5,542 / 2,830); decode + GEMM from
    // 768 rows (between 512 and 1,024: the C tiles of every pair of activation groups are stored
    // and reloaded per chunk of W, and each chunk is multiplied by all of x). Since the AVX-512
    // row kernel reads 4-bit blocks unmasked and prefetches, and each thread streams a contiguous
    // share of the rows, it beats AMX at one and two rows (4096 x 4096, 4 bits, row kernel / AMX:
    // 1 row 451 / 785; 2 rows 587 / 781; 4 rows 1,020 / 786; 8 rows 1,872 / 819; 6 bits, 1 row
    // 1,005 / 1,146).
    {SpqmmIsa::kAvx512Amx, SpqmmMode::kBf16, 3, 1.0, SpqmmKernel::kDenseRows, 0},
    {SpqmmIsa::kAvx512Amx, SpqmmMode::kBf16, 768, 1.0, SpqmmKernel::kBf16Amx, 16, kSpqmmLargeWeights},
    {SpqmmIsa::kAvx512Amx, SpqmmMode::kBf16, 8, 1.0, SpqmmKernel::kDenseRows, 0},
    {SpqmmIsa::kAvx512Amx, SpqmmMode::kBf16, 768, 1.0, SpqmmKernel::kBf16Amx, 16},
    // Sparse bf16 with AMX (the same Xeon; AMX / the sparse rules below / decode + oneDNN's bf16
    // GEMM, 5 bits): the step kernel up to 11 rows, then AMX up to 767 rows, as dense bf16 (10%
    // kept, 4096 x 4096: 8 rows 1,538 / 998 / 11,198; 12 rows 1,432 / 1,503; 16 rows 1,453 /
    // 1,480; 256 rows 6,984 / 23,425 / 15,147; 512 rows 15,705 / 49,962 / 19,390; 30% kept: 8
    // rows 2,824 / 2,085; 16 rows 2,858 / 3,233; 128 rows 6,080 / 30,069 / 23,205; 50% kept,
    // 1536 x 384: 8 rows 189 / 141; 16 rows 194 / 232; 128 rows 363 / 1,069 / 990; 512 rows 898
    // / 2,204 / 1,474). The AMX kernel's cost is the steps' scatter into the chunks (16 scalar
    // stores a step), about 40 cycles a step, against about 15 for the step kernel's products
    // per row, so it pays from a dozen rows.
    {SpqmmIsa::kAvx512Amx, SpqmmMode::kSparseBf16, 12, 1.0, SpqmmKernel::kSparseSteps, 0},
    {SpqmmIsa::kAvx512Amx, SpqmmMode::kSparseBf16, 768, 1.0, SpqmmKernel::kSparseAmx, 16},

    // Sparse int8 with VNNI (and VBMI): the sparse int8 kernel (four steps a unit, a permute and
    // a vpdpbusd per 64 slots and row of x) from 2 rows; one row stays with the step kernel (the
    // sparse rules below), which needs no first pass for the rows' scales. Then the int8 GEMM
    // (its rows straight from the steps into int8, core/spqmm_avx512.h sparse_quantize_rows),
    // whose cost is the dense product's plus a decode whatever the density, where the kernel's
    // follows its slots: on layers of 4M weights at slot densities up to 0.35 the kernel's time
    // stays a constant fraction of the GEMM's, so it runs at any batch there. Measured on a Zen 5
    // EPYC, two threads, interleaved, 5 bits; the kernel / the GEMM / the step kernel: 4096 x
    // 4096, 10% kept (slots 0.14): 1 row 189 / 1,687 / 171; 2 rows 195 / 2,039 / 224; 128 rows
    // 1,276 / 4,325 / 7,789; 512 rows 6,164 / 11,603; 1,024 rows 13,252 / 23,174; 2,048 rows
    // 25,881 / 44,580; 25% kept (slots 0.29): 1 row 360 / - / 322; 2 rows 377 / - / 434; 128 rows
    // 2,225 / 6,858; 512 rows 8,414 / 13,853; 768 rows 15,902 / 18,607; 1,024 rows 20,554 /
    // 23,849; 1,536 rows 29,862 / 34,811; 50% kept (slots 0.53): 1 row 657 / - / 574; 2 rows 674
    // / - / 758; 512 rows 14,508 / 18,050; 768 rows 21,662 / 22,787; 1,024 rows 28,615 / 28,308;
    // 75% kept (slots 0.77): 512 rows 20,004 / 21,683, again 20,774 / 20,642; 768 rows 32,769 /
    // 26,798; 1,024 rows 39,047 / 31,698. 1536 x 384, 10% kept: 512 rows 382 / 642; 1,024 rows
    // 823 / 1,346; 2,048 rows 1,901 / 1,650; 50% kept (all-MiniLM-L6-v2's shapes, 1536 x 384 /
    // 384 x 1536 / 384 x 384): 1 row 41 / 32 / 16 against the step kernel's 35 / 29 / 14; 2 rows
    // 42 / 33 / 16 against 44 / 38 / 17; 128 rows 187 / 155 / 60 against the GEMM's 323 / 286 /
    // 98; 512 rows 638 / 527 / 186 against 718 / 540 / 161; 2,048 rows 3,064 / 2,181 / 714
    // against 1,888 / 1,704 / 468 (the small layers' times at many rows vary from run to run:
    // 1536 x 384 at 2,048 rows, 6,293 / 3,599 and 3,558 / 3,638 in two other runs). The GEMM
    // beats the fp32 sparse rules there (1536 x 384, 50%, 2,048 rows: 3,599 against 15,853 for
    // the batch kernel and 12,035 for decode + GEMM).
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kSparseInt8, kSpqmmNoBound, 0.35, SpqmmKernel::kSparseInt8, 16, kSpqmmLargeWeights, 2},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kSparseInt8, 1024, 0.55, SpqmmKernel::kSparseInt8, 16, kSpqmmLargeWeights, 2},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kSparseInt8, 1536, 0.2, SpqmmKernel::kSparseInt8, 16, 0, 2},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kSparseInt8, 512, 1.0, SpqmmKernel::kSparseInt8, 16, 0, 2},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kSparseInt8, kSpqmmNoBound, 1.0, SpqmmKernel::kInt8Gemm, 0, 0, 2},

    // Sparse bf16 (on CPUs with AVX512-BF16; the sparse rules below serve the others, and fewer
    // than 6 rows): the bf16 batch kernel. It costs its slots whatever the rows up to 16 (10% kept,
    // slots 0.14: 2 rows 1,141; 4 rows 849; 6 rows 801; 8 rows 924; 16 rows 942), so it takes over
    // from the step kernel at 6 rows; it runs a slot in about 1.3 cycles where the float batch
    // kernel takes 2.3, and decodes once for up to 64 rows. The sparse rules / this kernel /
    // decode + oneDNN's bf16 GEMM: slots 0.14, 4 rows 570 / 849; 6 rows 949 / 801; 12 rows 1,254
    // / 977; 16 rows 1,522 / 942; 32 rows 3,257 / 1,967; 128 rows 9,257 / 6,459 / 17,464; 256
    // rows 19,383 / 11,499 / 28,170; 512 rows 45,492 / 23,742 / 50,001; 1,024 rows (this kernel /
    // GEMM) 52,398 / 98,002; slots 0.34, 64 rows 12,102 / 6,274 / 14,967; 128 rows 19,706 /
    // 12,412 / 19,885; 256 rows 57,823 / 24,494 / 32,803; 512 rows (this kernel / GEMM) 48,044 /
    // 52,314; 1,024 rows 104,928 / 105,923, a tie that holds past it (both cost about 102 us a
    // row). Past slots 0.35 its cost, scaled by the slots from 0.34, meets the GEMM's at about 128
    // rows. With AMX the rules above serve up to 767 rows; past them these (not measured there).
    {SpqmmIsa::kAvx512, SpqmmMode::kSparseBf16, kSpqmmNoBound, 0.35, SpqmmKernel::kSparseBatchBf16, 16, 0, 6},
    {SpqmmIsa::kAvx512, SpqmmMode::kSparseBf16, 128, 0.55, SpqmmKernel::kSparseBatchBf16, 16, 0, 6},

    // AVX-512. Sparse: the step kernel, 8 rows per pass, up to 11 rows (10%, 5 bits: 1 row 291,
    // 8 rows 898 / decode + GEMM 8,725); from 12 the batch kernel with 16 rows per pass (10%, step
    // / batch kernel: 8 rows 1,098 / 1,454; 12 rows 2,127 / 1,523; 16 rows 1,789 / 1,290; 64 rows
    // 8,652 / 6,005; 128 rows 13,849 / 10,317, decode + GEMM 30,652; 25% kept, 128 rows 30,348 /
    // 20,340, decode + GEMM 35,200). Measured before the kernels kept their accumulators in
    // registers: both run faster now (the anchors, 10% kept: 1 row 288, 8 rows 1,075, 16 rows
    // 1,293, 128 rows 8,804; step kernel 4 rows 509, 8 rows 1,061), and the 12-row crossover
    // holds (step kernel at 12 rows, a pass of 8 and one of 4: about 1,570; batch kernel 1,300 at
    // any 12 to 16 rows). The batch kernel costs its slots, decode + GEMM (the AVX-512 sparse
    // decode, then MKL) about 12 ms plus 0.18 ms a row, so the batch kernel serves denser layers
    // than it did too (batch kernel / decode + GEMM: slots 0.39, 64 rows 10,776 / 22,103; 128
    // rows 21,137 / 32,403; 256 rows 41,988 / 53,383; slots 0.53, 96 rows 21,134 / 27,704; 128
    // rows 27,315 / 31,740; 256 rows 54,885 / 53,053).
    {SpqmmIsa::kAvx512, SpqmmMode::kSparse, 2, 1.0, SpqmmKernel::kSparseSteps, 1},
    {SpqmmIsa::kAvx512, SpqmmMode::kSparse, 12, 1.0, SpqmmKernel::kSparseSteps, 0},
    {SpqmmIsa::kAvx512, SpqmmMode::kSparse, kSpqmmNoBound, 0.3, SpqmmKernel::kSparseBatch, 16},
    {SpqmmIsa::kAvx512, SpqmmMode::kSparse, 256, 0.55, SpqmmKernel::kSparseBatch, 16},
    {SpqmmIsa::kAvx512, SpqmmMode::kSparse, 96, 1.0, SpqmmKernel::kSparseBatch, 16},
    {SpqmmIsa::kAvx512, SpqmmMode::kSparse, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
    // Dense fp32, 8 rows per pass, up to 10 rows (5 bits: 8 rows 3,625 / 4,645; 12 rows 6,909 /
    // 5,204).
    {SpqmmIsa::kAvx512, SpqmmMode::kDense, 10, 1.0, SpqmmKernel::kDenseRows, 0},
    {SpqmmIsa::kAvx512, SpqmmMode::kDense, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
    // Dense int8 with VNNI (and VBMI; measured before the few-rows order below took 2 to 12
    // rows): up to 2 rows the fp32 kernels, then the fused int8 kernel (kInt8Fused: the int8
    // GEMM's rule in one pass, rows of W decoded by tables of their own, u8 x s8 dot products,
    // the batch rows in the lanes) up to 511 rows on layers of 4M weights and more, up to 191 on
    // smaller ones, then the int8 GEMM, whose blocking wins once x is large. (The plan at the
    // time / the fused kernel: 4096 x 4096, 4 bits, 2 rows 728 / 1,033; 3 rows 1,482 / 1,114; 4
    // rows 1,449 / 1,046; 8 rows 2,983 / 1,129; 16 rows 2,048 / 1,233; 32 rows 3,469 / 1,958;
    // 64 rows 5,205 / 3,618; 128 rows 8,072 / 6,763; 256 rows 14,191 / 13,339; 512 rows 25,447
    // / 25,814; 6 bits, 1 row 1,209 / 1,162; 2 rows 1,445 / 1,174; 16 rows 2,538 / 1,295; 128
    // rows 9,213 / 7,064; all-MiniLM-L6-v2's layers, 6 bits, 384 x 384 / 1536 x 384 / 384 x
    // 1536: 2 rows 42 / 40, 79 / 76, 65 / 73; 3 rows 40 / 36, 84 / 68, 76 / 71; 16 rows 45 / 32,
    // 156 / 111, 137 / 76; 128 rows 283 / 287, 563 / 447, 404 / 377; 192 rows 305 / 316, 631 /
    // 598, 790 / 860; 256 rows 336 / 351, 803 / 840, 590 / 607; 4096 rows (int8 GEMM) 2,523 /
    // 4,410, 7,638 / 13,256, 7,538 / 11,111; measured before the kernel took its weights as
    // broadcasts within vpdpbusd, which made it faster still: 4096 x 4096, 4 bits, 16 rows, one
    // thread 2,836 -> 2,465). The kernel that came before it, int16 pairs and vpdpwssd with x
    // quantized per 32 columns, ran at about half its speed; the fused kernel takes the GEMM's
    // coarser rule, all-MiniLM-L6-v2 at 6 bits cos 0.9907 against fp32 where the blocks of 32
    // gave 0.9942, core/spqmm_int8.h. The GEMM runs where torch takes oneDNN for at::_int_mm,
    // which needs VNNI: so only these rules. The op falls back to decode + GEMM where K passes
    // kQ8GemmMaxK (either kernel) or oneDNN is switched off (the GEMM), and a layer with group
    // scales, for the fused kernel, whose tables are per row, takes the fp32 rows kernel where the
    // dense rules run it and the GEMM elsewhere: csrc/cpu/spqmm_cpu.cpp cpu_plan.)
    // The few-rows order of the fused kernel (kInt8Dots: each row of x whole against the decoded
    // rows of W, where the lanes order leaves lanes idle) from 2 rows, up to 12 on layers of 4M
    // weights and more, up to 7 on smaller ones; one row too with codes of 6 bits and more, below
    // that the fp32 kernel. Measured on a Zen 5 EPYC (AVX-512 VNNI), two threads, interleaved;
    // the fp32 rows kernel / lanes / dots:
    // 4096 x 4096, 4 bits: 1 row 200 / - / 285; 2 rows 432 / - / 308; 3 rows - / 548 / 318;
    // then with x staged vectorised for both orders: 4 rows - / 489 / 278; 6 rows - / 490 / 346;
    // 8 rows - / 514 / 401; 10 rows - / 508 / 460; 12 rows - / 495 / 466; 13 rows - / 497 / 505;
    // 16 rows - / 548 / 637; 6 bits: 2 rows 704 / - / 466; 10 rows - / 623 / 576; 12 rows - /
    // 644 / 618; 13 rows - / 641 / 651. 6 bits, lanes / dots, 1536 x 384, 384 x 1536, 384 x
    // 384: 4 rows 39 / 33, 35 / 28, 20 / 18; 8 rows 39 / 42, 37 / 33, 20 / 20; 11 rows 40 / 48,
    // 37 / 38, 21 / 22. One row, the fp32 kernel / dots, 4096 x 4096, 1024 x 1024, 1536 x 384,
    // 384 x 1536, 384 x 384: 4 bits 198 / 238, 24.8 / 26.8, 16.1 / 19.1, 15.3 / 16.8, 10.3 /
    // 10.5; 5 bits 448 / 446, 39.5 / 41.4, 38.6 / 39.1, 25.4 / 20.4, 13.4 / 12.1; 6 bits 601 /
    // 406, 49.5 / 39.4, 33.3 / 30.3, 31.1 / 22.1, 15.1 / 12.9; 7 bits 888 / 476, 68.5 / 49.8, - ,
    // 43.2 / 28.6, 17.3 / 14.4; 8 bits 1,016 / 388, 72.7 / 38.1, -, 43.9 / 23.1, 18.7 / 15.7:
    // the fp32 kernel's decode grows with the bits (5 to 7 bits straddle bytes), the dots
    // kernel's table lookup does not.
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kInt8, 2, 1.0, SpqmmKernel::kInt8Dots, 0, 0, 0, 6},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kInt8, 2, 1.0, SpqmmKernel::kDenseRows, 0},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kInt8, 13, 1.0, SpqmmKernel::kInt8Dots, 0, kSpqmmLargeWeights},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kInt8, 8, 1.0, SpqmmKernel::kInt8Dots, 0},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kInt8, 512, 1.0, SpqmmKernel::kInt8Fused, 0, kSpqmmLargeWeights},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kInt8, 192, 1.0, SpqmmKernel::kInt8Fused, 0},
    {SpqmmIsa::kAvx512Vnni, SpqmmMode::kInt8, kSpqmmNoBound, 1.0, SpqmmKernel::kInt8Gemm, 0},
    // Dense int8 (the AVX2 int8 kernels). One row: fp32 (4 bits, fp32 / int8 rows: 741 / 863);
    // 2 to 4 rows each weight decoded per pass; from 5 rows of W decoded once (4 bits, int8 rows /
    // int8 many / decode + GEMM: 8 rows 2,490 / 2,196 / 4,444; 16 rows 4,619 / 3,762 / 6,210; 32
    // rows 9,073 / 6,556 / 9,040; 128 rows 41,623 / 26,948 / 29,237; 6 bits, 16 rows 6,577 /
    // 4,835 / 7,531). Only on layers of 4M weights and more: 6 bits, int8 / the fp32 path, 8, 16
    // and 128 rows: 384 x 384 1.99 / 1.44 / 2.17 times slower, 1536 x 384 1.84 / 1.39 / 1.41,
    // 384 x 1536 1.64 / 1.29 / 1.99, 1024 x 1024 1.48 / 1.02 / 1.39; 2048 x 2048 0.98 / 0.85 /
    // 1.17; so smaller layers compute as dense fp32. (No int8 GEMM: see the AVX2 rules.)
    {SpqmmIsa::kAvx512, SpqmmMode::kInt8, 2, 1.0, SpqmmKernel::kDenseRows, 1},
    {SpqmmIsa::kAvx512, SpqmmMode::kInt8, 5, 1.0, SpqmmKernel::kInt8Rows, 0, kSpqmmLargeWeights},
    {SpqmmIsa::kAvx512, SpqmmMode::kInt8, 160, 1.0, SpqmmKernel::kInt8Many, 0, kSpqmmLargeWeights},
    {SpqmmIsa::kAvx512, SpqmmMode::kInt8, 10, 1.0, SpqmmKernel::kDenseRows, 0},
    {SpqmmIsa::kAvx512, SpqmmMode::kInt8, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},

    // CUDA (not yet measured on a GPU): the kernels read the compressed bytes once per 8 batch
    // rows, cuBLAS the dense bytes once, so the crossover grows as density falls.
    {SpqmmIsa::kCuda, SpqmmMode::kSparse, 48, 0.15, SpqmmKernel::kSparseSteps, 8},
    {SpqmmIsa::kCuda, SpqmmMode::kSparse, 24, 0.3, SpqmmKernel::kSparseSteps, 8},
    {SpqmmIsa::kCuda, SpqmmMode::kSparse, 8, 1.0, SpqmmKernel::kSparseSteps, 8},
    {SpqmmIsa::kCuda, SpqmmMode::kSparse, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
    {SpqmmIsa::kCuda, SpqmmMode::kDense, 8, 1.0, SpqmmKernel::kDenseRows, 8},
    {SpqmmIsa::kCuda, SpqmmMode::kDense, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
    {SpqmmIsa::kCuda, SpqmmMode::kInt8, 16, 1.0, SpqmmKernel::kInt8Rows, 8},
    {SpqmmIsa::kCuda, SpqmmMode::kInt8, kSpqmmNoBound, 1.0, SpqmmKernel::kDecodeGemm, 0},
};

constexpr int kSpqmmPlanSize = int(sizeof(kSpqmmPlan) / sizeof(kSpqmmPlan[0]));

struct SpqmmPlan {
  SpqmmKernel kernel = SpqmmKernel::kDecodeGemm;
  int block = 1;     // batch rows per pass
  int threads = 1;   // at most this many threads
  int64_t tile = 1;  // work items: output rows (dense, int8), groups of 16 rows (row lists) or
                     // chunks (steps); handed out one at a time to whichever thread is free
  int rule = -1;     // index in kSpqmmPlan
};

// Smallest block of 1, 2, 4, 8 batch rows that holds `rows` (8 past that).
inline int spqmm_rows_block(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

// The tiles and threads of a plan whose kernel is chosen, for a layer of n x k weights (sparse:
// `density` of slots) and `rows` batch rows on up to `threads` threads: spqmm_plan's last step,
// and that of a caller that changes the kernel.
inline void spqmm_size_tiles(SpqmmPlan& plan, SpqmmMode mode, double density, int64_t n, int64_t k,
                             int64_t rows, int threads) {
  // Tiles: about 32K weights of W (a few microseconds of work) each, so a thread that loses its
  // core costs the others one tile, not its share; and no more threads than tiles of work, with a
  // layer of under 64K multiply-adds on one thread (a parallel region costs more than it saves).
  const double macs = double(n) * double(k) * double(std::max<int64_t>(rows, 1)) *
                      (spqmm_sparse(mode) ? density : 1.0);
  const int64_t weights_per_row = std::max<int64_t>(k, 1);
  switch (plan.kernel) {
    case SpqmmKernel::kSparseBatch:  // groups of 16 rows
    case SpqmmKernel::kSparseBatchBf16:
      plan.tile = std::max<int64_t>(1, int64_t(2048.0 / std::max(density * weights_per_row, 1.0)));
      break;
    // ... and at least 4 per thread (a tile is every row of x against its groups: 384 x 384 at 50%
    // made 3 tiles of 9 groups for two threads).
    case SpqmmKernel::kSparseInt8:
      plan.tile = std::max<int64_t>(1, std::min(int64_t(2048.0 / std::max(density * weights_per_row, 1.0)),
                                                (n + 16 * 4 * std::max(threads, 1) - 1) / (16 * 4 * std::max(threads, 1))));
      break;
    case SpqmmKernel::kSparseSteps: plan.tile = 1; break;
    // A few rows of x make a tile of 32K weights a microsecond of work, each the next one's
    // prefetch target (often another thread's): 512K weights per tile (4096 x 4096, 4 bits, 4
    // rows: 391 -> 343 us), and at least 4 tiles per thread (a 1536 x 384 layer in 2 tiles of
    // 1365 rows ran on one thread: 4 rows 30 -> 48 us).
    case SpqmmKernel::kInt8Dots:
      plan.tile = std::max<int64_t>(1, std::min((int64_t(1) << 19) / weights_per_row, n / (4 * std::max(threads, 1))));
      break;
    default: plan.tile = std::max<int64_t>(1, (int64_t(1) << 15) / weights_per_row);
  }
  plan.threads = macs < double(1 << 16) ? 1 : std::max(1, threads);
}

// A layer of n x k weights, codes of `bits` bits (sparse: `density` of slots) for `rows` batch rows
// on up to `threads` threads. crossover >= 0 forces decode + GEMM from that many rows on (the op's
// argument).
inline SpqmmPlan spqmm_plan(SpqmmIsa isa, SpqmmMode mode, int bits, double density, int64_t n,
                            int64_t k, int64_t rows, int threads, int64_t crossover = -1) {
  SpqmmPlan plan;
  if (crossover >= 0 && rows >= std::max<int64_t>(crossover, 1)) {
    plan.kernel = SpqmmKernel::kDecodeGemm;
  } else {
    for (int i = 0; i < kSpqmmPlanSize; ++i) {
      const SpqmmRule& r = kSpqmmPlan[i];
      if (!spqmm_isa_serves(r.isa, isa) || !spqmm_mode_serves(r.mode, mode) || rows >= r.rows_below ||
          rows < r.min_rows || density > r.max_density || double(n) * double(k) < double(r.min_weights) ||
          bits < r.min_bits)
        continue;
      // Below a forced crossover the kernels run, whatever the table says past it.
      if (crossover >= 0 && r.kernel == SpqmmKernel::kDecodeGemm) continue;
      plan.kernel = r.kernel;
      plan.block = r.block > 0 ? r.block : spqmm_rows_block(rows);
      plan.rule = i;
      break;
    }
    if (plan.rule < 0 && crossover >= 0) {  // a forced crossover past every kernel's bound
      plan.kernel = spqmm_sparse(mode) ? SpqmmKernel::kSparseSteps
                    : mode == SpqmmMode::kInt8  ? SpqmmKernel::kInt8Rows
                                                : SpqmmKernel::kDenseRows;
      plan.block = isa == SpqmmIsa::kCuda ? 8 : spqmm_rows_block(rows);
    }
  }
  spqmm_size_tiles(plan, mode, density, n, k, rows, threads);
  return plan;
}

}  // namespace dcx
