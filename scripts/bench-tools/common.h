// What the bench's C probes share (evdbench.c, pubsub.c, rawsqlite.c): clocks, a bounded line reader,
// JSON errors, evd's hello and responses, and the bench rows.
//
// Every wait is bounded: a reader armed with `arm` gives up at its deadline (TIMEOUT_S overall, default
// 60 s) and after IDLE_S (10 s) without data, so a server that never answers cannot hang the bench.
#ifndef EVDBENCH_COMMON_H
#define EVDBENCH_COMMON_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define UNUSED __attribute__((unused))

UNUSED static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

UNUSED static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// Sorts LAT and returns its p50 and p99.
UNUSED static void percentiles(double *lat, long n, double *p50, double *p99) {
    qsort(lat, n, sizeof(double), cmp_double);
    *p50 = n ? lat[n / 2] : 0;
    *p99 = n ? lat[(long)(n * 0.99)] : 0;
}

// A line reader over a socket. With `deadline_us` set (CLOCK_MONOTONIC µs), a read waits at most until
// then, and at most `idle_us` without data; a timeout sets `timed_out` and returns NULL.
#define READER_CAP (4 << 20)
typedef struct {
    int fd;
    char buf[READER_CAP];
    size_t start, end;
    double deadline_us, idle_us;
    int timed_out;
} reader_t;

UNUSED static int wait_readable(reader_t *r) {
    if (r->deadline_us <= 0) return 1;
    double left = r->deadline_us - now_us();
    if (r->idle_us > 0 && r->idle_us < left) left = r->idle_us;
    if (left <= 0) return r->timed_out = 1, 0;
    struct pollfd p = {.fd = r->fd, .events = POLLIN};
    for (;;) {
        int n = poll(&p, 1, (int)(left / 1000) + 1);
        if (n > 0) return 1;
        if (n < 0 && errno == EINTR) continue;
        return r->timed_out = 1, 0;
    }
}

// Reads more into the buffer (moving what is unread to its start); returns 0 at EOF, a timeout or a
// full buffer.
UNUSED static int fill(reader_t *r) {
    if (r->start > 0) {
        memmove(r->buf, r->buf + r->start, r->end - r->start);
        r->end -= r->start;
        r->start = 0;
    }
    if (r->end == sizeof(r->buf)) return 0;
    if (!wait_readable(r)) return 0;
    ssize_t got;
    do got = read(r->fd, r->buf + r->end, sizeof(r->buf) - r->end);
    while (got < 0 && errno == EINTR);
    if (got <= 0) return 0;
    r->end += got;
    return 1;
}

// Returns a pointer to the next line (NUL-terminated, without '\n'), or NULL at EOF.
UNUSED static char *read_line(reader_t *r) {
    for (;;) {
        char *nl = memchr(r->buf + r->start, '\n', r->end - r->start);
        if (nl) {
            *nl = 0;
            char *line = r->buf + r->start;
            r->start = (nl - r->buf) + 1;
            return line;
        }
        if (!fill(r)) return NULL;
    }
}

UNUSED static void write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("write");
            exit(1);
        }
        data += n;
        len -= n;
    }
}

UNUSED static int connect_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        perror(path);
        exit(1);
    }
    return fd;
}

static double g_timeout_s = 60, g_idle_s = 10;
// When set (in a forked worker), fail() writes its message here instead of printing it.
static char *g_fail_into;
#define FAIL_CAP 600

// MSG JSON-escaped (cut at 400 bytes) into OUT, which holds at least 1200 bytes.
UNUSED static void json_escape(char *out, const char *msg) {
    size_t o = 0;
    for (const char *p = msg; *p && o < 400; p++) {
        unsigned char c = *p;
        if (c == '"' || c == '\\') out[o++] = '\\', out[o++] = c;
        else if (c < 0x20) o += sprintf(out + o, "\\u%04x", c);
        else out[o++] = c;
    }
    out[o] = 0;
}

