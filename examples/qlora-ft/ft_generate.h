/* qlora-ft generate (ft_generate.c): argv after "generate"; returns the exit code. */
#ifndef QLORA_FT_GENERATE_H
#define QLORA_FT_GENERATE_H

int ft_generate_main(int argc, char **argv);

#endif
