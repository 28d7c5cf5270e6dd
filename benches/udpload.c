/*
 * udpload: closed-loop UDP request/response load generator and echo backend
 * for benches/udp_compare.sh.  Built on the fly with gcc; not part of the
 * crate.
 *
 *   udpload echo PORT [ADDR]
 *       Echo every datagram back to its sender; one socket, recvmmsg and
 *       sendmmsg in batches of 64, large receive buffer.
 *
 *   udpload load HOST:PORT [options]
 *       -c N      client sockets [64]; client i binds 127.0.0.(B + i % 200)
 *       -B B      first source address octet [10]
 *       -w W      requests outstanding per client [4]
 *       -s BYTES  datagram size [64]
 *       -W SEC    warmup before the measured window [1]
 *       -d SEC    measured window [5]
 *       -t MS     a request unanswered this long is lost and replaced [500]
 *       -p PID    balancer: utime+stime from /proc/PID/stat over the window
 *       -q PID    backend: the same (to see whether its CPU is saturated)
 *       -x PID    any other process to account the same way (repeatable, 8)
 *     Also reports the per-CPU busy/idle/steal ticks of /proc/stat over the
 *     measured window, to show what else ran on the benchmark's CPUs.
 *     Prints one JSON object on stdout.
 *
 * Every request carries (client, slot, seq); a reply counts only when it
 * matches the slot's outstanding seq, so duplicates, late replies (after
 * the timeout) and misrouted replies (another client's payload) are
 * counted separately instead of being mistaken for throughput.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXW 64
#define BATCH 64

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* utime+stime in clock ticks for the whole thread group, or -1. */
static long long proc_ticks(int pid) {
    if (pid <= 0) return -1;
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    p += 2; /* field 3: state */
    unsigned long long ut = 0, st = 0;
    /* fields 3..15: state ppid pgrp session tty tpgid flags minflt cminflt
     * majflt cmajflt utime stime */
    if (sscanf(p, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (long long)(ut + st);
}

#define MAXCPU 8
/* Per CPU from /proc/stat: user nice system idle iowait irq softirq steal. */
static int cpu_stat(unsigned long long v[MAXCPU][8]) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return 0;
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        int cpu;
        unsigned long long x[8];
        if (sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &x[0], &x[1],
                   &x[2], &x[3], &x[4], &x[5], &x[6], &x[7]) == 9 &&
            cpu >= 0 && cpu < MAXCPU) {
            memcpy(v[cpu], x, sizeof x);
            if (cpu + 1 > n) n = cpu + 1;
        }
    }
    fclose(f);
    return n;
}

static double self_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ---------------------------------------------------------------- echo */

static int echo_main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: udpload echo PORT [ADDR]\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int sz = 16 << 20, one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argc > 3 ? argv[3] : "127.0.0.1", &a.sin_addr);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");

    static char bufs[BATCH][2048];
    static struct sockaddr_in from[BATCH];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = sizeof bufs[i];
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR || errno == ECONNREFUSED) continue;
            die("recvmmsg");
        }
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        int off = 0;
        while (off < n) {
            int m = sendmmsg(fd, msgs + off, n - off, 0);
            if (m <= 0) {
                /* A client that went away (ECONNREFUSED) or a full queue:
                 * skip that one datagram, as a real UDP server would. */
                off++;
                continue;
            }
            off += m;
        }
    }
}

/* ---------------------------------------------------------------- load */

struct hdr {
    uint32_t client;
    uint32_t slot;
    uint64_t seq;
};

struct client {
    int fd;
    uint64_t seq[MAXW];
    uint64_t sent[MAXW];
    int pending[MAXW]; /* waiting for a reply */
};

enum { WARMUP, MEASURE, DRAIN };

static struct client *clients;
static int nclients = 64, window = 4, dsize = 64;
static int phase = WARMUP;

struct counters {
    uint64_t ok, lost, stale, misrouted, bad, send_err, recv_err, sent;
    uint64_t rtt_ns_sum;
};
static struct counters cnt[3];

static char payload[65536];

