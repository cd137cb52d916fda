/*
 * qlora-ft: QLoRA finetuning from the command line, on libqlora's public API.
 *
 *   qlora-ft train --model DIR --data FILE --out DIR [options]   finetune LoRA adapters
 *   qlora-ft generate [--model DIR] [--adapter DIR] --prompt TEXT  try them
 *   qlora-ft merge --model DIR --adapter DIR --out DIR [--bits 16|4]  fold them into the base
 *   qlora-ft [--out DIR] [--metrics FILE] [train options]          the embedded default run
 *
 * Exit codes: 0 success, 1 failure, 2 usage error, 130 interrupted (training saved a checkpoint).
 */
#include "ft_adapter.h"
#include "ft_generate.h"
#include "ft_train.h"

#include <stdio.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(f, "qlora-ft %s: finetune 4-bit LLaMA-family models with LoRA adapters\n"
               "\n"
               "usage: qlora-ft train --model DIR --data FILE [--out DIR] [options]\n"
               "       qlora-ft generate [--model DIR] [--adapter DIR] --prompt TEXT [options]\n"
               "       qlora-ft merge --model DIR --adapter DIR --out DIR [--bits 16|4]\n"
               "       qlora-ft [--out DIR] [--metrics FILE] [options]\n"
               "\n"
               "Without a command (or with train and neither --model nor --data) it finetunes the embedded\n"
               "default: a small LLaMA-architecture model and an instruction dataset built into the binary.\n"
               "`qlora-ft COMMAND --help` describes each command.\n"
               "\n"
               "Exit codes: 0 success, 1 failure, 2 usage error, 130 interrupted (a checkpoint was saved).\n",
            qlora_version_string());
}

static int train_main(int argc, char **argv) {
    ft_train_opts o;
    ft_train_defaults(&o);
    int has_model = 0;
    for (int i = 0; i < argc; i++)
        has_model |= !strncmp(argv[i], "--model", 7) || !strncmp(argv[i], "--data", 6);
    if (!has_model)
        ft_train_embedded_defaults(&o);
    int help;
    int rc = ft_train_parse(argc, argv, &o, &help);
    if (rc)
        return help ? 0 : rc;
    return ft_train_run(&o);
}

int main(int argc, char **argv) {
    if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help"))) {
        usage(stdout);
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "--version")) {
        printf("qlora-ft %s\n", qlora_version_string());
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "train"))
        return train_main(argc - 2, argv + 2);
    if (argc > 1 && !strcmp(argv[1], "generate"))
        return ft_generate_main(argc - 2, argv + 2);
    if (argc > 1 && !strcmp(argv[1], "merge"))
        return ft_merge_main(argc - 2, argv + 2);
    if (argc > 1 && strncmp(argv[1], "--", 2) != 0) {
        fprintf(stderr, "qlora-ft: unknown command '%s' (train, generate, merge; --help)\n", argv[1]);
        return 2;
    }
    return train_main(argc - 1, argv + 1);
}
