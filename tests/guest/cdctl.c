/* cdctl: the guest side of the CD-ROM tests. Drives the Linux cdrom ioctls, which turn into
 * the MMC commands the cdrom backend must answer.
 *
 *   cdctl DEV status      print CDROM_DRIVE_STATUS: no-info, no-disc, tray-open, not-ready, disc-ok
 *   cdctl DEV eject       CDROMEJECT (START STOP UNIT, LoEj)
 *   cdctl DEV close       CDROMCLOSETRAY
 *   cdctl DEV lock|unlock CDROM_LOCKDOOR (PREVENT ALLOW MEDIUM REMOVAL)
 *   cdctl DEV changed     CDROM_MEDIA_CHANGED: 1 if the medium changed since the last call
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/cdrom.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: cdctl DEV status|eject|close|lock|unlock|changed\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_NONBLOCK);
    if (fd < 0) {
        fprintf(stderr, "cdctl: %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    const char *op = argv[2];
    int r;
    if (!strcmp(op, "status")) {
        r = ioctl(fd, CDROM_DRIVE_STATUS, CDSL_CURRENT);
        const char *names[] = {"no-info", "no-disc", "tray-open", "not-ready", "disc-ok"};
        if (r >= 0 && r <= 4) {
            printf("%s\n", names[r]);
            return 0;
        }
    } else if (!strcmp(op, "eject")) {
        r = ioctl(fd, CDROMEJECT, 0);
    } else if (!strcmp(op, "close")) {
        r = ioctl(fd, CDROMCLOSETRAY, 0);
    } else if (!strcmp(op, "lock") || !strcmp(op, "unlock")) {
        r = ioctl(fd, CDROM_LOCKDOOR, !strcmp(op, "lock"));
    } else if (!strcmp(op, "changed")) {
        r = ioctl(fd, CDROM_MEDIA_CHANGED, CDSL_CURRENT);
        if (r >= 0) {
            printf("%d\n", r);
            return 0;
        }
    } else {
        fprintf(stderr, "cdctl: unknown operation %s\n", op);
        return 2;
    }
    if (r < 0) {
        printf("%s: %s\n", op, strerror(errno));
        return 1;
    }
    printf("%s: ok\n", op);
    return 0;
}
