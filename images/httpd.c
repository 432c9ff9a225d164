/*
 * us-httpd: the lab guest's page server.
 *
 * busybox httpd forks a process per request; under TCG that costs tens of milliseconds, so a
 * client polling every 5 ms (the failover bench) queues up and SYNs get dropped, and the
 * bench would measure the guest's backlog instead of the failover. This server answers every
 * request from one process with the page held in memory: accept, read the request head
 * (bounded, short timeout), write a fixed response, close.
 *
 * usage: us-httpd <port> <page file>
 */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define MAX_PAGE 4096
#define MAX_REQUEST 4096

static int usage(void) {
    fprintf(stderr, "usage: us-httpd <port 1-65535> <page file>\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc != 3)
        return usage();
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
    for (;;) {
        int c = accept(srv, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("us-httpd: accept");
            continue;
        }
        /* A slow or silent client must not stall everyone: 200 ms to send its request. */
        struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        char req[MAX_REQUEST];
        size_t got = 0;
        while (got < sizeof req - 1) {
            ssize_t n = read(c, req + got, sizeof req - 1 - got);
            if (n <= 0)
                break;
            got += (size_t)n;
            req[got] = 0;
            if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
                break;
        }
        if (got > 0) {
            size_t off = 0;
            while (off < response_len) {
                ssize_t n = write(c, response + off, response_len - off);
                if (n <= 0)
                    break;
                off += (size_t)n;
            }
        }
        close(c);
    }
}
