/*
 * qlora-ft train: the finetuning loop.
 *
 * Each optimizer step takes batch / micro_batch micro-batches from the data walker, runs
 * qlora_model_forward_backward on each with the loss normalised by the target tokens of the
 * whole step (so accumulation equals one big batch), then one paged-AdamW update (clipping and
 * the schedule inside). Dropout streams are numbered by (step, micro-batch), so a run is the
 * same bits every time on one machine, and a resumed run continues exactly: a checkpoint holds
 * the adapter, the optimizer state, and the data position after the step.
 *
 * Output directory: adapter/ (the final PEFT adapter), checkpoints/step-NNNNNNNN/ (adapter +
 * optimizer.safetensors + trainer_state.json; the last two are kept), loss.svg, base-model/ for
 * the embedded default.
 */
#include "ft_adapter.h"
#include "ft_data.h"
#include "ft_default.h"
#include "ft_fs.h"
#include "ft_report.h"
#include "ft_train.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FT_KEEP_CHECKPOINTS 2

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Everything a run holds; freed by run_free. */
typedef struct run {
    const ft_train_opts *o;
    char model_dir[4096];
    qlora_ctx *ctx;
    qlora_tokenizer *tok;
    qlora_model *model;
    qlora_model_config cfg;
    qlora_optimizer *opt;
    ft_dataset train, eval;
    ft_batcher walker;
    ft_batch *micro;          /* the micro-batches of one step */
    int64_t n_micro, total_steps, step;
    ft_adapter_config acfg;
    ft_history history;
    FILE *metrics;
    char err[2048];
} run;

static int fail(run *r, const char *what) {
    fprintf(stderr, "qlora-ft train: %s%s%s\n", what, r->err[0] ? ": " : "", r->err);
    return 1;
}

static int lib_fail(run *r, const char *what) {
    snprintf(r->err, sizeof r->err, "%s", qlora_last_error());
    return fail(r, what);
}

static void log_to_stderr(qlora_log_level level, const char *message, void *user) {
    (void)user;
    if (level >= QLORA_LOG_WARN)
        fprintf(stderr, "libqlora: %s\n", message);
}

static int open_context(run *r) {
    const ft_train_opts *o = r->o;
    qlora_ctx_params p = qlora_ctx_default_params();
    p.num_threads = o->threads;
    int want_cuda = !strcmp(o->device, "cuda") ||
                    (!strcmp(o->device, "auto") && qlora_has_cuda_backend() && qlora_cuda_device_count() > 0);
    if (want_cuda)
        p.backend = QLORA_BACKEND_CUDA;
    if (qlora_ctx_create(&p, &r->ctx) != QLORA_OK)
        return lib_fail(r, want_cuda ? "cannot open the GPU (--device cpu runs on the CPU)" : "cannot create a context");
    qlora_set_log_callback(log_to_stderr, NULL);
    return 0;
}

static int load_data(run *r) {
    const ft_train_opts *o = r->o;
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer.json", r->model_dir);
    if (qlora_tokenizer_load(path, &r->tok) != QLORA_OK)
        return lib_fail(r, "cannot load the tokenizer");
    ft_data_opts d = {FT_FORMAT_AUTO, o->seq, o->train_on_prompt, o->skip_bad_lines};
    int f = ft_format_from_name(o->format);
    if (f < 0) {
        snprintf(r->err, sizeof r->err, "--format %s (auto, alpaca, text, prompt-completion, chat)", o->format);
        return fail(r, "unknown data format");
    }
    d.format = (ft_format)f;
    int rc = o->data_path
                 ? ft_dataset_load(o->data_path, NULL, 0, NULL, r->tok, &d, &r->train, r->err, sizeof r->err)
                 : ft_dataset_load(NULL, (const char *)ft_default_data, ft_default_data_len, "embedded data.jsonl",
                                   r->tok, &d, &r->train, r->err, sizeof r->err);
    if (rc != 0)
        return fail(r, "cannot load the data");
    if (r->train.skipped > 0)
        fprintf(stderr, "warning: %lld malformed records skipped (--skip-bad-lines); the first: %s\n",
                (long long)r->train.skipped, r->err);
    r->err[0] = '\0';
    if (ft_dataset_split(&r->train, o->eval_split, o->seed, &r->eval, r->err, sizeof r->err) != 0)
        return fail(r, "cannot split the data");
    fprintf(stderr, "data: %lld training and %lld evaluation examples (%s), %lld tokens, %lld truncated to %lld "
            "tokens, %lld malformed records skipped\n", (long long)r->train.count, (long long)r->eval.count,
            ft_format_name(r->train.format), (long long)(r->train.tokens + r->eval.tokens),
            (long long)(r->train.truncated + r->eval.truncated), (long long)o->seq,
            (long long)(r->train.skipped + r->eval.skipped));
    return 0;
}

