//! Sandboxes in worker processes (zeroboot-sandbox), against real guests.

use std::time::Duration;

use zeroboot_e2e::{
    children_of, eventually, hypervisor, isolated_template, isolated_template_with, isolated_template_with_probes,
    process_alive, snapshot,
};
use zeroboot_protocol::GuestFault;
use zeroboot_protocol::Request;
use zeroboot_sandbox::SandboxError;
use zeroboot_vmm::fork::Probes;
use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy};

const TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn each_fork_is_a_worker_process_that_ends_with_its_sandbox() {
    let template = isolated_template(0);
    let mut a = template.fork().unwrap();
    let mut b = template.fork().unwrap();
    let (pa, pb) = (a.pid().unwrap(), b.pid().unwrap());
    assert_ne!(pa, pb, "two sandboxes, two processes");
    let cmdline = std::fs::read(format!("/proc/{pa}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("worker"));
    // The worker runs its guest under its seccomp filter (mode 2), which it
    // cannot drop (no_new_privs).
    let status = std::fs::read_to_string(format!("/proc/{pa}/status")).unwrap();
    assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    assert!(status.contains("\nNoNewPrivs:\t1\n"), "{status}");

    let r = a
        .exec(
            &Request::new(b"import builtins; builtins.mine = 'a'; print(1+1)", b""),
            TIMEOUT,
        )
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"2\n"[..]));
    let r = b
        .exec(
            &Request::new(b"import builtins; print(getattr(builtins, 'mine', None))", b""),
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(r.stdout, b"None\n", "b does not see a's state");

    let stats = a.stats().unwrap();
    assert!(stats.exits >= 1, "{stats:?}");
    assert!(stats.private_bytes > 0 && stats.private_bytes < 64 << 20, "{stats:?}");

    drop(a);
    assert!(
        eventually(Duration::from_secs(10), || !process_alive(pa)),
        "worker {pa} ended and was reaped"
    );
    assert!(process_alive(pb), "the other sandbox is untouched");
    let r = b.exec(&Request::new(b"print('still here')", b""), TIMEOUT).unwrap();
    assert_eq!(r.stdout, b"still here\n");
}

#[test]
fn workers_are_cloned_from_the_templates_zygote_and_spawned_without_it() {
    let me = std::process::id();
    let template = isolated_template(0);
    let zygote = template.zygote_pid().expect("the template has a zygote");
    assert!(children_of(me).contains(&zygote));
    let zygote_cmdline = std::fs::read(format!("/proc/{zygote}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&zygote_cmdline).contains("--zygote"));

    // A clone: the zygote's command line, no execve, yet this process's
    // child (CLONE_PARENT), under the worker's filter like a spawned one.
    let mut cloned = template.fork().unwrap();
    let pid = cloned.pid().unwrap();
    assert!(children_of(me).contains(&pid), "the worker is the host's child");
    assert!(!children_of(zygote).contains(&pid));
    assert_eq!(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap(), zygote_cmdline);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    let r = cloned.exec(&Request::new(b"print(1+1)", b""), TIMEOUT).unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"2\n"[..]));
    // Every stack page a clone touches is a copy of the zygote's: a few
    // pages, not the 17 (68 KiB) it took while the machine state (~8 KiB)
    // moved by value through the worker's frames.
    let stack = private_dirty_kib(pid, "[stack]");
    assert!(stack <= 16, "the worker copied {stack} KiB of the zygote's stack");

    // Without its zygote, the template spawns workers, and the clones it
    // made carry on.
    // SAFETY: kill(2) on a child process of this test.
    assert_eq!(unsafe { libc::kill(zygote as i32, libc::SIGKILL) }, 0);
    let mut spawned = template.fork().unwrap();
    assert_eq!(template.zygote_pid(), None, "a dead zygote is let go");
    let spawned_pid = spawned.pid().unwrap();
    let cmdline = std::fs::read(format!("/proc/{spawned_pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("--zygote"));
    let r = spawned.exec(&Request::new(b"print(3)", b""), TIMEOUT).unwrap();
    assert_eq!(r.stdout, b"3\n");
    let r = cloned.exec(&Request::new(b"print(4)", b""), TIMEOUT).unwrap();
    assert_eq!(r.stdout, b"4\n");
    drop(cloned);
    assert!(
        eventually(Duration::from_secs(10), || !process_alive(pid)),
        "a cloned worker ends and is reaped with its sandbox"
    );
}

#[test]
fn a_print_exec_is_one_exit_with_unwritten_memory_left_without_slots() {
    // The python template never wrote hundreds of MiB of its memory (free
    // memory, the end of the root image): forks give it KVM slots only when
    // the guest touches it (vmm::snapshot::unwritten).
    let unwritten: u64 = snapshot(&hypervisor()).unwritten.iter().map(|&(_, len)| len).sum();
    assert!(unwritten >= 256 << 20, "{} MiB of unwritten chunks", unwritten >> 20);
    // A print touches none of it: its one exit is the doorbell that brings
    // its result. (One fork in five may take another, a timer's say.)
    for memory in [ForkMemory::SharedPages, ForkMemory::PrivateWrittenRanges] {
        let template = isolated_template_with(1, ForkMemoryPolicy::Fixed(memory));
        let mut exits = Vec::new();
        for _ in 0..5 {
            let mut s = template.fork().unwrap();
            let r = s.exec(&Request::new(b"print(1+1)", b""), TIMEOUT).unwrap();
            assert_eq!(r.stdout, b"2\n");
            exits.push(s.stats().unwrap().exits);
        }
        assert!(
            exits.iter().filter(|&&e| e == 1).count() >= 4,
            "{memory:?}: exits per print {exits:?}"
        );
    }
}

#[test]
fn guest_timeouts_and_crashes_cross_the_process_boundary() {
    let template = isolated_template(1);
    let mut s = template.fork().unwrap();
    let err = s
        .exec(&Request::new(b"while True: pass", b""), Duration::from_millis(500))
        .unwrap_err();
    assert!(matches!(err, SandboxError::Guest(GuestFault::Timeout(_))), "{err}");

    let mut s = template.fork().unwrap();
    let err = s
        .exec(&Request::new(b"import os; os._exit(0)", b""), TIMEOUT)
        .unwrap_err();
    assert!(matches!(err, SandboxError::Guest(GuestFault::Reset)), "{err}");
}

#[test]
fn a_worker_killed_under_a_sandbox_is_a_clear_error() {
    let template = isolated_template(0);
    let mut s = template.fork().unwrap();
    let pid = s.pid().unwrap();
    // SAFETY: kill(2) on a child process of this test.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let err = s.exec(&Request::new(b"print(1)", b""), TIMEOUT).unwrap_err();
    assert!(matches!(err, SandboxError::Died { .. }), "{err}");
    assert!(err.to_string().contains("signal: 9"), "{err}");
    // The next fork is unaffected.
    let mut s = template.fork().unwrap();
    assert_eq!(s.exec(&Request::new(b"print(3)", b""), TIMEOUT).unwrap().stdout, b"3\n");
}

#[test]
fn a_live_sandbox_forks_into_new_processes() {
    let template = isolated_template(0);
    let mut parent = template.fork().unwrap();
    parent
        .exec(
            &Request::new(b"x = 41\nopen('/tmp/note', 'w').write('kept')", b""),
            TIMEOUT,
        )
        .unwrap();
    let live = parent.snapshot_live().unwrap();
    assert!(live.changed_bytes() > 0);
    let mut child = template.fork_live(&live, None).unwrap();
    assert_ne!(child.pid(), parent.pid());
    let r = child
        .exec(&Request::new(b"print(x + 1, open('/tmp/note').read())", b""), TIMEOUT)
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "42 kept\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn an_adaptive_pool_copies_ranges_ahead_and_shares_pages_on_demand() {
    let template = isolated_template_with(1, ForkMemoryPolicy::Adaptive);
    // The pool's first VM is made while nobody waits for it. A fork that
    // comes before it is ready prepares its own, on demand.
    let mut ahead = None;
    for _ in 0..60 {
        let sandbox = template.fork().unwrap();
        if sandbox.fork_memory() == ForkMemory::PrivateWrittenRanges {
            ahead = Some(sandbox);
            break;
        }
        assert_eq!(sandbox.fork_memory(), ForkMemory::SharedPages);
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut ahead = ahead.expect("within a minute the pool had a VM prepared ahead");
    // The pool refills only after a taken VM has started, and a worker takes
    // far longer to prepare than this call takes to come: this one is made
    // while its caller waits.
    let mut on_demand = template.fork().unwrap();
    assert_eq!(on_demand.fork_memory(), ForkMemory::SharedPages);

    for sandbox in [&mut ahead, &mut on_demand] {
        let r = sandbox.exec(&Request::new(b"print(1+1)", b""), TIMEOUT).unwrap();
        assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"2\n"[..]));
    }
    let (ahead, on_demand) = (ahead.stats().unwrap(), on_demand.stats().unwrap());
    // 2 MiB for each range the template's write set touches, against the
    // write set's own pages (about 1.5 MiB for python).
    assert!(ahead.private_bytes >= 16 << 20, "{ahead:?}");
    assert!(on_demand.private_bytes < 8 << 20, "{on_demand:?}");
    assert!(
        ahead.huge_mapped_bytes > on_demand.huge_mapped_bytes,
        "{ahead:?} {on_demand:?}"
    );
}

#[test]
fn memory_hogs_and_fork_bombs_end_only_their_own_sandbox() {
    let template = isolated_template(1);
    let mut bystander = template.fork().unwrap();
    bystander.exec(&Request::new(b"kept = 'here'", b""), TIMEOUT).unwrap();

    // 64 GiB in a 1 GiB guest: Python's MemoryError, and the sandbox
    // carries on.
    let mut hog = template.fork().unwrap();
    let r = hog
        .exec(&Request::new(b"x = bytearray(64 * 1024**3)", b""), TIMEOUT)
        .unwrap();
    assert_eq!(r.exit_code, 1);
    assert!(String::from_utf8_lossy(&r.stderr).contains("MemoryError"), "{r:?}");
    let r = hog.exec(&Request::new(b"print('after')", b""), TIMEOUT).unwrap();
    assert_eq!(r.stdout, b"after\n");

    // A fork bomb runs until its deadline, then its VM is gone.
    let mut bomb = template.fork().unwrap();
    let err = bomb
        .exec(
            &Request::new(b"import os\nwhile True:\n    os.fork()", b""),
            Duration::from_secs(3),
        )
        .unwrap_err();
    assert!(matches!(err, SandboxError::Guest(GuestFault::Timeout(_))), "{err}");
    drop(bomb);

    let r = bystander.exec(&Request::new(b"print(kept)", b""), TIMEOUT).unwrap();
    assert_eq!(r.stdout, b"here\n", "the other sandbox is untouched");
}

/// A sandbox from `template`'s pool whose VM ran the probes, waiting for
/// the pool to make one (a fork that finds the pool empty makes its own,
/// without them); None if none comes within a minute.
fn probed_fork(template: &zeroboot_sandbox::IsolatedTemplate) -> Option<zeroboot_sandbox::Sandbox> {
    eventually_fork(template, zeroboot_sandbox::Sandbox::probes_ran)
}

/// The first sandbox of `template` for which `wanted` holds, forking again
/// every 200 ms for up to a minute.
fn eventually_fork(
    template: &zeroboot_sandbox::IsolatedTemplate,
    wanted: impl Fn(&zeroboot_sandbox::Sandbox) -> bool,
) -> Option<zeroboot_sandbox::Sandbox> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let sandbox = template.fork().expect("a fork");
        if wanted(&sandbox) {
            return Some(sandbox);
        }
        drop(sandbox);
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn pooled_shared_pages_vms_run_the_probes_ahead_and_start_as_the_snapshot() {
    let shared = ForkMemoryPolicy::Fixed(ForkMemory::SharedPages);
    // A probe that leaves marks in the interpreter and in the guest
    // kernel's tmpfs; none of them may reach a request.
    let marking = b"import builtins; builtins.probed = 1\nopen('/tmp/probed', 'w').write('x')\nprint(1+1)".to_vec();
    let template = isolated_template_with_probes(1, shared, vec![marking]);
    let mut sandbox = probed_fork(&template).expect("a pooled VM that ran the probes");
    let before = sandbox.stats().unwrap();
    let r = sandbox
        .exec(
            &Request::new(
                b"import builtins, os\nprint(getattr(builtins, 'probed', None), os.path.exists('/tmp/probed'))",
                b"",
            ),
            TIMEOUT,
        )
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"None False\n"[..]), "{r:?}");
    let after = sandbox.stats().unwrap();
    assert_eq!(after.exits, 1, "the request is one exit: {after:?}");
    // Before its request the VM holds what a shared-pages VM copies ahead
    // (the template's `every` pages), not what the probe wrote.
    let every: u64 = template.snapshot().write_set.every.iter().map(|&(_, len)| len).sum();
    assert_eq!(before.private_bytes, every, "{before:?}");
    assert_eq!(before.exits, 0, "{before:?}");

    // A probe that fails, or one that changes the guest's page tables
    // (a new mapping), is refused: the VM is made again without it, and
    // serves; the pool then stops trying.
    for (probe, why) in [
        (&b"raise SystemExit(3)"[..], "a probe failed"),
        (
            &b"import mmap\nm = mmap.mmap(-1, 4 << 20)\nm[0] = 1\nprint(1+1)"[..],
            "page tables",
        ),
    ] {
        let refused = isolated_template_with_probes(1, shared, vec![probe.to_vec()]);
        let first = |sandbox: &zeroboot_sandbox::Sandbox| !matches!(sandbox.probes(), Probes::NotRun);
        let mut sandbox = eventually_fork(&refused, first).expect("the pool's first VM");
        match sandbox.probes() {
            Probes::Refused(reason) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{other:?}"),
        }
        let r = sandbox.exec(&Request::new(b"print(1+1)", b""), TIMEOUT).unwrap();
        assert_eq!(r.stdout, b"2\n");
        let next = refused.fork().unwrap();
        assert_eq!(next.probes(), &Probes::NotRun, "the pool stopped trying");
    }
}

/// `Private_Dirty` of the mapping of `pid` named `name` in its smaps, in KiB.
fn private_dirty_kib(pid: u32, name: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("the worker's smaps");
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| f.contains('-') && !f.ends_with(':')) {
            inside = fields.get(5) == Some(&name);
        } else if inside && fields.first() == Some(&"Private_Dirty:") {
            kib += fields[1].parse::<u64>().expect("a size in smaps");
        }
    }
    kib
}
