/*
 * us-workload: load generator for the understudy lab guest.
 *
 * Tests start it through the guest agent (guest-exec). Modes:
 *   us-workload cpu <duty_pct 1-100> <seconds>
 *   us-workload mem <mib> <seconds>
 *   us-workload connect <ipv4> <port> <per_second> <seconds>
 *   us-workload pattern <cpu_duty 1-100> <mem_mib> <seconds>
 *
 * Every mode prints one summary line on stdout and exits 0 on success.
 * Bad arguments print the usage on stderr and exit 2. A connect run in which
 * some requests failed exits 3. Built with `gcc -static -O2`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define EXIT_USAGE 2
#define EXIT_PARTIAL 3

/* One busy/sleep cycle; short enough that the duty cycle holds over a second. */
#define CYCLE_NS 100000000LL
#define MAX_SECONDS 86400
#define MAX_MIB (64 * 1024)
#define MAX_PER_SECOND 1000
#define READ_LIMIT (64 * 1024)
#define IO_TIMEOUT_MS 1000

static const char usage_text[] =
    "usage:\n"
    "  us-workload cpu <duty_pct 1-100> <seconds>\n"
    "  us-workload mem <mib> <seconds>\n"
    "  us-workload connect <ipv4> <port> <per_second> <seconds>\n"
    "  us-workload pattern <cpu_duty 1-100> <mem_mib> <seconds>\n";

static int usage(const char *problem)
{
    if (problem)
        fprintf(stderr, "us-workload: %s\n", problem);
    fputs(usage_text, stderr);
    return EXIT_USAGE;
}

/* Parses a decimal integer in [min, max]; rejects signs, junk and overflow. */
static int parse_num(const char *text, long min, long max, long *out)
{
    char *end;
    long value;

    if (text[0] < '0' || text[0] > '9')
        return -1;
    errno = 0;
    value = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || value < min || value > max)
        return -1;
    *out = value;
    return 0;
}

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t deadline_ns)
{
    struct timespec ts = {
        .tv_sec = deadline_ns / 1000000000LL,
        .tv_nsec = deadline_ns % 1000000000LL,
    };

    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* Runs busy/sleep cycles of CYCLE_NS until `end_ns`. */
static void burn_cpu(long duty_pct, int64_t end_ns)
{
    volatile uint64_t sink = 0;
    int64_t cycle_start = now_ns();

    while (cycle_start < end_ns) {
        int64_t busy_until = cycle_start + CYCLE_NS * duty_pct / 100;
        int64_t cycle_end = cycle_start + CYCLE_NS;

        if (busy_until > end_ns)
            busy_until = end_ns;
        if (cycle_end > end_ns)
            cycle_end = end_ns;
        while (now_ns() < busy_until)
            for (int i = 0; i < 1000; i++)
                sink += (uint64_t)i * 2654435761u;
        if (cycle_end > busy_until)
            sleep_until(cycle_end);
        cycle_start = cycle_end;
    }
}

/* Allocates `mib` MiB and writes every page so it is really resident. */
static char *grab_memory(long mib)
{
    size_t len = (size_t)mib << 20;
    long page = sysconf(_SC_PAGESIZE);
    char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (mem == MAP_FAILED) {
        fprintf(stderr, "us-workload: cannot allocate %ld MiB: %s\n", mib, strerror(errno));
        return NULL;
    }
    if (page <= 0)
        page = 4096;
    for (size_t off = 0; off < len; off += (size_t)page)
        mem[off] = (char)(off / (size_t)page);
    return mem;
}

static int run_cpu(long duty_pct, long seconds)
{
    burn_cpu(duty_pct, now_ns() + seconds * 1000000000LL);
    printf("us-workload cpu: duty=%ld seconds=%ld done\n", duty_pct, seconds);
    return 0;
}

static int run_mem(long mib, long seconds)
{
    char *mem = grab_memory(mib);

    if (!mem)
        return 1;
    sleep_until(now_ns() + seconds * 1000000000LL);
    munmap(mem, (size_t)mib << 20);
    printf("us-workload mem: mib=%ld seconds=%ld done\n", mib, seconds);
    return 0;
}

static int run_pattern(long duty_pct, long mib, long seconds)
{
    char *mem = grab_memory(mib);

    if (!mem)
        return 1;
    burn_cpu(duty_pct, now_ns() + seconds * 1000000000LL);
    munmap(mem, (size_t)mib << 20);
    printf("us-workload pattern: duty=%ld mib=%ld seconds=%ld done\n", duty_pct, mib, seconds);
    return 0;
}

/* Waits for `events` on `fd` until `deadline_ns`; returns 1 when ready. */
static int wait_fd(int fd, short events, int64_t deadline_ns)
{
    for (;;) {
        int64_t left_ms = (deadline_ns - now_ns()) / 1000000LL;
        struct pollfd pfd = { .fd = fd, .events = events };
        int rc;

        if (left_ms <= 0)
            return 0;
        rc = poll(&pfd, 1, (int)left_ms);
        if (rc < 0 && errno == EINTR)
            continue;
        return rc > 0;
    }
}

/*
 * One HTTP/1.0 request with a 1 s deadline; returns the number of bytes read
 * (at most READ_LIMIT), or -1 on failure. An empty answer counts as a failure.
 */
static long one_request(const struct sockaddr_in *addr)
{
    static const char request[] = "GET / HTTP/1.0\r\n\r\n";
    static char buf[READ_LIMIT];
    int64_t deadline = now_ns() + IO_TIMEOUT_MS * 1000000LL;
    size_t sent = 0;
    long got = 0;
    int err = 0;
    socklen_t errlen = sizeof(err);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return -1;
    if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0) {
        if (errno != EINPROGRESS || !wait_fd(fd, POLLOUT, deadline) ||
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &errlen) < 0 || err != 0)
            goto fail;
    }
    while (sent < sizeof(request) - 1) {
        ssize_t n = send(fd, request + sent, sizeof(request) - 1 - sent, MSG_NOSIGNAL);

        if (n > 0) {
            sent += (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            if (!wait_fd(fd, POLLOUT, deadline))
                goto fail;
        } else if (n < 0 && errno != EINTR) {
            goto fail;
        }
    }
    while (got < READ_LIMIT) {
        ssize_t n = recv(fd, buf + got, (size_t)(READ_LIMIT - got), 0);

        if (n > 0) {
            got += n;
        } else if (n == 0) {
            break;
        } else if (errno == EAGAIN) {
            if (!wait_fd(fd, POLLIN, deadline))
                goto fail;
        } else if (errno != EINTR) {
            goto fail;
        }
    }
    close(fd);
    return got;
fail:
    close(fd);
    return -1;
}