static int load_model(run *r) {
    const ft_train_opts *o = r->o;
    qlora_model_load_opts lo = qlora_model_load_default_opts();
    lo.lora.rank = o->rank;
    lo.lora.alpha = o->alpha;
    lo.lora.dropout = o->dropout;
    lo.lora.use_rslora = o->use_rslora;
    lo.lora.seed = o->seed;
    lo.targets = o->targets;
    double t0 = now_s();
    if (qlora_model_load(r->ctx, r->model_dir, &lo, &r->model) != QLORA_OK)
        return lib_fail(r, "cannot load the model");
    qlora_model_get_config(r->model, &r->cfg);
    if (qlora_tokenizer_vocab_size(r->tok) > r->cfg.vocab_size) {
        snprintf(r->err, sizeof r->err, "the tokenizer has %d tokens but config.json's vocab_size is %lld",
                 qlora_tokenizer_vocab_size(r->tok), (long long)r->cfg.vocab_size);
        return fail(r, "tokenizer and model do not match");
    }
    fprintf(stderr, "model: %s, %lld layers, hidden %lld, vocab %lld; quantized to NF4 in %.1f s; LoRA r %d alpha "
            "%g dropout %g on %s\n", r->model_dir, (long long)r->cfg.num_layers, (long long)r->cfg.hidden_size,
            (long long)r->cfg.vocab_size, now_s() - t0, o->rank, o->alpha, o->dropout,
            o->targets == QLORA_TARGET_ALL_LINEAR ? "all linear layers" : "the chosen projections");
    r->acfg.rank = o->rank;
    r->acfg.alpha = o->alpha;
    r->acfg.dropout = o->dropout;
    r->acfg.use_rslora = o->use_rslora;
    r->acfg.targets = o->targets;
    snprintf(r->acfg.base_model, sizeof r->acfg.base_model, "%s", r->model_dir);
    return 0;
}

static int make_optimizer(run *r) {
    const ft_train_opts *o = r->o;
    qlora_adamw_params p = qlora_adamw_default_params();
    p.max_grad_norm = o->max_grad_norm;
    p.weight_decay = o->weight_decay;
    p.gpu_mem_limit = (uint64_t)(o->gpu_mem_limit_gb * 1e9);
    p.schedule.kind = o->schedule;
    p.schedule.lr = o->lr;
    p.schedule.warmup_steps = (int64_t)ceil(o->warmup_ratio * (double)r->total_steps);
    p.schedule.total_steps = r->total_steps;
    if (qlora_adamw_create(r->ctx, &p, &r->opt) != QLORA_OK)
        return lib_fail(r, "cannot create the optimizer");
    for (int64_t l = 0; l < r->cfg.num_layers; l++)
        for (int j = 0; qlora_target_name(j); j++) {
            qlora_linear *lin;
            qlora_tensor a, b, ga, gb;
            int id;
            if (qlora_model_linear(r->model, l, qlora_target_name(j), &lin) != QLORA_OK ||
                qlora_linear_find_adapter(lin, "default", &id) != QLORA_OK)
                continue;
            if (qlora_linear_adapter_tensors(lin, id, &a, &b, &ga, &gb) != QLORA_OK ||
                qlora_optimizer_add_param(r->opt, &a, &ga) != QLORA_OK ||
                qlora_optimizer_add_param(r->opt, &b, &gb) != QLORA_OK)
                return lib_fail(r, "cannot register the adapters with the optimizer");
        }
    return 0;
}

/* ---- checkpoints */

static void checkpoint_dir(const run *r, int64_t step, char *out, size_t cap) {
    snprintf(out, cap, "%s/checkpoints/step-%08lld", r->o->out_dir, (long long)step);
}

