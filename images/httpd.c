/*
 * us-httpd: the lab guest's page server.
 *
 * busybox httpd forks a process per request; under TCG that costs tens of milliseconds, so a
 * client polling every 5 ms (the failover bench) queues up and SYNs get dropped, and the
 * bench would measure the guest's backlog instead of the failover. This server answers every
 * request from one process with the page held in memory: accept, read the request head
 * (bounded, short timeout), write a fixed response, close.
 *
 * It also serves the stateful lab service, a ledger kept on the data disk mounted at
 * <data dir> (an ext4 file system; see us-data):
 *   POST /append?key=K  appends the record "K\n" to <data dir>/ledger and fsyncs it (and, when
 *                       the file was just created, its directory) before answering 200;
 *   GET /ledger         answers every record, one per line.
 * K is 1 to 64 of [A-Za-z0-9_.-]. While no ext4 file system is mounted at <data dir> (a
 * standing-by shadow boots without its data disk) both answer 503 and nothing is written:
 * records never land in the initramfs.
 *
 * And the site kept on the system disk (label ussys, mounted read-only by /init), so that a
 * guest booted from another system image serves other content:
 *   GET /site/N         answers the file <site dir>/N (N is 1 to 64 of [A-Za-z0-9_.-], at most
 *                       4 KiB are sent), 404 if there is none.
 *
 * usage: us-httpd <port> <page file> [<data dir> [<site dir>]]
 */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/vfs.h>
#include <unistd.h>

#define MAX_PAGE 4096
#define MAX_REQUEST 4096
#define MAX_KEY 64
/* Connections taken from the backlog at once (and appends committed with one fsync). */
#define BATCH 64
#define EXT4_MAGIC 0xEF53

static int usage(void) {
    fprintf(stderr, "usage: us-httpd <port 1-65535> <page file> [<data dir> [<site dir>]]\n");
    return 2;
}

static void write_all(int fd, const char *buf, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(fd, buf + off, len - off);
        if (n <= 0)
            return;
        off += (size_t)n;
    }
}

static void reply(int c, const char *status, const char *body) {
    char head[256];
    size_t len = strlen(body);
    int n = snprintf(head, sizeof head,
                     "HTTP/1.0 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n",
                     status, len);
    write_all(c, head, (size_t)n);
    write_all(c, body, len);
}

/* Whether an ext4 file system (the data disk) is mounted at dir. */
static int data_mounted(const char *dir) {
    struct statfs st;
    return dir && statfs(dir, &st) == 0 && st.f_type == EXT4_MAGIC;
}

/* Copies the name at q (1 to MAX_KEY of [A-Za-z0-9_.-], ending at '&', ' ' or the end) into
 * key; 0 if it is empty or malformed. */
static int parse_name(const char *q, char *key) {
    size_t n = 0;
    while (q[n] && q[n] != '&' && q[n] != ' ') {
        char ch = q[n];
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                 ch == '_' || ch == '.' || ch == '-';
        if (!ok || n >= MAX_KEY)
            return 0;
        key[n] = ch;
        n++;
    }
    key[n] = 0;
    return n > 0;
}

/* The key of "?key=K" in a request target, validated; 0 if missing or malformed. */
static int parse_key(const char *target, char *key) {
    const char *q = strstr(target, "?key=");
    return q && parse_name(q + 5, key);
}

/* GET /site/N: the file N of the site directory (bounded), or 404. */
static void site_file(int c, const char *req, const char *dir) {
    char name[MAX_KEY + 1], path[512], body[MAX_PAGE + 1];
    if (!parse_name(req + strlen("GET /site/"), name) || name[0] == '.') {
        reply(c, "400 Bad Request", "bad name\n");
        return;
    }
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        reply(c, "404 Not Found", "no such file\n");
        return;
    }
    ssize_t got = read(fd, body, MAX_PAGE);
    close(fd);
    body[got > 0 ? got : 0] = 0;
    reply(c, "200 OK", body);
}

/*
 * Appends the valid keys of a batch of POST /append requests with ONE write and ONE fsync
 * (group commit), then answers each: 200 only once its record is durable. Under TCG an fsync
 * costs tens of milliseconds; one per request would cap the ledger at a few dozen appends a
 * second, below what the bench's client sends.
 */
