/*
 * `qlora-bench adamw`: the paged AdamW step (qlora_optimizer_step) over BF16 LoRA parameters,
 * its memory throughput against a plain copy of the same bytes, and the cost of paging the
 * optimizer state out of a capped device pool. See bench_adamw.c for what is timed.
 */
#ifndef QLORA_BENCH_ADAMW_H
#define QLORA_BENCH_ADAMW_H

/* argv[0] is "adamw". Returns the process exit code (0 ok, 1 bad usage, 2 failure). */
int bench_adamw_main(int argc, char **argv);

#endif