/* The options a checkpoint must agree with to be resumed. */
static cJSON *run_signature(const run *r) {
    const ft_train_opts *o = r->o;
    cJSON *s = cJSON_CreateObject();
    cJSON_AddNumberToObject(s, "rank", o->rank);
    cJSON_AddNumberToObject(s, "targets", o->targets);
    cJSON_AddNumberToObject(s, "batch", (double)o->batch);
    cJSON_AddNumberToObject(s, "micro_batch", (double)o->micro_batch);
    cJSON_AddNumberToObject(s, "seq", (double)o->seq);
    cJSON_AddNumberToObject(s, "packing", o->packing);
    cJSON_AddNumberToObject(s, "seed", (double)o->seed);
    cJSON_AddNumberToObject(s, "train_examples", (double)r->train.count);
    cJSON_AddNumberToObject(s, "total_steps", (double)r->total_steps);
    return s;
}

static int save_checkpoint(run *r) {
    char final[4200], tmp[4300], path[4400];
    checkpoint_dir(r, r->step, final, sizeof final);
    snprintf(path, sizeof path, "%s/checkpoints", r->o->out_dir);
    if (ft_mkdirs(path, r->err, sizeof r->err) != 0 || ft_tmpdir_for(final, tmp, sizeof tmp, r->err, sizeof r->err))
        return fail(r, "cannot save a checkpoint");
    if (ft_adapter_write_files(r->model, &r->acfg, tmp, r->err, sizeof r->err) != 0)
        return fail(r, "cannot save a checkpoint");
    snprintf(path, sizeof path, "%s/optimizer.safetensors", tmp);
    if (qlora_optimizer_save(r->opt, path) != QLORA_OK)
        return lib_fail(r, "cannot save the optimizer state");
    cJSON *st = cJSON_CreateObject(), *hist = cJSON_CreateArray();
    cJSON_AddNumberToObject(st, "step", (double)r->step);
    cJSON_AddNumberToObject(st, "epoch", (double)r->walker.epoch);
    cJSON_AddNumberToObject(st, "cursor", (double)r->walker.cursor);
    cJSON_AddItemToObject(st, "run", run_signature(r));
    for (int64_t i = 0; i < r->history.n; i++) {
        cJSON *e = cJSON_CreateArray();
        cJSON_AddItemToArray(e, cJSON_CreateNumber((double)r->history.step[i]));
        cJSON_AddItemToArray(e, cJSON_CreateNumber(r->history.loss[i]));
        cJSON_AddItemToArray(e, isfinite(r->history.eval[i]) ? cJSON_CreateNumber(r->history.eval[i])
                                                             : cJSON_CreateNull());
        cJSON_AddItemToArray(hist, e);
    }
    cJSON_AddItemToObject(st, "history", hist);
    char *text = cJSON_Print(st);
    cJSON_Delete(st);
    snprintf(path, sizeof path, "%s/trainer_state.json", tmp);
    int rc = text ? ft_write_file(path, text, strlen(text), r->err, sizeof r->err) : -1;
    free(text);
    if (rc != 0 || ft_dir_commit(tmp, final, r->err, sizeof r->err) != 0)
        return fail(r, "cannot save a checkpoint");
    /* keep the newest few */
    if (r->step > 0) {
        int64_t every = r->o->save_every > 0 ? r->o->save_every : r->total_steps;
        for (int64_t old = r->step - FT_KEEP_CHECKPOINTS * every; old > 0; old -= every) {
            checkpoint_dir(r, old, path, sizeof path);
            if (!ft_exists(path))
                break;
            ft_remove_tree(path, r->err, sizeof r->err);
        }
        r->err[0] = '\0';
    }
    return 0;
}

/* The highest step-N directory holding a trainer_state.json, or 0. */
static int64_t latest_checkpoint(const run *r) {
    char dir[4200], path[4500];
    snprintf(dir, sizeof dir, "%s/checkpoints", r->o->out_dir);
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int64_t best = 0;
    for (struct dirent *e; (e = readdir(d));) {
        long long n;
        char tail;
        if (sscanf(e->d_name, "step-%lld%c", &n, &tail) != 1 || n <= best)
            continue;
        snprintf(path, sizeof path, "%s/%s/trainer_state.json", dir, e->d_name);
        if (ft_exists(path))
            best = n;
    }
    closedir(d);
    return best;
}

