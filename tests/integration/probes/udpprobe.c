/* udpprobe send DST_IP DST_PORT   one UDP datagram whose payload is stdin (at most 64 KiB)
 * udpprobe recv PORT SECONDS      print each datagram that arrives on PORT (any address) within
 *                                 SECONDS, one line each: its length and its bytes as text
 *
 * What a job's user, root in their own VM, can bring into it: the test guest's busybox nc has
 * no UDP, and a forged VXLAN packet needs exact bytes. The tests build it statically on the
 * host and put it in the job's work dir, which the VM shares
 * (tests/integration/test_multinode_fabric.py). */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int usage(void)
{
    fprintf(stderr, "usage: udpprobe send DST_IP DST_PORT < payload | udpprobe recv PORT SECONDS\n");
    return 2;
}

int main(int argc, char **argv)
{
    static char buf[65536];
    struct sockaddr_in a = {.sin_family = AF_INET};
    ssize_t r;
    size_t n = 0;
    int s;

    if (argc != 4)
        return usage();
    s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) {
        perror("socket");
        return 1;
    }
    if (strcmp(argv[1], "send") == 0) {
        if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1)
            return usage();
        a.sin_port = htons((unsigned short)atoi(argv[3]));
        while (n < sizeof buf && (r = read(0, buf + n, sizeof buf - n)) > 0)
            n += (size_t)r;
        if (sendto(s, buf, n, 0, (struct sockaddr *)&a, sizeof a) != (ssize_t)n) {
            perror("sendto");
            return 1;
        }
        printf("sent %zu bytes\n", n);
        return 0;
    }
    if (strcmp(argv[1], "recv") == 0) {
        time_t end = time(NULL) + atoi(argv[3]);
        a.sin_port = htons((unsigned short)atoi(argv[2]));
        if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) {
            perror("bind");
            return 1;
        }
        printf("listening\n");
        fflush(stdout);
        while (time(NULL) < end) {
            struct timeval tv = {.tv_sec = 1};
            setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            r = recv(s, buf, sizeof buf - 1, 0);
            if (r < 0)
                continue;
            buf[r] = 0;
            printf("got %zd %s\n", r, buf);
            fflush(stdout);
        }
        return 0;
    }
    return usage();
}