static int run_connect(const struct sockaddr_in *addr, long per_second, long seconds)
{
    const int64_t interval = 1000000000LL / per_second;
    const long total = per_second * seconds;
    int64_t next = now_ns();
    long ok = 0, failed = 0;
    long long bytes = 0;

    for (long i = 0; i < total; i++) {
        long n;

        sleep_until(next);
        n = one_request(addr);
        if (n > 0) {
            ok++;
            bytes += n;
        } else {
            failed++;
        }
        next += interval;
    }
    printf("us-workload connect: attempted=%ld ok=%ld failed=%ld bytes=%lld\n", total, ok, failed,
           bytes);
    return failed == 0 ? 0 : EXIT_PARTIAL;
}

int main(int argc, char **argv)
{
    long a, b, c;

    if (argc < 2)
        return usage("missing mode");
    if (strcmp(argv[1], "cpu") == 0) {
        if (argc != 4)
            return usage("cpu takes <duty_pct> <seconds>");
        if (parse_num(argv[2], 1, 100, &a) < 0)
            return usage("duty_pct must be an integer from 1 to 100");
        if (parse_num(argv[3], 1, MAX_SECONDS, &b) < 0)
            return usage("seconds must be an integer from 1 to 86400");
        return run_cpu(a, b);
    }
    if (strcmp(argv[1], "mem") == 0) {
        if (argc != 4)
            return usage("mem takes <mib> <seconds>");
        if (parse_num(argv[2], 1, MAX_MIB, &a) < 0)
            return usage("mib must be an integer from 1 to 65536");
        if (parse_num(argv[3], 1, MAX_SECONDS, &b) < 0)
            return usage("seconds must be an integer from 1 to 86400");
        return run_mem(a, b);
    }
    if (strcmp(argv[1], "connect") == 0) {
        struct sockaddr_in addr = { .sin_family = AF_INET };

        if (argc != 6)
            return usage("connect takes <ipv4> <port> <per_second> <seconds>");
        if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1)
            return usage("ipv4 must be a dotted IPv4 address");
        if (parse_num(argv[3], 1, 65535, &a) < 0)
            return usage("port must be an integer from 1 to 65535");
        if (parse_num(argv[4], 1, MAX_PER_SECOND, &b) < 0)
            return usage("per_second must be an integer from 1 to 1000");
        if (parse_num(argv[5], 1, MAX_SECONDS, &c) < 0)
            return usage("seconds must be an integer from 1 to 86400");
        addr.sin_port = htons((uint16_t)a);
        return run_connect(&addr, b, c);
    }
    if (strcmp(argv[1], "pattern") == 0) {
        if (argc != 5)
            return usage("pattern takes <cpu_duty> <mem_mib> <seconds>");
        if (parse_num(argv[2], 1, 100, &a) < 0)
            return usage("cpu_duty must be an integer from 1 to 100");
        if (parse_num(argv[3], 1, MAX_MIB, &b) < 0)
            return usage("mem_mib must be an integer from 1 to 65536");
        if (parse_num(argv[4], 1, MAX_SECONDS, &c) < 0)
            return usage("seconds must be an integer from 1 to 86400");
        return run_pattern(a, b, c);
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        fputs(usage_text, stdout);
        return 0;
    }
    return usage("unknown mode");
}
