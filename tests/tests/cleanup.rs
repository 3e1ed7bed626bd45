//! Thousands of fork+exec in one process leave its fds, memory and threads
//! where they were. Its own test binary, so no other test shares the process.

use std::time::Duration;

use zeroboot_e2e::fork;
use zeroboot_protocol::Request;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
}

fn fork_and_exec() {
    let r = fork()
        .exec(Request::new(b"print(1+1)", b""), Duration::from_secs(60))
        .expect("fork+exec");
    assert_eq!(r.stdout, b"2\n");
}

#[test]
fn forks_release_every_fd_mapping_and_thread() {
    // ZEROBOOT_CLEANUP_FORKS sets the count; the figure is 10,000,
    // which takes several minutes here.
    let forks: usize = std::env::var("ZEROBOOT_CLEANUP_FORKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    for _ in 0..50 {
        fork_and_exec();
    }
    let (fds, rss, threads) = (open_fds(), status_field("VmRSS:"), status_field("Threads:"));
    for _ in 0..forks {
        fork_and_exec();
    }
    let (fds_after, rss_after, threads_after) = (open_fds(), status_field("VmRSS:"), status_field("Threads:"));
    // The template's pool holds a few prepared VMs, a handful of fds each,
    // more or fewer at any moment; a leak of one fd a fork shows anyway.
    assert!(
        fds_after <= fds + 16,
        "open fds went from {fds} to {fds_after} over {forks} forks"
    );
    assert_eq!(threads_after, threads, "threads went from {threads} to {threads_after}");
    // Allocator noise is a few MiB at most; a leaked fork holds its guest
    // pages (about 4 MiB) and would show many times over.
    assert!(
        rss_after <= rss + 8 * 1024,
        "RSS went from {rss} KiB to {rss_after} KiB over {forks} forks"
    );
}