// Prints {"error":"..."} and exits 1.
UNUSED static void fail(const char *fmt, ...) {
    char msg[512], out[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (g_fail_into) {
        snprintf(g_fail_into, FAIL_CAP, "%s", msg);
        exit(1);
    }
    json_escape(out, msg);
    printf("{\"error\":\"%s\"}\n", out);
    exit(1);
}

UNUSED static void arm(reader_t *r, int fd) {
    r->fd = fd;
    r->deadline_us = now_us() + g_timeout_s * 1e6;
    r->idle_us = g_idle_s * 1e6;
}

// The next line, or exit with a reason.
UNUSED static char *expect_line(reader_t *r, const char *what) {
    char *line = read_line(r);
    if (line) return line;
    if (r->timed_out) fail("timed out waiting for %s (limit %.0f s)", what, g_timeout_s);
    fail("connection closed while waiting for %s", what);
    return NULL;
}

// Reads the next response (skipping anything else); exits unless it is ok.
UNUSED static char *expect_ok(reader_t *r, const char *what) {
    for (;;) {
        char *line = expect_line(r, what);
        if (!strstr(line, "\"type\":\"response\"")) continue;
        if (!strstr(line, "\"ok\":true")) fail("%s: %s", what, line);
        return line;
    }
}

// Connects to evd and reads its hello; exits with a reason if it cannot.
UNUSED static int connect_evd(const char *path, reader_t *r) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) fail("connect %s: %s", path, strerror(errno));
    arm(r, fd);
    char *hello = expect_line(r, "hello");
    if (!strstr(hello, "\"type\":\"hello\"")) fail("expected hello, got: %s", hello);
    return fd;
}

// The `last_seq` of a `lagged` notice line, or -1.
UNUSED static long long lagged_last_seq(const char *line) {
    if (!strstr(line, "\"type\":\"notice\"") || !strstr(line, "\"lagged\"")) return -1;
    const char *p = strstr(line, "\"last_seq\":");
    return p ? atoll(p + 11) : -1;
}

// An event line's seq (the envelope's second key), or -1.
UNUSED static long long event_seq(const char *line) {
    const char *p = strstr(line, "\"seq\":");
    return p ? atoll(p + 6) : -1;
}

// Asks the kernel for a large receive buffer: the servers write in bursts.
UNUSED static void big_rcvbuf(int fd) {
    int big = 64 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
}

// A JSON string literal of s (with quotes) into out; returns its length.
UNUSED static size_t json_string(char *out, const char *s) {
    size_t o = 0;
    out[o++] = '"';
    for (; *s; s++) {
        unsigned char c = *s;
        if (c == '"' || c == '\\') out[o++] = '\\', out[o++] = c;
        else if (c < 0x20) o += sprintf(out + o, "\\u%04x", c);
        else out[o++] = c;
    }
    out[o++] = '"';
    out[o] = 0;
    return o;
}

// Creates FILE (empty): the bash side waits for it.
UNUSED static void touch(const char *file) {
    int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) close(fd);
}

// The bench rows; bench-tools/benchrows.py makes the same ones for Datasette and SQLAlchemy.
static const char *bench_tags[] = {"alpha", "beta", "gamma", "delta"};
UNUSED static double bench_score(long i) { return (i % 1000) * 0.25 + 0.125; }
UNUSED static const char *bench_tag(long i) { return bench_tags[i % 4]; }
UNUSED static int bench_name(char *out, long i) { return sprintf(out, "name-%011ld", i); }
UNUSED static int bench_row(char *out, long i) {
    return sprintf(out, "{\"id\":%ld,\"name\":\"name-%011ld\",\"score\":%.3f,\"tag\":\"%s\"}", i, i, bench_score(i),
                   bench_tag(i));
}
// The bench table's columns, as evd's create_table takes them.
#define BENCH_COLUMNS_JSON                                                                                      \
    "[{\"name\":\"id\",\"type\":\"integer\"},{\"name\":\"name\",\"type\":\"text\"},"                           \
    "{\"name\":\"score\",\"type\":\"float\"},{\"name\":\"tag\",\"type\":\"text\"}]"

// Sends create_table TABLE (the bench columns, pk id) and waits for its OK.
UNUSED static void create_bench_table(int fd, reader_t *r, const char *table) {
    char tname[512], req[2048];
    json_string(tname, table);
    int len = snprintf(req, sizeof(req),
                       "{\"op\":\"create_table\",\"id\":\"create\",\"table\":%s,\"columns\":" BENCH_COLUMNS_JSON
                       ",\"pk\":\"id\"}\n",
                       tname);
    write_all(fd, req, len);
    expect_ok(r, "create_table");
}

// ---- Forked workers: clients or subscribers in processes of their own ----
//
// The parent forks N workers; each reports through its slot in memory shared with the parent (a
// failing worker's fail() message lands in slot->error). A worker calls worker_ready() when it is
// set up (connected, subscribed, its requests built) and, if it must start with the others,
// worker_wait_go(). Every wait of the parent is bounded; on any failure it kills the workers by pid.
typedef struct {
    int status;  // 0 running, 1 done, -1 failed
    double start_us, first_us, last_us;
    long count;
    long long bytes;
    char error[FAIL_CAP];
} slot_t;

