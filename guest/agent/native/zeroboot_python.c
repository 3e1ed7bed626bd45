/*
 * The Python agent's native half, loaded with ctypes: what agent.py cannot
 * do from Python itself because no Python code may run in the middle of it.
 */
#include "files.h"
#include "guest.h"

/* See zb_mount_kernel_filesystems in guest.h. */
int zeroboot_mount_kernel_filesystems(void)
{
    return zb_mount_kernel_filesystems();
}

/* See zb_map_physical in guest.h. */
void *zeroboot_map_physical(uint64_t physical, size_t length)
{
    return zb_map_physical(physical, length);
}

/* See zb_hugify in guest.h. */
int zeroboot_hugify(char *report, size_t report_len)
{
    return zb_hugify(report, report_len);
}

/* See zb_capture_child_output in guest.h. */
int zeroboot_capture_child_output(int read_fds[2])
{
    return zb_capture_child_output(read_fds);
}

/* See zb_switch_user in guest.h. */
int zeroboot_switch_user(uint32_t uid)
{
    return zb_switch_user(uid);
}

/* See zb_serve_file_ops in files.h. */
void zeroboot_serve_file_ops(void *mailbox, void *doorbell)
{
    zb_serve_file_ops(mailbox, doorbell);
}