static int resume(run *r) {
    int64_t step = latest_checkpoint(r);
    if (step == 0) {
        fprintf(stderr, "resume: no checkpoint in %s/checkpoints; starting from the beginning\n", r->o->out_dir);
        return 0;
    }
    char dir[4200], path[4500];
    checkpoint_dir(r, step, dir, sizeof dir);
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    char *text;
    size_t n;
    if (ft_read_file(path, &text, &n, r->err, sizeof r->err) != 0)
        return fail(r, "cannot resume");
    cJSON *st = cJSON_Parse(text);
    free(text);
    cJSON *sig = run_signature(r);
    int same = st && cJSON_Compare(cJSON_GetObjectItem(st, "run"), sig, 1);
    cJSON_Delete(sig);
    if (!same) {
        cJSON_Delete(st);
        snprintf(r->err, sizeof r->err, "%.900s was written with other options or data (rank, targets, batch, "
                 "micro-batch, seq, packing, seed, example count and step count must be the same)", path);
        return fail(r, "cannot resume");
    }
    int64_t epoch = (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItem(st, "epoch"));
    int64_t cursor = (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItem(st, "cursor"));
    cJSON *e;
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(st, "history")) {
        cJSON *ev = cJSON_GetArrayItem(e, 2);
        ft_history_add(&r->history, (int64_t)cJSON_GetNumberValue(cJSON_GetArrayItem(e, 0)),
                       cJSON_GetNumberValue(cJSON_GetArrayItem(e, 1)), cJSON_IsNumber(ev) ? ev->valuedouble : NAN);
    }
    cJSON_Delete(st);
    if (ft_adapter_load(r->model, dir, r->err, sizeof r->err) != 0)
        return fail(r, "cannot resume");
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    if (qlora_optimizer_load(r->opt, path) != QLORA_OK)
        return lib_fail(r, "cannot resume the optimizer");
    if (ft_batcher_seek(&r->walker, epoch, cursor, r->err, sizeof r->err) != 0)
        return fail(r, "cannot resume the data position");
    if (r->o->metrics_path && ft_metrics_truncate(r->o->metrics_path, step, r->err, sizeof r->err) != 0)
        return fail(r, "cannot resume the metrics file");
    r->step = step;
    fprintf(stderr, "resumed from %s (step %lld of %lld)\n", dir, (long long)step, (long long)r->total_steps);
    return 0;
}

/* ---- the loop */

static int evaluate(run *r, double *loss) {
    ft_batcher w;
    ft_batch b;
    memset(&b, 0, sizeof b);
    if (ft_batcher_init(&w, &r->eval, r->o->micro_batch, r->o->seq, r->o->packing, r->o->seed, r->err,
                        sizeof r->err) != 0)
        return fail(r, "cannot evaluate");
    double sum = 0.0;
    int64_t count = 0;
    int rc = 0;
    while (rc == 0 && w.epoch == 0) {
        if (ft_batcher_next(&w, &b, r->err, sizeof r->err) != 0) {
            rc = fail(r, "cannot evaluate");
            break;
        }
        float mean;
        if (b.targets > 0 &&
            qlora_model_forward(r->model, b.tokens, b.positions, b.seq_start, b.T, b.labels, &mean, NULL) != QLORA_OK)
            rc = lib_fail(r, "evaluation forward failed");
        sum += (double)mean * (double)b.targets;
        count += b.targets;
    }
    ft_batch_free(&b);
    ft_batcher_free(&w);
    *loss = count ? sum / (double)count : NAN;
    return rc;
}

/* Where data-parallel training joins the loop: with several processes each one accumulates its
 * own micro-batches, and this is the single place that sums the adapters' gradients (an NCCL
 * all-reduce over the tensors registered with the optimizer) and the step's loss, target and
 * token counts across them; the loss normalisation (loss_denom) then uses the global target
 * count, agreed on before the micro-batches run. One process has nothing to add. */
static void reduce_step(run *r, double *loss_sum, int64_t *targets, int64_t *tokens) {
    (void)r, (void)loss_sum, (void)targets, (void)tokens;
}