static void ledger_append_batch(const int *conns, char (*targets)[MAX_REQUEST], int n, const char *dir) {
    char keys[BATCH][MAX_KEY + 1];
    int valid[BATCH];
    char buf[BATCH * (MAX_KEY + 1)];
    size_t len = 0;
    int any = 0;
    for (int i = 0; i < n; i++) {
        valid[i] = parse_key(targets[i], keys[i]);
        if (!valid[i]) {
            reply(conns[i], "400 Bad Request", "expected ?key= with 1-64 of [A-Za-z0-9_.-]\n");
            continue;
        }
        len += (size_t)snprintf(buf + len, sizeof buf - len, "%s\n", keys[i]);
        any = 1;
    }
    if (!any)
        return;
    const char *status = "200 OK", *why = NULL;
    if (!data_mounted(dir)) {
        status = "503 Service Unavailable";
        why = "data disk not mounted\n";
    } else {
        char path[512];
        snprintf(path, sizeof path, "%s/ledger", dir);
        int created = access(path, F_OK) != 0;
        int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        int synced = fd >= 0 && write(fd, buf, len) == (ssize_t)len && fsync(fd) == 0;
        if (fd >= 0)
            close(fd);
        if (synced && created) {
            /* A new file's directory entry must be durable too. */
            int d = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            synced = d >= 0 && fsync(d) == 0;
            if (d >= 0)
                close(d);
        }
        if (!synced) {
            status = "500 Internal Server Error";
            why = "write or fsync failed\n";
        }
    }
    for (int i = 0; i < n; i++) {
        if (!valid[i])
            continue;
        char body[MAX_KEY + 8];
        if (!why)
            snprintf(body, sizeof body, "ok %.64s\n", keys[i]);
        reply(conns[i], status, why ? why : body);
    }
}

static void ledger_list(int c, const char *dir) {
    if (!data_mounted(dir)) {
        reply(c, "503 Service Unavailable", "data disk not mounted\n");
        return;
    }
    char path[512];
    snprintf(path, sizeof path, "%s/ledger", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        reply(c, "200 OK", "");
        return;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        reply(c, "500 Internal Server Error", "cannot stat ledger\n");
        return;
    }
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %lld\r\n"
                     "Connection: close\r\n\r\n",
                     (long long)st.st_size);
    write_all(c, head, (size_t)n);
    /* A listing may be large: no send timeout for it. */
    struct timeval none = {0, 0};
    setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
    char buf[16384];
    off_t left = st.st_size;
    while (left > 0) {
        ssize_t got = read(fd, buf, sizeof buf < (size_t)left ? sizeof buf : (size_t)left);
        if (got <= 0)
            break;
        write_all(c, buf, (size_t)got);
        left -= got;
    }
    close(fd);
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 5)
        return usage();
    const char *data_dir = argc >= 4 ? argv[3] : NULL;
    const char *site_dir = argc == 5 ? argv[4] : NULL;
    char *end = NULL;
    long port = strtol(argv[1], &end, 10);
    if (!end || *end || port < 1 || port > 65535)
        return usage();

    char page[MAX_PAGE];
    FILE *f = fopen(argv[2], "r");
    if (!f) {
        perror("us-httpd: page");
        return 1;
    }
    size_t page_len = fread(page, 1, sizeof page, f);
    fclose(f);

    char response[MAX_PAGE + 256];
    int head = snprintf(response, sizeof response,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                        "Connection: close\r\n\r\n",
                        page_len);
    memcpy(response + head, page, page_len);
    size_t response_len = (size_t)head + page_len;

    signal(SIGPIPE, SIG_IGN);
    int srv = socket(AF_INET, SOCK_STREAM, 0);
    if (srv < 0) {
        perror("us-httpd: socket");
        return 1;
    }
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                               .sin_addr = {.s_addr = htonl(INADDR_ANY)}};
    if (bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(srv, 1024) < 0) {
        perror("us-httpd: bind/listen");
        return 1;
    }
    static char reqs[BATCH][MAX_REQUEST];
    static char targets[BATCH][MAX_REQUEST];
    for (;;) {
        /* Wait for one connection, then take every other one already queued (up to BATCH). */
        int conns[BATCH], n = 0;
        for (;;) {
            if (n > 0) {
                struct pollfd p = {.fd = srv, .events = POLLIN};
                if (n >= BATCH || poll(&p, 1, 0) <= 0)
                    break;
            }
            int c = accept(srv, NULL, NULL);
            if (c < 0) {
                if (errno == EINTR || errno == ECONNABORTED)
                    continue;
                perror("us-httpd: accept");
                if (n > 0)
                    break;
                continue;
            }
            /* A slow or silent client must not stall everyone: 200 ms to send its request. */
            struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            conns[n++] = c;
        }
        int appends[BATCH], na = 0;
        for (int i = 0; i < n; i++) {
            char *req = reqs[i];
            size_t got = 0;
            req[0] = 0;
            while (got < MAX_REQUEST - 1) {
                ssize_t r = read(conns[i], req + got, MAX_REQUEST - 1 - got);
                if (r <= 0)
                    break;
                got += (size_t)r;
                req[got] = 0;
                if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
                    break;
            }
            if (got == 0)
                continue;
            if (data_dir && strncmp(req, "POST /append", 12) == 0) {
                strcpy(targets[na], req + 5);
                appends[na++] = conns[i];
            }
        }
        if (na > 0)
            ledger_append_batch(appends, targets, na, data_dir);
        for (int i = 0; i < n; i++) {
            const char *req = reqs[i];
            if (req[0] && !(data_dir && strncmp(req, "POST /append", 12) == 0)) {
                if (data_dir && strncmp(req, "GET /ledger", 11) == 0)
                    ledger_list(conns[i], data_dir);
                else if (site_dir && strncmp(req, "GET /site/", 10) == 0)
                    site_file(conns[i], req, site_dir);
                else
                    write_all(conns[i], response, response_len);
            }
            close(conns[i]);
        }
    }
}
