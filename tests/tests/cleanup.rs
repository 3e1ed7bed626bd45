//! Thousands of fork+exec in one process leave its fds, memory and threads
//! where they were, and forks into worker processes (pooled or not) leave no
//! process behind.
//! Its own test binary, so no other test shares the process.

use std::time::Duration;

use zeroboot_e2e::{children_of, eventually, hypervisor, isolated_template, process_alive, snapshot};
use zeroboot_protocol::Request;
use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy, Template};

/// The tests count this process's fds, threads and children: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

fn fork_and_exec(template: &Template) {
    let r = template
        .fork(Box::new(std::io::sink()))
        .expect("fork")
        .exec(&Request::new(b"print(1+1)", b""), Duration::from_secs(60))
        .expect("fork+exec");
    assert_eq!(r.stdout, b"2\n");
}

#[test]
fn forks_release_every_fd_mapping_and_thread() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // ZEROBOOT_CLEANUP_FORKS sets the count; the figure is 10,000,
    // which takes several minutes here.
    let forks: usize = std::env::var("ZEROBOOT_CLEANUP_FORKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    // No pool of prepared VMs: how many it holds at a given moment would
    // show in the RSS (each holds its copies of the template's written
    // ranges, 54 MiB for python with private-written-ranges).
    let hv = hypervisor();
    let policy = ForkMemoryPolicy::Fixed(ForkMemory::for_this_host());
    let template = Template::new(hypervisor(), snapshot(&hv), policy);
    for _ in 0..50 {
        fork_and_exec(&template);
    }
    let (fds, rss, threads) = (open_fds(), status_field("VmRSS:"), status_field("Threads:"));
    for _ in 0..forks {
        fork_and_exec(&template);
    }
    let (fds_after, rss_after, threads_after) = (open_fds(), status_field("VmRSS:"), status_field("Threads:"));
    // A leak of one fd a fork shows many times over.
    assert!(
        fds_after <= fds + 16,
        "open fds went from {fds} to {fds_after} over {forks} forks"
    );
    assert_eq!(threads_after, threads, "threads went from {threads} to {threads_after}");
    // Allocator noise is a few MiB at most; a leaked fork holds its guest
    // pages (1.5 MiB or more) and would show many times over.
    assert!(
        rss_after <= rss + 8 * 1024,
        "RSS went from {rss} KiB to {rss_after} KiB over {forks} forks"
    );
}

#[test]
fn worker_process_forks_leave_no_process_fd_or_thread_behind() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let template = isolated_template(2);
    let run = || {
        let mut sandbox = template.fork().expect("fork a worker");
        let r = sandbox
            .exec(&Request::new(b"print(1+1)", b""), Duration::from_secs(60))
            .expect("exec in a worker");
        assert_eq!(r.stdout, b"2\n");
    };
    for _ in 0..20 {
        run();
    }
    let me = std::process::id();
    let zygote = template.zygote_pid().expect("the template has a zygote");
    let workers = || -> Vec<u32> { children_of(me).into_iter().filter(|&p| p != zygote).collect() };
    let settled = |n: usize| eventually(Duration::from_secs(10), || workers().len() <= n);
    // The pool's two prepared workers (besides the zygote they are cloned
    // from), and nothing else once the reaper is done.
    assert!(settled(2), "workers: {:?}", workers());
    let (fds, threads) = (open_fds(), status_field("Threads:"));
    let forks: usize = std::env::var("ZEROBOOT_CLEANUP_WORKER_FORKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    for _ in 0..forks {
        run();
    }
    assert!(settled(2), "after {forks} forks, workers: {:?}", workers());
    assert_eq!(template.zygote_pid(), Some(zygote), "the zygote served every fork");
    let (fds_after, threads_after) = (open_fds(), status_field("Threads:"));
    assert!(
        fds_after <= fds + 4,
        "open fds went from {fds} to {fds_after} over {forks} forks"
    );
    assert_eq!(threads_after, threads, "threads went from {threads} to {threads_after}");
}

#[test]
fn a_pool_keeps_workers_ready_and_ends_them_when_dropped() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    let before = children_of(me);
    let template = isolated_template(2);
    let zygote = template.zygote_pid().expect("the template has a zygote");
    let new_workers = || {
        children_of(me)
            .into_iter()
            .filter(|p| !before.contains(p) && *p != zygote && process_alive(*p))
            .count()
    };
    // Two prepared: one in the channel, one held by the filler.
    assert!(
        eventually(Duration::from_secs(60), || new_workers() == 2),
        "the pool started two workers"
    );
    drop(template);
    assert!(
        eventually(Duration::from_secs(10), || new_workers() == 0),
        "dropping the template ended its pooled workers"
    );
}

/// The kernel threads KVM runs for this process's PITs (`kvm-pit/<pid>`).
fn pit_threads() -> usize {
    let name = format!("kvm-pit/{}", std::process::id());
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// A fork has no PIT (the guest stopped using it at boot: Vm::create_pit),
/// so KVM starts no kernel thread for it, and the guest's timers still
/// fire: a sleep, an interval timer's signal and a child's sleep end on
/// time.
#[test]
fn forks_run_without_a_pit_and_their_timers_fire() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let hv = hypervisor();
    let template = Template::new(
        hypervisor(),
        snapshot(&hv),
        ForkMemoryPolicy::Fixed(ForkMemory::for_this_host()),
    );
    let mut machine = template.fork(Box::new(std::io::sink())).expect("fork");
    assert_eq!(pit_threads(), 0, "a PIT thread of this process runs beside a fork");
    let code = "import signal, subprocess, time\n\
                t = time.monotonic(); time.sleep(0.3); slept = time.monotonic() - t\n\
                fired = []\n\
                signal.signal(signal.SIGALRM, lambda *a: fired.append(time.monotonic()))\n\
                t = time.monotonic(); signal.setitimer(signal.ITIMER_REAL, 0.2)\n\
                while not fired and time.monotonic() - t < 5: time.sleep(0.01)\n\
                t2 = time.monotonic(); subprocess.run(['sleep', '0.2'], check=True)\n\
                print(round(slept, 1), round(fired[0] - t, 1), time.monotonic() - t2 >= 0.2)";
    let r = machine
        .exec(&Request::new(code.as_bytes(), b""), Duration::from_secs(120))
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "0.3 0.2 True\n",
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(pit_threads(), 0);
}