typedef struct {
    int n;
    pid_t *pids;
    slot_t *slots;
    int ready_r, go_w;
} workers_t;

static int g_ready_fd = -1, g_go_fd = -1;

UNUSED static void *shared_alloc(size_t size) {
    void *p = mmap(NULL, size ? size : 1, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("mmap %zu bytes: %s", size, strerror(errno));
    return p;
}

UNUSED static void worker_ready(void) {
    char c = 'r';
    write_all(g_ready_fd, &c, 1);
}

UNUSED static void worker_wait_go(void) {
    char c;
    while (read(g_go_fd, &c, 1) < 0 && errno == EINTR) {}
}

UNUSED static void workers_kill(workers_t *w) {
    for (int k = 0; k < w->n; k++)
        if (w->pids[k] > 0) kill(w->pids[k], SIGKILL);
    for (int k = 0; k < w->n; k++)
        if (w->pids[k] > 0) waitpid(w->pids[k], NULL, 0), w->pids[k] = 0;
}

// Fails (killing the workers) with the first failed worker's reason, or REASON.
UNUSED static void workers_fail(workers_t *w, const char *reason) {
    workers_kill(w);
    for (int k = 0; k < w->n; k++)
        if (w->slots[k].status < 0 && w->slots[k].error[0]) fail("worker %d: %s", k, w->slots[k].error);
    fail("%s", reason);
}

// Forks N workers, each running FN(k, its slot, ARG) and exiting with its status.
UNUSED static void workers_start(workers_t *w, int n, int (*fn)(int k, slot_t *slot, void *arg), void *arg) {
    int ready[2], go[2];
    if (pipe(ready) != 0 || pipe(go) != 0) fail("pipe: %s", strerror(errno));
    w->n = n;
    w->pids = calloc(n, sizeof(pid_t));
    w->slots = shared_alloc(sizeof(slot_t) * n);
    fflush(stdout);
    for (int k = 0; k < n; k++) {
        pid_t pid = fork();
        if (pid < 0) workers_fail(w, "fork failed");
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);  // a parent stopped by its time limit takes its workers along
            if (getppid() == 1) _exit(1);
            close(ready[0]);
            close(go[1]);
            g_ready_fd = ready[1], g_go_fd = go[0];
            g_fail_into = w->slots[k].error;
            w->slots[k].status = -1;  // until FN says otherwise
            int status = fn(k, &w->slots[k], arg);
            if (status == 0) w->slots[k].status = 1;
            _exit(status);
        }
        w->pids[k] = pid;
    }
    close(ready[1]);
    close(go[0]);
    w->ready_r = ready[0], w->go_w = go[1];
}

// Waits (at most TIMEOUT_S) until every worker has called worker_ready().
UNUSED static void workers_wait_ready(workers_t *w, double timeout_s) {
    double deadline = now_us() + timeout_s * 1e6;
    int got = 0;
    while (got < w->n) {
        double left = deadline - now_us();
        if (left <= 0) workers_fail(w, "the workers were not ready in time");
        struct pollfd p = {.fd = w->ready_r, .events = POLLIN};
        int n = poll(&p, 1, (int)(left / 1000) + 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) continue;
        char buf[256];
        ssize_t r = read(w->ready_r, buf, sizeof(buf));
        if (r == 0) workers_fail(w, "a worker exited before it was ready");
        if (r > 0) got += r;
        for (int k = 0; k < w->n; k++)
            if (w->slots[k].status < 0 && w->slots[k].error[0]) workers_fail(w, "");
    }
}

// Lets the workers waiting in worker_wait_go() start; returns the time.
UNUSED static double workers_go(workers_t *w) {
    double t = now_us();
    close(w->go_w);
    w->go_w = -1;
    return t;
}

// Waits (at most TIMEOUT_S) for every worker to exit; fails if one failed.
UNUSED static void workers_join(workers_t *w, double timeout_s) {
    double deadline = now_us() + timeout_s * 1e6;
    int left = w->n;
    while (left > 0) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {
            for (int k = 0; k < w->n; k++)
                if (w->pids[k] == pid) {
                    w->pids[k] = 0;
                    left--;
                    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || w->slots[k].status != 1) {
                        w->slots[k].status = -1;
                        if (!w->slots[k].error[0]) snprintf(w->slots[k].error, FAIL_CAP, "exited with status %d", status);
                        workers_fail(w, "");
                    }
                }
            continue;
        }
        if (now_us() > deadline) workers_fail(w, "the workers did not finish in time");
        usleep(1000);
    }
}

#endif
