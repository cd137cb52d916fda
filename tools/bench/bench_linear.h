/*
 * `qlora-bench linear`: the QLoRA linear layer (NF4 + double quant weight, one BF16 adapter)
 * against the same layer with an unquantized weight through the platform BLAS, side by side
 * in one run. See bench_linear.c for what is timed.
 */
#ifndef QLORA_BENCH_LINEAR_H
#define QLORA_BENCH_LINEAR_H

/* argv[0] is "linear". Returns the process exit code (0 ok, 1 bad usage, 2 failure). */
int bench_linear_main(int argc, char **argv);

#endif