static int send_slots(struct client *c, int id, const int *slots, int n, uint64_t t) {
    struct mmsghdr msgs[MAXW];
    struct iovec iov[MAXW];
    static char bufs[MAXW][65536];
    for (int i = 0; i < n; i++) {
        int s = slots[i];
        c->seq[s]++;
        c->sent[s] = t;
        c->pending[s] = 1;
        memcpy(bufs[i], payload, dsize);
        struct hdr h = {.client = (uint32_t)id, .slot = (uint32_t)s, .seq = c->seq[s]};
        memcpy(bufs[i], &h, sizeof h);
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = dsize;
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int off = 0;
    while (off < n) {
        int m = sendmmsg(c->fd, msgs + off, n - off, MSG_DONTWAIT);
        if (m <= 0) {
            /* Left pending: the timeout sweep counts it lost and retries. */
            cnt[phase].send_err++;
            off++;
            continue;
        }
        cnt[phase].sent += m;
        off += m;
    }
    return n;
}

static void on_readable(int id) {
    struct client *c = &clients[id];
    struct mmsghdr msgs[MAXW];
    struct iovec iov[MAXW];
    static char bufs[MAXW][2048];
    for (;;) {
        for (int i = 0; i < window; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = sizeof bufs[i];
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(c->fd, msgs, window, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            cnt[phase].recv_err++; /* e.g. ECONNREFUSED from an ICMP error */
            continue;
        }
        if (n == 0) return;
        uint64_t t = now_ns();
        int resend[MAXW], nr = 0;
        for (int i = 0; i < n; i++) {
            struct hdr h;
            if (msgs[i].msg_len != (unsigned)dsize) {
                cnt[phase].bad++;
                continue;
            }
            memcpy(&h, bufs[i], sizeof h);
            if (h.client != (uint32_t)id) {
                cnt[phase].misrouted++;
                continue;
            }
            if (h.slot >= (uint32_t)window || !c->pending[h.slot] || h.seq != c->seq[h.slot]) {
                cnt[phase].stale++;
                continue;
            }
            c->pending[h.slot] = 0;
            cnt[phase].ok++;
            cnt[phase].rtt_ns_sum += t - c->sent[h.slot];
            if (phase != DRAIN) resend[nr++] = h.slot;
        }
        if (nr) send_slots(c, id, resend, nr, t);
        if (n < window) return;
    }
}

static void sweep(uint64_t t, uint64_t timeout_ns) {
    for (int id = 0; id < nclients; id++) {
        struct client *c = &clients[id];
        int resend[MAXW], nr = 0;
        for (int s = 0; s < window; s++)
            if (c->pending[s] && t - c->sent[s] > timeout_ns) {
                c->pending[s] = 0;
                cnt[phase].lost++;
                if (phase != DRAIN) resend[nr++] = s;
            }
        if (nr) send_slots(c, id, resend, nr, t);
    }
}

static int load_main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: udpload load HOST:PORT [-c N] [-w W] ...\n");
        return 2;
    }
    char host[64];
    int port;
    if (sscanf(argv[2], "%63[^:]:%d", host, &port) != 2) {
        fprintf(stderr, "bad target %s\n", argv[2]);
        return 2;
    }
    double warmup = 1, duration = 5;
    int timeout_ms = 500, base = 10, bal_pid = 0, be_pid = 0, nextra = 0, extra[8];
    int opt;
    optind = 3;
    while ((opt = getopt(argc, argv, "c:w:s:W:d:t:B:p:q:x:")) != -1) {
        switch (opt) {
        case 'c': nclients = atoi(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 's': dsize = atoi(optarg); break;
        case 'W': warmup = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 't': timeout_ms = atoi(optarg); break;
        case 'B': base = atoi(optarg); break;
        case 'p': bal_pid = atoi(optarg); break;
        case 'q': be_pid = atoi(optarg); break;
        case 'x':
            if (nextra < 8) extra[nextra++] = atoi(optarg);
            break;
        default: return 2;
        }
    }
    if (window < 1 || window > MAXW || nclients < 1 || dsize < (int)sizeof(struct hdr) ||
        dsize > 2048) {
        fprintf(stderr, "bad -w (1..%d), -c or -s (%zu..2048)\n", MAXW, sizeof(struct hdr));
        return 2;
    }
    for (int i = 0; i < dsize; i++) payload[i] = (char)('a' + i % 26);

    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) {
        fprintf(stderr, "bad host %s\n", host);
        return 2;
    }
    int ep = epoll_create1(0);
    clients = calloc(nclients, sizeof *clients);
    for (int i = 0; i < nclients; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0) die("socket");
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl((127u << 24) | (uint32_t)(base + i % 200));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind");
        if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) die("connect");
        clients[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }

    uint64_t t0 = now_ns();
    uint64_t t_measure = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(duration * 1e9);
    uint64_t timeout_ns = (uint64_t)timeout_ms * 1000000ull;
    uint64_t t_drain_end = t_end + timeout_ns + 200000000ull;
    int all[MAXW];
    for (int s = 0; s < window; s++) all[s] = s;
    for (int i = 0; i < nclients; i++) send_slots(&clients[i], i, all, window, t0);

    long long bal0 = -1, bal1 = -1, be0 = -1, be1 = -1;
    double self0 = 0, self1 = 0;
    long long ex0[8], ex1[8];
    static unsigned long long cs0[MAXCPU][8], cs1[MAXCPU][8];
    int ncpu = 0;
    uint64_t m_start = 0, m_stop = 0;
    int nsec = (int)(duration + 0.999);
    uint64_t *per_sec = calloc(nsec + 1, sizeof *per_sec);
    uint64_t next_sweep = t0 + 20000000ull;
    struct epoll_event evs[256];
    for (;;) {
        uint64_t t = now_ns();
        if (phase == WARMUP && t >= t_measure) {
            bal0 = proc_ticks(bal_pid);
            be0 = proc_ticks(be_pid);
            self0 = self_cpu_s();
            for (int i = 0; i < nextra; i++) ex0[i] = proc_ticks(extra[i]);
            cpu_stat(cs0);
            m_start = now_ns();
            phase = MEASURE;
        } else if (phase == MEASURE && t >= t_end) {
            bal1 = proc_ticks(bal_pid);
            be1 = proc_ticks(be_pid);
            self1 = self_cpu_s();
            for (int i = 0; i < nextra; i++) ex1[i] = proc_ticks(extra[i]);
            ncpu = cpu_stat(cs1);
            m_stop = now_ns();
            phase = DRAIN;
        } else if (phase == DRAIN) {
            int open = 0;
            for (int i = 0; i < nclients && !open; i++)
                for (int s = 0; s < window; s++) open |= clients[i].pending[s];
            if (!open || t >= t_drain_end) break;
        }
        if (t >= next_sweep) {
            sweep(t, timeout_ns);
            next_sweep = t + 20000000ull;
        }
        int n = epoll_wait(ep, evs, 256, 10);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        uint64_t before = cnt[MEASURE].ok;
        for (int i = 0; i < n; i++) on_readable((int)evs[i].data.u32);
        if (phase == MEASURE) {
            int sec = (int)((now_ns() - m_start) / 1000000000ull);
            if (sec > nsec) sec = nsec;
            per_sec[sec] += cnt[MEASURE].ok - before;
        }
    }
    /* Whatever is still outstanding after the drain never came back. */
    uint64_t unanswered = 0;
    for (int i = 0; i < nclients; i++)
        for (int s = 0; s < window; s++) unanswered += clients[i].pending[s];

    double secs = (m_stop - m_start) / 1e9;
    long hz = sysconf(_SC_CLK_TCK);
    struct counters *m = &cnt[MEASURE];
    uint64_t min_sec = UINT64_MAX, max_sec = 0;
    for (int i = 0; i < nsec; i++) {
        if (per_sec[i] < min_sec) min_sec = per_sec[i];
        if (per_sec[i] > max_sec) max_sec = per_sec[i];
    }
    double bal_cpu = (bal0 >= 0 && bal1 >= 0) ? (double)(bal1 - bal0) / hz : -1;
    double be_cpu = (be0 >= 0 && be1 >= 0) ? (double)(be1 - be0) / hz : -1;
    printf("{\"clients\":%d,\"window\":%d,\"size\":%d,\"secs\":%.4f,"
           "\"round_trips\":%llu,\"rate\":%.1f,\"min_1s\":%llu,\"max_1s\":%llu,"
           "\"mean_rtt_us\":%.1f,\"sent\":%llu,\"lost\":%llu,\"stale\":%llu,"
           "\"misrouted\":%llu,\"bad\":%llu,\"send_err\":%llu,\"recv_err\":%llu,"
           "\"warmup_ok\":%llu,\"warmup_lost\":%llu,\"warmup_recv_err\":%llu,"
           "\"drain_lost\":%llu,\"unanswered_at_end\":%llu,"
           "\"balancer_cpu_s\":%.3f,\"backend_cpu_s\":%.3f,\"loadgen_cpu_s\":%.3f,"
           "\"balancer_us_per_dgram\":%.3f,",
           nclients, window, dsize, secs, (unsigned long long)m->ok, m->ok / secs,
           (unsigned long long)min_sec, (unsigned long long)max_sec,
           m->ok ? m->rtt_ns_sum / 1e3 / m->ok : 0.0, (unsigned long long)m->sent,
           (unsigned long long)m->lost, (unsigned long long)m->stale,
           (unsigned long long)m->misrouted, (unsigned long long)m->bad,
           (unsigned long long)m->send_err, (unsigned long long)m->recv_err,
           (unsigned long long)cnt[WARMUP].ok, (unsigned long long)cnt[WARMUP].lost,
           (unsigned long long)cnt[WARMUP].recv_err, (unsigned long long)cnt[DRAIN].lost,
           (unsigned long long)unanswered, bal_cpu, be_cpu, self1 - self0,
           (bal_cpu >= 0 && m->ok) ? bal_cpu * 1e6 / m->ok : -1.0);
    printf("\"extra_cpu_s\":[");
    for (int i = 0; i < nextra; i++)
        printf("%s%.3f", i ? "," : "",
               (ex0[i] >= 0 && ex1[i] >= 0) ? (double)(ex1[i] - ex0[i]) / hz : -1.0);
    /* busy = user+nice+system+irq+softirq; idle = idle+iowait. */
    printf("],\"cpus\":[");
    for (int c = 0; c < ncpu; c++) {
        unsigned long long d[8];
        for (int k = 0; k < 8; k++) d[k] = cs1[c][k] - cs0[c][k];
        printf("%s{\"busy_s\":%.3f,\"softirq_s\":%.3f,\"idle_s\":%.3f,\"steal_s\":%.3f}",
               c ? "," : "", (double)(d[0] + d[1] + d[2] + d[5] + d[6]) / hz, (double)d[6] / hz,
               (double)(d[3] + d[4]) / hz, (double)d[7] / hz);
    }
    printf("]}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "echo")) return echo_main(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "load")) return load_main(argc, argv);
    fprintf(stderr, "usage: udpload echo PORT [ADDR] | udpload load HOST:PORT [options]\n");
    return 2;
}
