/*
 * lab-reaper: runs the lab's libvirtd as its child and reaps every orphan below it at once.
 *
 * libvirt starts QEMU double-forked, so a QEMU is an orphan reparented to the nearest
 * "subreaper" ancestor, normally init. On a real host init (systemd) reaps a dead QEMU at once.
 * The lab machines' pid 1 reaps orphans only lazily, so a killed QEMU stays a zombie for a second
 * or two, and libvirt, which waits for the pid to disappear before it finishes stopping the
 * domain (and releases its disk leases), lags by as much. Declared a subreaper, this process
 * becomes the QEMUs' parent and reaps them as they die, like a real host's init would.
 *
 * usage: lab-reaper <program> [args...]   exits with the program's status once no child is left
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: lab-reaper <program> [args...]\n");
        return 2;
    }
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) {
        perror("lab-reaper: PR_SET_CHILD_SUBREAPER");
        return 1;
    }
    pid_t main_child = fork();
    if (main_child < 0) {
        perror("lab-reaper: fork");
        return 1;
    }
    if (main_child == 0) {
        execvp(argv[1], argv + 1);
        perror("lab-reaper: exec");
        _exit(127);
    }
    int status = 0, main_status = 0;
    for (;;) {
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: nothing left to reap */
        }
        if (pid == main_child)
            main_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    return main_status;
}
