/* cdctl: the guest side of the CD-ROM tests. Drives the Linux cdrom ioctls, which turn into
 * the MMC commands the cdrom backend must answer.
 *
 *   cdctl DEV status      print CDROM_DRIVE_STATUS: no-info, no-disc, tray-open, not-ready, disc-ok
 *   cdctl DEV eject       CDROMEJECT (START STOP UNIT, LoEj)
 *   cdctl DEV close       CDROMCLOSETRAY
 *   cdctl DEV lock|unlock CDROM_LOCKDOOR (PREVENT ALLOW MEDIUM REMOVAL)
 *   cdctl DEV changed     CDROM_MEDIA_CHANGED: 1 if the medium changed since the last call
 *   cdctl DEV toc         READ TOC: tracks, track 1 and lead-out in LBA and MSF
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
    } else if (!strcmp(op, "toc")) {
        struct cdrom_tochdr h;
        r = ioctl(fd, CDROMREADTOCHDR, &h);
        if (r >= 0) {
            printf("tracks %d-%d", h.cdth_trk0, h.cdth_trk1);
            int tracks[2] = {1, CDROM_LEADOUT};
            for (int i = 0; i < 2 && r >= 0; i++) {
                struct cdrom_tocentry e = {.cdte_track = tracks[i], .cdte_format = CDROM_LBA};
                r = ioctl(fd, CDROMREADTOCENTRY, &e);
                if (r < 0) break;
                int lba = e.cdte_addr.lba;
                e.cdte_format = CDROM_MSF;
                r = ioctl(fd, CDROMREADTOCENTRY, &e);
                if (r < 0) break;
                printf(" %s lba=%d msf=%d:%d:%d ctrl=%d", i ? "leadout" : "track1", lba,
                       e.cdte_addr.msf.minute, e.cdte_addr.msf.second, e.cdte_addr.msf.frame, e.cdte_ctrl);
            }
            if (r >= 0) {
                printf("\n");
                return 0;
            }
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
