// Small, dependency-free probes for scripts/bench, in C so that the client's own cost is negligible
// next to what is measured.
//
//   evdbench pingpong N            raw Unix-socket ping-pong between two processes (the physical limit)
//   evdbench client SOCKET N SQL   N sequential `execute` requests to evd, one at a time
//   evdbench listener SOCKET EVENT a veto listener that allows every veto of EVENT, until killed
//
// `pingpong` and `client` print one line of JSON: {"n":..,"p50_us":..,"p99_us":..,"per_sec":..}.
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(double *lat, int n, double total_us) {
    qsort(lat, n, sizeof(double), cmp_double);
    printf("{\"n\":%d,\"p50_us\":%.2f,\"p99_us\":%.2f,\"per_sec\":%.0f}\n", n, lat[n / 2], lat[(int)(n * 0.99)],
           n / (total_us / 1e6));
}

// A line reader over a socket.
typedef struct {
    int fd;
    char buf[1 << 20];
    size_t start, end;
} reader_t;

// Returns a pointer to the next line (NUL-terminated, without '\n'), or NULL at EOF.
static char *read_line(reader_t *r) {
    for (;;) {
        char *nl = memchr(r->buf + r->start, '\n', r->end - r->start);
        if (nl) {
            *nl = 0;
            char *line = r->buf + r->start;
            r->start = (nl - r->buf) + 1;
            return line;
        }
        if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, r->end - r->start);
            r->end -= r->start;
            r->start = 0;
        }
        if (r->end == sizeof(r->buf)) return NULL;
        ssize_t got = read(r->fd, r->buf + r->end, sizeof(r->buf) - r->end);
        if (got <= 0) return NULL;
        r->end += got;
    }
}

static void write_all(int fd, const char *data, size_t len) {
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

static int connect_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        perror(path);
        exit(1);
    }
    return fd;
}

// The raw round trip: a line one way, a line back, between two processes over a Unix stream socket.
static int pingpong(int n) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return perror("socketpair"), 1;
    const char *msg = "{\"op\":\"ping\",\"id\":1}\n";
    const char *ans = "{\"type\":\"response\",\"id\":1,\"ok\":true,\"result\":{}}\n";
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        static reader_t r;
        r.fd = sv[1];
        while (read_line(&r)) write_all(sv[1], ans, strlen(ans));
        _exit(0);
    }
    close(sv[1]);
    static reader_t r;
    r.fd = sv[0];
    double *lat = malloc(sizeof(double) * n);
    for (int i = 0; i < n / 10; i++) {  // warm up
        write_all(sv[0], msg, strlen(msg));
        read_line(&r);
    }
    double start = now_us();
    for (int i = 0; i < n; i++) {
        double t = now_us();
        write_all(sv[0], msg, strlen(msg));
        if (!read_line(&r)) return fprintf(stderr, "pingpong: peer closed\n"), 1;
        lat[i] = now_us() - t;
    }
    double total = now_us() - start;
    close(sv[0]);
    waitpid(pid, NULL, 0);
    report(lat, n, total);
    return 0;
}

// Sequential execute requests, each waiting for its response.
static int client(const char *path, int n, const char *sql) {
    int fd = connect_unix(path);
    static reader_t r;
    r.fd = fd;
    if (!read_line(&r)) return fprintf(stderr, "client: no hello\n"), 1;
    char request[4096];
    int len = snprintf(request, sizeof(request), "{\"op\":\"execute\",\"sql\":\"%s\"}\n", sql);
    double *lat = malloc(sizeof(double) * n);
    for (int i = 0; i < n / 10; i++) {  // warm up: the pool, statement paths, the listener
        write_all(fd, request, len);
        read_line(&r);
    }
    double start = now_us();
    for (int i = 0; i < n; i++) {
        double t = now_us();
        write_all(fd, request, len);
        char *line = read_line(&r);
        if (!line) return fprintf(stderr, "client: connection closed\n"), 1;
        if (!strstr(line, "\"ok\":true")) return fprintf(stderr, "client: %s\n", line), 1;
        lat[i] = now_us() - t;
    }
    report(lat, n, now_us() - start);
    return 0;
}

// Allows every veto it is sent.
static int listener(const char *path, const char *event) {
    int fd = connect_unix(path);
    static reader_t r;
    r.fd = fd;
    if (!read_line(&r)) return 1;
    char request[512];
    int len = snprintf(request, sizeof(request),
                       "{\"op\":\"subscribe\",\"veto\":[\"%s\"],\"name\":\"bench-allow\",\"timeout_ms\":60000}\n", event);
    write_all(fd, request, len);
    char *line;
    while ((line = read_line(&r))) {
        if (strncmp(line, "{\"type\":\"veto\",\"seq\":", 21) != 0) {
            if (strstr(line, "\"type\":\"response\"")) {
                fprintf(stderr, "listener: %s\n", line);
                fflush(stderr);
            }
            continue;
        }
        long long seq = atoll(line + 21);
        char reply[128];
        int n = snprintf(reply, sizeof(reply), "{\"op\":\"reply\",\"seq\":%lld,\"action\":\"allow\"}\n", seq);
        write_all(fd, reply, n);
    }
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && !strcmp(argv[1], "pingpong")) return pingpong(atoi(argv[2]));
    if (argc >= 5 && !strcmp(argv[1], "client")) return client(argv[2], atoi(argv[3]), argv[4]);
    if (argc >= 4 && !strcmp(argv[1], "listener")) return listener(argv[2], argv[3]);
    fprintf(stderr, "usage: evdbench pingpong N | client SOCKET N SQL | listener SOCKET EVENT\n");
    return 2;
}
