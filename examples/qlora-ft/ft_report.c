/* Progress, metrics, loss curve and memory report of qlora-ft train (ft_report.h). */
#include "ft_report.h"
#include "ft_fs.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void format_eta(double s, char *buf, size_t cap) {
    if (!isfinite(s) || s < 0)
        snprintf(buf, cap, "--:--");
    else if (s >= 3600)
        snprintf(buf, cap, "%d:%02d:%02d", (int)(s / 3600), (int)fmod(s / 60, 60), (int)fmod(s, 60));
    else
        snprintf(buf, cap, "%02d:%02d", (int)(s / 60), (int)fmod(s, 60));
}

void ft_progress(const ft_step_info *s, int64_t every) {
    static int tty = -1;
    if (tty < 0)
        tty = isatty(STDERR_FILENO);
    char eta[32], eval[48] = "";
    format_eta(s->eta_s, eta, sizeof eta);
    if (s->has_eval)
        snprintf(eval, sizeof eval, " eval %.4f", s->eval_loss);
    const double mib = (double)s->mem_bytes / (1024.0 * 1024.0);
    if (tty) {
        enum { WIDTH = 24 };
        int filled = (int)(WIDTH * s->step / (s->total > 0 ? s->total : 1));
        char bar[WIDTH + 1];
        for (int i = 0; i < WIDTH; i++)
            bar[i] = i < filled ? '#' : '.';
        bar[WIDTH] = '\0';
        fprintf(stderr, "\r[%s] step %lld/%lld loss %.4f lr %.2e %.0f tok/s mem %.0f MiB ETA %s%s%s\033[K",
                bar, (long long)s->step, (long long)s->total, s->loss, s->lr, s->tokens_per_s, mib, eta, eval,
                s->skipped ? " (skipped: non-finite gradient)" : "");
        if (s->step == s->total || s->has_eval)
            fputc('\n', stderr);
        fflush(stderr);
        return;
    }
    if (s->step % (every > 0 ? every : 1) != 0 && s->step != s->total && !s->has_eval && !s->skipped)
        return;
    fprintf(stderr, "step %lld/%lld loss %.4f lr %.2e grad_norm %.3f %.0f tok/s mem %.0f MiB ETA %s%s%s\n",
            (long long)s->step, (long long)s->total, s->loss, s->lr, s->grad_norm, s->tokens_per_s, mib, eta, eval,
            s->skipped ? " (skipped: non-finite gradient)" : "");
}

int ft_metrics_write(FILE *f, const ft_step_info *s) {
    fprintf(f, "{\"step\": %lld, \"loss\": %.6f, \"lr\": %.6g, \"grad_norm\": ", (long long)s->step, s->loss, s->lr);
    if (isfinite(s->grad_norm))
        fprintf(f, "%.6f", s->grad_norm);
    else
        fputs("null", f);
    fprintf(f, ", \"tokens_per_s\": %.1f, \"mem_bytes\": %llu", s->tokens_per_s, (unsigned long long)s->mem_bytes);
    if (s->has_eval)
        fprintf(f, ", \"eval_loss\": %.6f", s->eval_loss);
    if (s->skipped)
        fputs(", \"skipped\": true", f);
    fputs("}\n", f);
    return fflush(f) != 0 || ferror(f);
}

int ft_metrics_truncate(const char *path, int64_t last_step, char *err, size_t cap) {
    if (!ft_exists(path))
        return 0;
    char *data;
    size_t n;
    if (ft_read_file(path, &data, &n, err, cap) != 0)
        return -1;
    char *out = malloc(n + 1);
    size_t len = 0;
    if (!out) {
        free(data);
        snprintf(err, cap, "%s: out of memory", path);
        return -1;
    }
    for (char *line = data, *next; line && *line; line = next) {
        char *nl = strchr(line, '\n');
        next = nl ? nl + 1 : NULL;
        size_t l = nl ? (size_t)(nl - line) + 1 : strlen(line);
        const char *k = strstr(line, "\"step\": ");
        if (k && (!nl || k < nl) && strtoll(k + 8, NULL, 10) <= last_step) {
            memcpy(out + len, line, l);
            len += l;
        }
    }
    free(data);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int rc = ft_write_file(tmp, out, len, err, cap);
    free(out);
    if (rc == 0 && rename(tmp, path) != 0) {
        snprintf(err, cap, "%s: cannot replace it", path);
        rc = -1;
    }
    return rc;
}

int ft_history_add(ft_history *h, int64_t step, double loss, double eval) {
    if (h->n == h->cap) {
        int64_t cap = h->cap ? 2 * h->cap : 256;
        int64_t *s = realloc(h->step, (size_t)cap * sizeof *s);
        if (s)
            h->step = s;
        double *l = s ? realloc(h->loss, (size_t)cap * sizeof *l) : NULL;
        if (l)
            h->loss = l;
        double *e = l ? realloc(h->eval, (size_t)cap * sizeof *e) : NULL;
        if (!e)
            return -1;
        h->eval = e;
        h->cap = cap;
    }
    h->step[h->n] = step;
    h->loss[h->n] = loss;
    h->eval[h->n++] = eval;
    return 0;
}

void ft_history_free(ft_history *h) {
    free(h->step);
    free(h->loss);
    free(h->eval);
    memset(h, 0, sizeof *h);
}

