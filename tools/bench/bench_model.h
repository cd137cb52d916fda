/*
 * `qlora-bench model`: one training micro-batch (forward + backward with activation
 * checkpointing) of whole random Llama decoders, its token rate and FLOP rate next to a dense
 * matmul of the same layer shapes measured in the same run, and the accountant's peak memory
 * next to qlora_mem_estimate. See bench_model.c for what is timed and counted.
 */
#ifndef QLORA_BENCH_MODEL_H
#define QLORA_BENCH_MODEL_H

/* argv[0] is "model". Returns the process exit code (0 ok, 1 bad usage, 2 failure). */
int bench_model_main(int argc, char **argv);

#endif