static int train_step(run *r, ft_step_info *info) {
    const ft_train_opts *o = r->o;
    int64_t targets = 0, tokens = 0;
    for (int64_t k = 0; k < r->n_micro; k++) {
        if (ft_batcher_next(&r->walker, &r->micro[k], r->err, sizeof r->err) != 0)
            return fail(r, "cannot read the next batch");
        targets += r->micro[k].targets;
        tokens += r->micro[k].T;
    }
    double t0 = now_s(), loss_sum = 0.0;
    if (qlora_optimizer_zero_grad(r->opt) != QLORA_OK)
        return lib_fail(r, "zero_grad failed");
    for (int64_t k = 0; k < r->n_micro; k++) {
        const ft_batch *b = &r->micro[k];
        qlora_batch qb = {b->tokens, b->positions, b->seq_start, b->labels, b->T};
        qlora_train_step_opts so = qlora_train_step_default_opts();
        so.grad_checkpointing = o->grad_checkpointing;
        so.rng_stream = (uint64_t)r->step * (uint64_t)r->n_micro + (uint64_t)k;
        so.loss_denom = targets > 0 ? (double)targets : 1.0;
        qlora_train_step_result res;
        if (qlora_model_forward_backward(r->model, &qb, &so, &res) != QLORA_OK)
            return lib_fail(r, "forward/backward failed");
        loss_sum += res.loss_sum;
    }
    reduce_step(r, &loss_sum, &targets, &tokens);
    qlora_step_report rep;
    if (qlora_optimizer_step(r->opt, 1.0, &rep) != QLORA_OK)
        return lib_fail(r, "optimizer step failed");
    qlora_mem_stats ms;
    qlora_mem_get_stats(r->ctx, &ms);
    double dt = now_s() - t0;
    r->step++;
    memset(info, 0, sizeof *info);
    info->step = r->step;
    info->total = r->total_steps;
    info->loss = targets ? loss_sum / (double)targets : 0.0;
    info->lr = rep.lr;
    info->grad_norm = rep.grad_norm;
    info->skipped = rep.skipped;
    info->tokens_per_s = dt > 0 ? (double)tokens / dt : 0.0;
    info->mem_bytes = ms.total_current[0] + ms.total_current[1];
    return 0;
}

static int64_t steps_for(const run *r) {
    if (r->o->steps)
        return r->o->steps;
    /* an epoch is the batches the walker makes from the training set: count them once */
    ft_batcher w;
    ft_batch b;
    memset(&b, 0, sizeof b);
    char err[256];
    int64_t rows = 0;
    if (ft_batcher_init(&w, &r->train, 1, r->o->seq, r->o->packing, r->o->seed, err, sizeof err) != 0)
        return 1;
    while (w.epoch == 0 && ft_batcher_next(&w, &b, err, sizeof err) == 0)
        rows++;
    ft_batch_free(&b);
    ft_batcher_free(&w);
    int64_t per_epoch = rows / r->o->batch;
    return (per_epoch > 0 ? per_epoch : 1) * (r->o->epochs ? r->o->epochs : 1);
}

static int train_loop(run *r) {
    const ft_train_opts *o = r->o;
    double start = now_s();
    int64_t first = r->step, every = r->total_steps > 100 ? r->total_steps / 50 : 1;
    while (r->step < r->total_steps) {
        ft_step_info info;
        if (train_step(r, &info) != 0)
            return 1;
        info.eta_s = (now_s() - start) / (double)(r->step - first) * (double)(r->total_steps - r->step);
        info.eval_loss = NAN;
        if ((o->eval_every > 0 && r->step % o->eval_every == 0) || r->step == r->total_steps) {
            if (r->eval.count > 0 && evaluate(r, &info.eval_loss) != 0)
                return 1;
            info.has_eval = isfinite(info.eval_loss);
        }
        ft_history_add(&r->history, info.step, info.loss, info.eval_loss);
        ft_progress(&info, every);
        if (r->metrics && ft_metrics_write(r->metrics, &info) != 0) {
            snprintf(r->err, sizeof r->err, "%s", o->metrics_path);
            return fail(r, "cannot write the metrics file");
        }
        int save = (o->save_every > 0 && r->step % o->save_every == 0) || r->step == r->total_steps;
        if (save || interrupted)
            if (save_checkpoint(r) != 0)
                return 1;
        if (interrupted) {
            fprintf(stderr, "\ninterrupted: checkpoint of step %lld saved; continue with --resume\n",
                    (long long)r->step);
            return 130;
        }
    }
    return 0;
}