int ft_loss_svg_write(const ft_history *h, const char *path, char *err, size_t cap) {
    enum { W = 720, HT = 400, L = 64, R = 24, T = 32, B = 48 };
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < h->n; i++) {
        lo = fmin(lo, h->loss[i]), hi = fmax(hi, h->loss[i]);
        if (isfinite(h->eval[i]))
            lo = fmin(lo, h->eval[i]), hi = fmax(hi, h->eval[i]);
    }
    if (h->n == 0 || !isfinite(lo)) {
        lo = 0, hi = 1;
    }
    if (hi - lo < 1e-6)
        hi = lo + 1.0;
    const double x0 = (double)(h->n ? h->step[0] : 0), x1 = (double)(h->n ? h->step[h->n - 1] : 1);
    const double xs = (W - L - R) / (x1 > x0 ? x1 - x0 : 1.0), ys = (HT - T - B) / (hi - lo);
    size_t bufcap = 4096 + (size_t)h->n * 64;
    char *svg = malloc(bufcap);
    if (!svg) {
        snprintf(err, cap, "%s: out of memory", path);
        return -1;
    }
    size_t n = 0;
#define EMIT(...) n += (size_t)snprintf(svg + n, bufcap - n, __VA_ARGS__)
    EMIT("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
         "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, HT);
    EMIT("<text x=\"%d\" y=\"20\" font-size=\"14\">qlora-ft: loss per step</text>\n", L);
    EMIT("<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, HT - B, W - R, HT - B);
    EMIT("<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, T, L, HT - B);
    for (int k = 0; k <= 4; k++) {
        double v = lo + (hi - lo) * k / 4.0;
        EMIT("<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.3g</text>\n", L - 6, HT - B - (v - lo) * ys + 4, v);
    }
    EMIT("<text x=\"%d\" y=\"%d\">step %.0f</text><text x=\"%d\" y=\"%d\" text-anchor=\"end\">step %.0f</text>\n",
         L, HT - B + 18, x0, W - R, HT - B + 18, x1);
    EMIT("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"");
    for (int64_t i = 0; i < h->n; i++)
        EMIT("%.1f,%.1f ", L + (h->step[i] - x0) * xs, HT - B - (h->loss[i] - lo) * ys);
    EMIT("\"/>\n");
    for (int64_t i = 0; i < h->n; i++)
        if (isfinite(h->eval[i]))
            EMIT("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"#d62728\"/>\n", L + (h->step[i] - x0) * xs,
                 HT - B - (h->eval[i] - lo) * ys);
    EMIT("<text x=\"%d\" y=\"%d\" fill=\"#1f77b4\">training loss</text>\n", W - R - 190, T + 4);
    EMIT("<text x=\"%d\" y=\"%d\" fill=\"#d62728\">evaluation loss</text>\n", W - R - 90, T + 4);
    EMIT("</svg>\n");
#undef EMIT
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int rc = ft_write_file(tmp, svg, n, err, cap);
    free(svg);
    if (rc == 0 && rename(tmp, path) != 0) {
        snprintf(err, cap, "%s: cannot rename the finished file into place", path);
        rc = -1;
    }
    return rc;
}

static double mb(uint64_t b) { return (double)b / 1e6; }

void ft_memory_report(FILE *f, const qlora_ctx *ctx, const qlora_model_config *cfg,
                      const qlora_train_settings *settings) {
    qlora_mem_stats st;
    qlora_mem_estimate_result est, full;
    if (qlora_mem_get_stats(ctx, &st) != QLORA_OK)
        return;
    int have_est = qlora_mem_estimate(cfg, settings, QLORA_REGIME_QLORA, &est) == QLORA_OK &&
                   qlora_mem_estimate(cfg, settings, QLORA_REGIME_FULL_16BIT, &full) == QLORA_OK;
    const int dev = qlora_ctx_backend(ctx) == QLORA_BACKEND_CUDA;
    fprintf(f, "\nmemory (MB = 10^6 bytes; measured = the accountant's peak on the %s, estimate = qlora_mem_estimate)\n",
            dev ? "GPU (host for optimizer_host)" : "host");
    fprintf(f, "  %-18s %12s %12s\n", "category", "measured", "estimate");
    for (int c = 0; c < QLORA_MEM_CATEGORY_COUNT; c++) {
        uint64_t measured = st.peak[dev][c] + (dev ? 0 : st.peak[1][c]);
        if (c == QLORA_MEM_OPTIMIZER_HOST)
            measured = st.peak[0][c];
        if (measured == 0 && (!have_est || est.bytes[c] == 0))
            continue;
        fprintf(f, "  %-18s %12.2f", qlora_mem_category_name((qlora_mem_category)c), mb(measured));
        if (have_est)
            fprintf(f, " %12.2f", mb(est.bytes[c]));
        fputc('\n', f);
    }
    uint64_t peak = st.total_peak[0] + st.total_peak[1];
    fprintf(f, "  %-18s %12.2f", "total (peak)", mb(peak));
    if (have_est)
        fprintf(f, " %12.2f", mb(est.total));
    fputc('\n', f);
    if (have_est && peak > 0)
        fprintf(f, "  16-bit full finetuning of this model would need %.2f MB (estimate): %.1fx the measured "
                "peak of this run\n", mb(full.total), (double)full.total / (double)peak);
}
