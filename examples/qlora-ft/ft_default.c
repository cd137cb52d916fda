/* The embedded default model of qlora-ft (ft_default.h). */
#include "ft_default.h"
#include "ft_fs.h"

#include <qlora.h>

#include <stdio.h>

#define FT_INIT_STD 0.02              /* transformers' initializer_range default */
#define FT_DEFAULT_SEED 0x716c6f7261ULL /* "qlora" */

/* Writes tmp/config.json (the embedded bytes), tmp/tokenizer.json and tmp/model.safetensors. */
static int write_model(const char *tmp, char *err, size_t cap) {
    char path[4300];
    snprintf(path, sizeof path, "%s/config.json", tmp);
    if (ft_write_file(path, ft_default_config, ft_default_config_len, err, cap) != 0)
        return -1;
    qlora_model_config cfg;
    if (qlora_model_config_from_json_file(path, &cfg) != QLORA_OK) {
        snprintf(err, cap, "embedded default config: %s", qlora_last_error());
        return -1;
    }
    /* The library writes its own config.json of cfg next to the weights; the embedded one, with
     * its token ids and transformers' fields, replaces it after. */
    if (qlora_model_write_random(&cfg, tmp, FT_DEFAULT_SEED, FT_INIT_STD) != QLORA_OK) {
        snprintf(err, cap, "%s", qlora_last_error());
        return -1;
    }
    if (ft_write_file(path, ft_default_config, ft_default_config_len, err, cap) != 0)
        return -1;
    snprintf(path, sizeof path, "%s/tokenizer.json", tmp);
    return ft_write_file(path, ft_default_tokenizer, ft_default_tokenizer_len, err, cap);
}

int ft_default_model_write(const char *dir, char *err, size_t cap) {
    char tmp[4200], path[4300];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (ft_exists(path))
        return 0;
    if (ft_tmpdir_for(dir, tmp, sizeof tmp, err, cap) != 0)
        return -1;
    if (write_model(tmp, err, cap) != 0) {
        char ignored[256];
        ft_remove_tree(tmp, ignored, sizeof ignored); /* the first error is the one reported */
        return -1;
    }
    return ft_dir_commit(tmp, dir, err, cap);
}