static int finish(run *r) {
    const ft_train_opts *o = r->o;
    char path[4200];
    snprintf(path, sizeof path, "%s/adapter", o->out_dir);
    if (ft_adapter_save(r->model, &r->acfg, path, r->err, sizeof r->err) != 0)
        return fail(r, "cannot write the adapter");
    fprintf(stderr, "adapter written to %s (PEFT format: adapter_config.json, adapter_model.safetensors)\n", path);
    snprintf(path, sizeof path, "%s/loss.svg", o->out_dir);
    if (ft_loss_svg_write(&r->history, path, r->err, sizeof r->err) != 0)
        return fail(r, "cannot write the loss curve");
    if (r->history.n > 0)
        fprintf(stderr, "loss %.4f at step %lld -> %.4f at step %lld; curve in %s\n", r->history.loss[0],
                (long long)r->history.step[0], r->history.loss[r->history.n - 1],
                (long long)r->history.step[r->history.n - 1], path);
    qlora_train_settings s = qlora_train_default_settings();
    s.seq_len = o->seq;
    s.micro_batch = o->micro_batch;
    s.lora_rank = o->rank;
    s.targets = o->targets == QLORA_TARGET_ATTENTION ? QLORA_TARGETS_ATTENTION : QLORA_TARGETS_ALL_LINEAR;
    s.grad_checkpointing = o->grad_checkpointing;
    s.page_optimizer = o->gpu_mem_limit_gb > 0;
    ft_memory_report(stderr, r->ctx, &r->cfg, &s);
    return 0;
}

static void run_free(run *r) {
    if (r->metrics)
        fclose(r->metrics);
    for (int64_t k = 0; r->micro && k < r->n_micro; k++)
        ft_batch_free(&r->micro[k]);
    free(r->micro);
    ft_batcher_free(&r->walker);
    ft_dataset_free(&r->train);
    ft_dataset_free(&r->eval);
    ft_history_free(&r->history);
    qlora_optimizer_free(r->opt);
    qlora_model_free(r->model);
    qlora_tokenizer_free(r->tok);
    qlora_ctx_free(r->ctx);
}

static int run_all(run *r) {
    const ft_train_opts *o = r->o;
    if (ft_mkdirs(o->out_dir, r->err, sizeof r->err) != 0)
        return fail(r, "cannot create the output directory");
    if (o->model_dir) {
        snprintf(r->model_dir, sizeof r->model_dir, "%s", o->model_dir);
    } else {
        snprintf(r->model_dir, sizeof r->model_dir, "%s/base-model", o->out_dir);
        if (ft_default_model_write(r->model_dir, r->err, sizeof r->err) != 0)
            return fail(r, "cannot write the embedded default model");
        fprintf(stderr, "embedded default: model in %s, data built in (examples/qlora-ft/default)\n", r->model_dir);
    }
    if (open_context(r) || load_data(r) || load_model(r))
        return 1;
    r->total_steps = steps_for(r);
    r->n_micro = o->batch / o->micro_batch;
    r->micro = calloc((size_t)r->n_micro, sizeof *r->micro);
    if (!r->micro)
        return fail(r, "out of memory");
    if (make_optimizer(r) ||
        ft_batcher_init(&r->walker, &r->train, o->micro_batch, o->seq, o->packing, o->seed, r->err, sizeof r->err))
        return r->err[0] ? fail(r, "cannot start") : 1;
    if (o->resume && resume(r) != 0)
        return 1;
    if (o->metrics_path && !(r->metrics = fopen(o->metrics_path, r->step > 0 ? "a" : "w"))) {
        snprintf(r->err, sizeof r->err, "%s", o->metrics_path);
        return fail(r, "cannot open the metrics file");
    }
    fprintf(stderr, "training: %lld steps of %lld sequences (%lld x %lld micro-batches) of up to %lld tokens%s on "
            "%s\n", (long long)r->total_steps, (long long)o->batch, (long long)r->n_micro, (long long)o->micro_batch,
            (long long)o->seq, o->packing ? " (packed)" : "",
            qlora_ctx_backend(r->ctx) == QLORA_BACKEND_CUDA ? "the GPU" : "the CPU");
    int rc = train_loop(r);
    return rc != 0 ? rc : finish(r);
}

int ft_train_run(const ft_train_opts *o) {
    run r;
    memset(&r, 0, sizeof r);
    r.o = o;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, NULL);
    int rc = run_all(&r);
    run_free(&r);
    return rc;
}
