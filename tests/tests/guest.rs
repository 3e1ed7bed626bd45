//! Boot → ready → snapshot → restore → run, against a real guest.

use std::process::Command;
use std::time::Duration;

use zeroboot_e2e::{fork, hypervisor, ranges_moved_onto_huge_pages, snapshot, template, template_dir, zeroboot_bin};
use zeroboot_protocol::{GuestFault, ProtocolError, Request};
use zeroboot_template::{read_info, BOOT_LOG};
use zeroboot_vmm::Machine;

const TIMEOUT: Duration = Duration::from_secs(300);

fn run(machine: &mut Machine, code: &str) -> zeroboot_protocol::Outcome {
    machine
        .exec(&Request::new(code.as_bytes(), b""), TIMEOUT)
        .unwrap_or_else(|e| panic!("exec of {code:?} failed: {e}"))
}

#[test]
fn template_reached_ready_and_recorded_its_boot() {
    let dir = template_dir();
    let log = std::fs::read_to_string(dir.join(BOOT_LOG)).unwrap();
    assert!(log.contains("Linux version 6.1"), "boot.log has the kernel banner");
    assert!(
        log.contains("zeroboot-agent") && log.contains("ready"),
        "boot.log has the agent's ready line"
    );
    let info = read_info(&dir).unwrap();
    assert!(info.memory_bytes > 0 && info.phases.boot_s > 0.0);
    // The snapshot was taken in user mode, right after the doorbell store.
    let snap = snapshot(&hypervisor());
    assert_eq!(
        snap.state.vcpu.sregs.cs.selector & 3,
        3,
        "snapshot taken at CPL3 (the agent)"
    );
    assert!(snap.state.vcpu.msrs.len() > 10, "MSRs were saved");
    // Both user-space generators (Python's random, numpy's global state) are
    // registered for the host to refresh: of each 2.5 KB state the part in
    // the page holding most of it (at least half), and a position each.
    let positions = snap.state.entropy.iter().filter(|r| r.len == 0).count();
    let parts: Vec<u32> = snap.state.entropy.iter().map(|r| r.len).filter(|&n| n > 0).collect();
    assert!(
        positions == 2 && parts.len() == 2 && parts.iter().all(|n| (1248..=2496).contains(n)),
        "{:?}",
        snap.state.entropy
    );
}

#[test]
fn hot_memory_sits_on_huge_pages_in_guest_and_host() {
    let log = std::fs::read_to_string(template_dir().join(BOOT_LOG)).unwrap();
    let moved = ranges_moved_onto_huge_pages(&log);
    assert!(moved >= 8, "the agent moved only {moved} ranges onto huge pages");
    let mut m = fork();
    // The interpreter's code (non-PIE python3 at 0x400000) is on an
    // anonymous 2 MiB page, and the fork's kernel has THP off again.
    let r = run(
        &mut m,
        "import re\n\
         smaps = open('/proc/self/smaps').read()\n\
         text = smaps[smaps.index('00400000-'):]\n\
         print(re.search(r'AnonHugePages: +(\\d+)', text).group(1))\n\
         print(open('/sys/kernel/mm/transparent_hugepage/enabled').read().strip())",
    );
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(
        out,
        "2048\nalways madvise [never]\n",
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    // The host maps what the fork touched of those pages with 2 MiB pages too.
    let huge = m.ram().huge_mapped_bytes().unwrap();
    assert!(
        huge >= 2 << 20,
        "the host maps {huge} bytes of the fork's memory with 2 MiB pages; \
         with /sys/kernel/mm/transparent_hugepage/enabled at `never` it maps none"
    );
}

/// Both ways of backing a fork's memory run the same code; the private one
/// holds each written 2 MiB range whole, on the host's 2 MiB pages, and a
/// live snapshot of it still carries only the pages the guest changed.
#[test]
fn both_fork_memory_modes_run_code_and_copy_what_they_say() {
    use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy, Template};
    let hv = hypervisor();
    for mode in [ForkMemory::SharedPages, ForkMemory::PrivateWrittenRanges] {
        let snap = snapshot(&hv);
        let ranges = snap.write_set.huge_ranges().len() as u64;
        assert!(ranges > 0, "the template has a write set");
        let template = Template::new(hypervisor(), snap, ForkMemoryPolicy::Fixed(mode));
        let mut m = template.fork(Box::new(std::io::sink())).unwrap();
        let r = run(&mut m, "import numpy; print(int(numpy.arange(5).sum()))");
        assert_eq!(
            String::from_utf8_lossy(&r.stdout),
            "10\n",
            "{mode:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let copied = m.ram().copied_bytes().unwrap();
        let live = m.snapshot_live().unwrap();
        let changed = live.changed_bytes();
        match mode {
            ForkMemory::SharedPages => assert!(copied < 8 << 20, "{copied} bytes copied"),
            ForkMemory::PrivateWrittenRanges => {
                assert!(
                    copied >= ranges * (2 << 20),
                    "{copied} bytes copied for {ranges} ranges"
                );
                let huge = m.ram().huge_mapped_bytes().unwrap();
                assert!(
                    huge >= ranges * (2 << 20),
                    "{huge} bytes on 2 MiB host pages for {ranges} ranges; \
                     is /sys/kernel/mm/transparent_hugepage/enabled `never` on the host?"
                );
                assert!(changed < 8 << 20, "the live snapshot carries {changed} bytes");
            }
        }
        // A fork of that live state sees the request's effects.
        run(&mut m, "x = 41");
        let live = m.snapshot_live().unwrap();
        let mut child = template.fork_live(&live, Box::new(std::io::sink())).unwrap();
        let r = run(&mut child, "print(x + 1)");
        assert_eq!(String::from_utf8_lossy(&r.stdout), "42\n", "{mode:?}");
    }
}

/// A shared-pages fork copies ahead only the write-set pages that every
/// probe wrote (a print's): a sandbox that prints holds about those, and
/// takes numpy's other pages only when it runs numpy.
#[test]
fn shared_pages_forks_copy_ahead_only_what_every_probe_wrote() {
    use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy, Template};
    let page = 4096;
    let snap = snapshot(&hypervisor());
    let bytes = |runs: &[(u64, u64)]| runs.iter().map(|r| r.1).sum::<u64>();
    let (every, some) = (bytes(&snap.write_set.every), bytes(&snap.write_set.some));
    assert!(
        every >= 16 * page && some >= 16 * page,
        "python's write set has both parts: {every} bytes every probe wrote, {some} only numpy's"
    );
    let template = Template::new(hypervisor(), snap, ForkMemoryPolicy::Fixed(ForkMemory::SharedPages));
    let mut m = template.fork(Box::new(std::io::sink())).unwrap();
    assert_eq!(m.ram().copied_bytes().unwrap(), every, "copied ahead: the every part");
    let r = run(&mut m, "print(1+1)");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "2\n");
    let printed = m.ram().copied_bytes().unwrap();
    assert!(
        printed <= every + 8 * page,
        "after a print the fork holds {printed} bytes; {every} were copied ahead"
    );
    // The numpy probe in a fork of its own writes numpy's pages again.
    let numpy_probe = zeroboot_template::Runtime::Python.descriptor().write_set_probes[0];
    let mut m = template.fork(Box::new(std::io::sink())).unwrap();
    let r = run(&mut m, numpy_probe);
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let numpy = m.ram().copied_bytes().unwrap();
    assert!(
        numpy >= every + some / 2,
        "numpy's pages are copied when numpy runs: {numpy} bytes, {every} copied ahead, {some} in the some part"
    );
}

/// The root image's chunks that the template's process does not map get
/// their KVM slots at the guest's first touch: a print touches none, other
/// programs' files register theirs when read, and code fetched from such a
/// chunk (here, with every chunk of the image lazy, the termios module's,
/// whose page the process maps) registers that chunk alone.
#[test]
fn root_image_chunks_register_at_the_first_touch_even_an_instruction_fetch() {
    use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy, Template};
    const CHUNK: u64 = zeroboot_vmm::snapshot::unwritten::CHUNK;
    let snap = snapshot(&hypervisor());
    let layout = snap.state.layout;
    let image = layout.pmem_gpa..layout.pmem_gpa + layout.pmem_bytes;
    let in_image = |&(gpa, len): &(u64, u64)| image.contains(&gpa) && gpa + len <= image.end;
    assert!(
        snap.unmapped_image.len() >= 4 && snap.unmapped_image.iter().all(in_image),
        "python's root image has chunks its process does not map: {:x?}",
        snap.unmapped_image
    );
    let lazy_image = |m: &Machine| -> Vec<((u64, u64), bool)> {
        m.lazy_slots().into_iter().filter(|(run, _)| in_image(run)).collect()
    };
    let mut m = fork();
    // None of them holds a page the fork's process maps.
    let mapped: Vec<u64> = m
        .page_table_leaves()
        .unwrap()
        .iter()
        .filter(|leaf| leaf.user && image.contains(&leaf.gpa))
        .map(|leaf| leaf.gpa / CHUNK)
        .collect();
    assert!(!mapped.is_empty(), "the process maps some of the image (termios)");
    assert!(lazy_image(&m)
        .iter()
        .all(|((gpa, _), _)| !mapped.contains(&(gpa / CHUNK))));
    run(&mut m, "print(1+1)");
    run(&mut m, "import numpy; print(numpy.random.rand(3))");
    assert!(
        lazy_image(&m).iter().all(|(_, done)| !done),
        "a print and the numpy exec touch none"
    );
    let r = run(
        &mut m,
        "import subprocess\n\
         print(subprocess.run(['perl', '-e', 'print 6*7'], capture_output=True).stdout.decode())",
    );
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "42\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        lazy_image(&m).iter().any(|(_, done)| *done),
        "perl's files are read from lazy chunks"
    );

    // Every chunk of the image lazy: the first touch of termios' chunk is
    // its code, which KVM cannot fetch from where no slot is.
    let mut snap = snapshot(&hypervisor());
    snap.unmapped_image = (image.start..image.end)
        .step_by(CHUNK as usize)
        .map(|gpa| (gpa, CHUNK))
        .collect();
    let template = Template::new(hypervisor(), snap, ForkMemoryPolicy::Fixed(ForkMemory::SharedPages));
    let mut m = template.fork(Box::new(std::io::sink())).unwrap();
    let r = run(
        &mut m,
        "import termios\n\
         try:\n\
         \x20   termios.tcgetattr(0)\n\
         except termios.error:\n\
         \x20   pass\n\
         print('ran')",
    );
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "ran\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let registered: Vec<(u64, u64)> = m
        .lazy_slots()
        .into_iter()
        .filter(|(_, done)| *done)
        .map(|(run, _)| run)
        .collect();
    assert!(
        registered.len() == 1 && in_image(&registered[0]) && mapped.contains(&(registered[0].0 / CHUNK)),
        "only the chunk holding termios' code is registered: {registered:x?}"
    );
}

#[test]
fn restored_guest_runs_numpy() {
    let mut m = fork();
    let r = run(&mut m, "import numpy; print(int(numpy.arange(4).sum()))");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "6\n",
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.exit_code, 0);
}

#[test]
fn one_sandbox_serves_several_requests_with_exit_codes() {
    let mut m = fork();
    let r = run(
        &mut m,
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)",
    );
    assert_eq!(
        (r.exit_code, r.stdout.as_slice(), r.stderr.as_slice()),
        (3, &b"out\n"[..], &b"err\n"[..])
    );
    let r = run(&mut m, "1/0");
    assert_eq!(r.exit_code, 1);
    assert!(String::from_utf8_lossy(&r.stderr).contains("ZeroDivisionError"));
    let r = run(&mut m, "print(sum(range(10)))");
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"45\n"[..]));
}

#[test]
fn forks_do_not_see_each_others_writes() {
    let mut a = fork();
    let mut b = fork();
    run(&mut a, "import builtins; builtins.secret = 'from-a'");
    let r = run(&mut b, "import builtins; print(getattr(builtins, 'secret', 'none'))");
    assert_eq!(r.stdout, b"none\n");
    let r = run(&mut a, "import builtins; print(builtins.secret)");
    assert_eq!(r.stdout, b"from-a\n");
}

#[test]
fn concurrent_forks_are_isolated_in_memory_and_files() {
    // Two forks run at once, each on its own thread; each writes a secret into
    // Python state and a file, then looks for the other's.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = ["left", "right"]
        .into_iter()
        .map(|me| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut m = fork();
                barrier.wait();
                run(
                    &mut m,
                    &format!("import builtins\nbuiltins.secret = '{me}'\nopen('/tmp/secret-{me}', 'w').write('{me}')"),
                );
                barrier.wait();
                let r = run(
                    &mut m,
                    "import builtins, glob\nprint(builtins.secret, sorted(glob.glob('/tmp/secret-*')))",
                );
                String::from_utf8_lossy(&r.stdout).into_owned()
            })
        })
        .collect();
    let seen: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(seen[0], "left ['/tmp/secret-left']\n");
    assert_eq!(seen[1], "right ['/tmp/secret-right']\n");
    // A fork made after both sees only the template's state.
    let r = run(
        &mut fork(),
        "import builtins, glob\nprint(getattr(builtins, 'secret', 'none'), glob.glob('/tmp/secret-*'))",
    );
    assert_eq!(r.stdout, b"none []\n");
}

#[test]
fn large_output_arrives_in_chunks_up_to_the_limit() {
    let code = "import sys\nsys.stdout.write('a' * 3_000_000)\nsys.stderr.write('b' * 1_500_000)";
    // Default limit: 1 MiB a stream, marked truncated.
    let r = run(&mut fork(), code);
    assert_eq!((r.stdout.len(), r.stderr.len()), (1 << 20, 1 << 20));
    assert!(r.stdout_truncated && r.stderr_truncated);
    assert!(r.stdout.iter().all(|&c| c == b'a') && r.stderr.iter().all(|&c| c == b'b'));
    // A larger limit: everything, in several mailbox-sized chunks.
    let mut m = fork();
    let r = m
        .exec(
            &Request {
                output_limit: 4 << 20,
                ..Request::new(code.as_bytes(), b"")
            },
            TIMEOUT,
        )
        .unwrap();
    assert_eq!((r.stdout.len(), r.stderr.len()), (3_000_000, 1_500_000));
    assert!(!r.stdout_truncated && !r.stderr_truncated);
    // The sandbox serves the next request normally.
    assert_eq!(run(&mut m, "print('next')").stdout, b"next\n");
}

#[test]
fn cli_run_prints_numpy_result() {
    template_dir();
    let out = Command::new(zeroboot_bin())
        .args(["run", "-c", "import numpy; print(int(numpy.arange(4).sum()))"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "6\n");
}

/// `zeroboot pages` counts what an exec writes and touches: more for numpy
/// than for print, the mailbox among what print writes, and every written
/// page named by a guest mapping.
#[test]
fn cli_pages_counts_and_names_what_an_exec_writes() {
    template_dir();
    let measure = |code: &str| -> serde_json::Value {
        let out = Command::new(zeroboot_bin())
            .args(["pages", "--json", "-c", code])
            .output()
            .unwrap();
        assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let print = measure("print(1+1)");
    let numpy = measure("import numpy; print(numpy.random.rand(3))");
    let written = |v: &serde_json::Value| v["written"].as_u64().unwrap();
    let touched = |v: &serde_json::Value| v["touched"].as_u64().unwrap();
    assert!(written(&print) > 0 && touched(&print) > 0, "{print}");
    assert!(written(&numpy) > written(&print), "numpy {numpy}\nprint {print}");
    let by_mapping = print["by_mapping"].as_object().unwrap();
    assert!(
        by_mapping["/dev/mem"]["written"].as_u64().unwrap() >= 1,
        "the request in the mailbox: {print}"
    );
    let named: u64 = by_mapping.values().map(|s| s["written"].as_u64().unwrap()).sum();
    assert_eq!(named, written(&print), "every written page is in one group");
}

/// At READY every size class of CPython's small-object allocator starts in
/// an empty pool, malloc holds no free chunk but its top, and a fork's
/// objects up to 32 KiB are carved from one region (native/fork_objects.h),
/// so a fork's allocations go one after the other into a few pages:
/// `print(1+1)` wrote 129 pages before, 82 with the pools filled, the free
/// chunks taken and more of the heap immortal, 66 with the region, 51 with
/// the native request path (native/exec_path.h), and 35 once a plain
/// request wrote only what differs (docs/guest-kernel.md, "What a plain
/// request wrote only because it did").
#[test]
fn forks_carve_their_objects_in_address_order() {
    let log = std::fs::read_to_string(template_dir().join(BOOT_LOG)).unwrap();
    let line = |prefix: &str| {
        log.lines()
            .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_string()))
            .unwrap_or_else(|| panic!("no {prefix:?} line in the boot log:\n{log}"))
    };
    assert!(
        line("object pools: ").ends_with("32 size classes start in an empty pool"),
        "{log}"
    );
    assert!(line("malloc: ").contains(", 1 left (0 in fast bins)"), "{log}");
    assert!(
        line("fork objects: ").ends_with("KiB reserved for a fork's objects"),
        "{log}"
    );
    assert!(
        log.contains("fork objects: a fork's objects up to 32768 bytes go into"),
        "{log}"
    );
    let out = Command::new(zeroboot_bin())
        .args(["pages", "--json", "-c", "print(1+1)"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let print: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let written = print["written"].as_u64().unwrap();
    // 28 measured (docs/guest-kernel.md); builds differ by a few pages.
    assert!(written <= 36, "print(1+1) wrote {written} pages: {print}");
}

/// A plain request (one line, not streamed, no context) is served by the
/// agent's native loop (native/exec_path.h) without the agent's Python
/// code; the same code streamed goes through agent.py. Both answer alike:
/// output, exit codes, tracebacks, results, truncation, stdin, children.
#[test]
fn plain_requests_answer_as_agent_py_does() {
    let mut m = fork();
    let both = |m: &mut Machine, code: &str, stdin: &str, limit: u32| {
        let plain = Request {
            output_limit: limit,
            ..Request::new(code.as_bytes(), stdin.as_bytes())
        };
        let streamed = Request {
            stream: true,
            ..plain.clone()
        };
        let plain = m.exec(&plain, TIMEOUT).unwrap_or_else(|e| panic!("{code:?}: {e}"));
        let streamed = m.exec(&streamed, TIMEOUT).unwrap_or_else(|e| panic!("{code:?}: {e}"));
        (plain, streamed)
    };
    // Which function runs the code: the loop that calls the native half,
    // or agent.py's run_code.
    let (plain, streamed) = both(
        &mut m,
        "import sys; print(sys._getframe(1).f_code.co_name)",
        "",
        1 << 20,
    );
    assert_eq!(
        (plain.stdout.as_slice(), streamed.stdout.as_slice()),
        (&b"serve\n"[..], &b"run_code\n"[..])
    );
    // The stdout each answers with, where the case says.
    let cases: &[(&str, &str, u32, Option<&str>)] = &[
        ("print(1+1)", "", 1 << 20, Some("2\n")),
        ("print(1); print(2)", "", 1 << 20, Some("1\n2\n")),
        ("x = 6 * 7", "", 1 << 20, Some("")),
        ("x", "", 1 << 20, Some("")),
        ("import sys; sys.exit(3)", "", 1 << 20, Some("")),
        ("import sys; sys.exit(2**40)", "", 1 << 20, Some("")),
        ("raise SystemExit('bye')", "", 1 << 20, Some("")),
        ("1/0", "", 1 << 20, Some("")),
        ("print('x' * 5000)", "", 100, None),
        ("print(input(), input())", "one\ntwo\n", 1 << 20, Some("one two\n")),
        ("print('\\udcff', end='')", "", 1 << 20, Some("\u{fffd}")),
        (
            "__import__('sys').stdout.buffer.write(b'raw\\n')",
            "",
            1 << 20,
            Some("raw\n"),
        ),
        ("__import__('sys').stdout.write(b'not text')", "", 1 << 20, Some("")),
        (
            "__import__('os').system('echo from a child')",
            "",
            1 << 20,
            Some("from a child\n"),
        ),
        ("print(", "", 1 << 20, Some("")),
    ];
    for &(code, stdin, limit, stdout) in cases {
        let (plain, streamed) = both(&mut m, code, stdin, limit);
        assert_eq!(plain, streamed, "{code:?}");
        if let Some(stdout) = stdout {
            assert_eq!(String::from_utf8_lossy(&plain.stdout), stdout, "{code:?}: {plain:?}");
        }
    }
    let plain = |m: &mut Machine, code: &str, limit: u32| both(m, code, "", limit).0;
    assert_eq!(
        plain(&mut m, "import sys; sys.exit(2**40)", 1 << 20).exit_code,
        i32::MAX
    );
    let traceback = String::from_utf8_lossy(&plain(&mut m, "1/0", 1 << 20).stderr).into_owned();
    assert_eq!(
        traceback,
        "Traceback (most recent call last):\n  File \"<string>\", line 1, in <module>\nZeroDivisionError: division by zero\n"
    );
    let truncated = plain(&mut m, "print('x' * 5000)", 100);
    assert!(
        truncated.stdout_truncated && truncated.stdout.len() == 100,
        "{truncated:?}"
    );
    let results = plain(&mut m, "x", 1 << 20).results;
    assert_eq!(String::from_utf8_lossy(&results).matches("execute_result").count(), 1);
}

/// The native half makes the execute_result of an int, float, complex, str,
/// bytes or bool itself (exec_path.h, zb_exec_plain_result); agent.py's
/// Results makes the others. Either way the line is json.dumps of the MIME
/// bundle, whole or not at all within the output limit.
#[test]
fn plain_values_become_the_results_agent_py_would_make() {
    let mut m = fork();
    let values = [
        "1",
        "-2.5",
        "True",
        "3+4j",
        "float('nan')",
        "'\u{e9}\"\\\\\\n\\t\\x00\\U0001d11e'",
        "b'\\xff\"'",
        "[1, 'a']",
    ];
    for value in values {
        let expected = run(
            &mut m,
            &format!(
                "import json\nprint(json.dumps({{'type': 'execute_result', 'data': {{'text/plain': repr({value})}}}}))"
            ),
        );
        assert_eq!(expected.exit_code, 0, "{value}: {expected:?}");
        for stream in [false, true] {
            let request = Request {
                stream,
                ..Request::new(value.as_bytes(), b"")
            };
            let r = m.exec(&request, TIMEOUT).unwrap();
            assert_eq!(
                (r.exit_code, String::from_utf8_lossy(&r.results)),
                (0, String::from_utf8_lossy(&expected.stdout)),
                "{value} (streamed: {stream})"
            );
        }
    }
    // A repr that fails is agent.py's to report.
    let r = run(&mut m, "10**5000");
    assert!(
        String::from_utf8_lossy(&r.results).contains("<unrepresentable int: ValueError("),
        "{r:?}"
    );
    // A line longer than the limit is left out, and the response says so.
    let request = Request {
        output_limit: 40,
        ..Request::new(b"12345678901234567890", b"")
    };
    let r = m.exec(&request, TIMEOUT).unwrap();
    assert!(r.results.is_empty() && r.results_truncated, "{r:?}");
    let r = run(&mut m, "7");
    assert!(!r.results_truncated && r.results.ends_with(b"\"7\"}}\n"), "{r:?}");
}

/// Code can reach the captures it writes to and take them apart: the ones
/// plain requests share (native/exec_path.h), then, with those broken and
/// plain requests gone to agent.py, agent.py's own. Its request still gets
/// an answer, and later requests work.
#[test]
fn code_that_breaks_the_captures_breaks_no_later_request() {
    let mut m = fork();
    for (breaking, exit_code) in [
        ("import sys; sys.stdout.buffer.room = 'no number'", 0),
        ("import sys; sys.stdout.buffer.pending = None", 0),
        ("import sys; del sys.stderr.buffer", 1),
    ] {
        let r = run(&mut m, breaking);
        assert_eq!(r.exit_code, exit_code, "{breaking:?}: {r:?}");
        let r = run(&mut m, "print(1+1)");
        assert_eq!(r.stdout, b"2\n", "after {breaking:?}: {r:?}");
        let r = run(&mut m, "1/0");
        assert!(
            String::from_utf8_lossy(&r.stderr).ends_with("ZeroDivisionError: division by zero\n"),
            "after {breaking:?}: {r:?}"
        );
    }
}

/// A plain request without stdin runs with the empty StringIO that rests
/// in sys.stdin between requests (native/exec_path.h), as long as no code
/// has written to, read from, closed or replaced it: each request of a
/// sandbox finds stdin empty and open whatever the one before did to it,
/// and the streams it prints to are the captures again.
#[test]
fn each_request_finds_its_own_stdin_whatever_code_did_to_the_last() {
    let mut m = fork();
    let check = "import sys; print(repr(sys.stdin.read()), sys.stdin.closed, type(sys.stdout).__name__)";
    let fresh = "'' False CappedText\n";
    assert_eq!(String::from_utf8_lossy(&run(&mut m, check).stdout), fresh);
    for disturbing in [
        "import sys; sys.stdin.write('left over'); sys.stdin.seek(0)",
        "import sys; sys.stdin.write('left over')",
        "import sys; sys.stdin.close()",
        "import sys; sys.stdin = None",
        "import sys, io; sys.stdout = io.StringIO()",
        "import sys; sys.stderr = None",
    ] {
        let r = run(&mut m, disturbing);
        assert_eq!(r.exit_code, 0, "{disturbing:?}: {r:?}");
        let r = run(&mut m, check);
        assert_eq!(String::from_utf8_lossy(&r.stdout), fresh, "after {disturbing:?}: {r:?}");
        let r = m
            .exec(&Request::new(b"print(input())", b"given\n"), TIMEOUT)
            .expect("exec with stdin");
        assert_eq!(r.stdout, b"given\n", "after {disturbing:?}: {r:?}");
        let r = run(&mut m, "1/0");
        assert!(
            String::from_utf8_lossy(&r.stderr).ends_with("ZeroDivisionError: division by zero\n"),
            "after {disturbing:?}: {r:?}"
        );
    }
}

/// A fork's objects come from a region of 1920 KiB (native/fork_objects.h);
/// past it, from pymalloc. Objects of every size, grown, shrunk and freed
/// across that line, keep their contents.
#[test]
fn objects_outlive_the_fork_region_and_move_across_it() {
    template_dir();
    let code = "\
rows = [(i, str(i), [i] * (i % 40), b'x' * (i % 1000)) for i in range(40000)]
grown = []
for i in range(0, 40000, 7):
    row = rows[i][2]
    row.extend(range(i % 300))
    grown.append(bytes(rows[i][3]) + b'y' * (i % 5000))
del rows[::2]
again = {str(i): bytearray(i % 900) for i in range(60000)}
assert all(r[1] == str(r[0]) and len(r[3]) == r[0] % 1000 for r in rows)
assert all(len(g) == (7 * k) % 1000 + (7 * k) % 5000 for k, g in enumerate(grown))
assert all(len(v) == int(k) % 900 for k, v in again.items())
print(len(rows), len(grown), len(again), sum(len(r[2]) for r in rows))
";
    let out = Command::new(zeroboot_bin()).args(["run", "-c", code]).output().unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let expected: usize = (0..40000usize)
        .filter(|i| i % 2 == 1)
        .map(|i| i % 40 + if i % 7 == 0 { i % 300 } else { 0 })
        .sum();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("20000 5715 60000 {expected}")
    );
}

#[test]
fn cli_run_writes_the_guest_bytes_as_they_are() {
    template_dir();
    let out = Command::new(zeroboot_bin())
        .args(["run", "-c", "import sys; sys.stdout.buffer.write(b'\\xff\\x00ok')"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"\xff\x00ok");
}

#[test]
fn cli_run_passes_exit_code_and_stderr() {
    template_dir();
    let out = Command::new(zeroboot_bin())
        .args(["run", "-c", "import sys; sys.stderr.write('bad\\n'); sys.exit(7)"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "bad\n");
}

#[test]
fn cli_inspect_and_ls_describe_the_template() {
    template_dir();
    let out = Command::new(zeroboot_bin())
        .args(["template", "inspect", "python"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("MSRs") && text.contains("CPL 3"), "{text}");
    let out = Command::new(zeroboot_bin()).args(["template", "ls"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("python"));
}

#[test]
fn second_build_is_cached_and_fast() {
    template_dir();
    let started = std::time::Instant::now();
    let out = Command::new(zeroboot_bin())
        .args(["template", "build"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("up to date"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn corrupt_template_is_refused_with_the_file_named() {
    let hv = hypervisor();
    let dir = template_dir();
    let copy = std::env::temp_dir().join(format!("zeroboot-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&copy).unwrap();
    let mut state = std::fs::read(dir.join("state.bin")).unwrap();
    let last = state.len() - 1;
    state[last] ^= 0x55;
    std::fs::write(copy.join("state.bin"), &state).unwrap();
    let err = zeroboot_vmm::Snapshot::open(&copy, &zeroboot_vmm::machine::cpu_vendor(&hv))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("state.bin") && err.contains("checksum"), "{err}");
    std::fs::remove_dir_all(&copy).unwrap();
}

#[test]
fn a_thousand_forks_get_a_thousand_distinct_random_values() {
    let code = "import os, random, uuid, secrets, numpy\n\
                print(os.urandom(8).hex(), random.random(), numpy.random.rand(), \
                numpy.random.default_rng().random(), uuid.uuid4(), secrets.token_hex(8))";
    const FORKS: usize = 1000;
    const THREADS: usize = 2;
    let outputs: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    (0..FORKS / THREADS)
                        .map(|_| {
                            let r = run(&mut fork(), code);
                            assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
                            String::from_utf8_lossy(&r.stdout).into_owned()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let mut seen: Vec<std::collections::HashSet<String>> = vec![Default::default(); 6];
    for out in &outputs {
        let values: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(values.len(), 6, "{out}");
        for (set, v) in seen.iter_mut().zip(values) {
            set.insert(v.to_string());
        }
    }
    let names = [
        "os.urandom",
        "random",
        "numpy global",
        "default_rng",
        "uuid4",
        "secrets",
    ];
    for (name, set) in names.iter().zip(&seen) {
        assert_eq!(set.len(), FORKS, "{name} repeated a value across forks");
    }
}

/// The host refreshes about half of each Mersenne Twister state and leaves
/// the generator at its end (agent.py, generator_regions): the first draw
/// regenerates every word, so no word of the state after it is the same in
/// two forks.
#[test]
fn forks_regenerate_whole_generator_states_from_the_fresh_part() {
    let code = "import random, numpy\n\
                random.random(); numpy.random.rand()\n\
                print(*random.getstate()[1][:624], *numpy.random.get_state()[1].tolist())";
    let states: Vec<Vec<u64>> = (0..8)
        .map(|_| {
            let r = run(&mut fork(), code);
            assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
            let words: Vec<u64> = String::from_utf8_lossy(&r.stdout)
                .split_whitespace()
                .map(|w| w.parse().unwrap())
                .collect();
            assert_eq!(words.len(), 2 * 624);
            words
        })
        .collect();
    for (i, a) in states.iter().enumerate() {
        for b in &states[i + 1..] {
            let same: Vec<usize> = (0..a.len()).filter(|&k| a[k] == b[k]).collect();
            assert!(same.is_empty(), "two forks' generator states agree at words {same:?}");
        }
    }
}

#[test]
fn urandom_read_by_a_subprocess_differs_between_forks() {
    let code = "import subprocess\n\
                print(subprocess.run(['head', '-c', '16', '/dev/urandom'], capture_output=True).stdout.hex())";
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut m = fork();
        let r = run(&mut m, code);
        assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(r.stdout.len(), 33);
        seen.insert(r.stdout);
    }
    assert_eq!(seen.len(), 3);
}

/// Runs `code` with `deadline` and checks it ends with a timeout soon after.
fn assert_stopped_at_deadline(code: &str, deadline: Duration) {
    let mut m = fork();
    let started = std::time::Instant::now();
    let err = m
        .exec(&Request::new(code.as_bytes(), b""), deadline)
        .expect_err("the code must time out");
    assert!(
        matches!(err, zeroboot_vmm::MachineError::Guest(GuestFault::Timeout(_))),
        "{code}: {err}"
    );
    assert!(
        started.elapsed() < deadline + Duration::from_secs(3),
        "{code}: took {:?}",
        started.elapsed()
    );
}

#[test]
fn deadline_stops_a_busy_loop() {
    assert_stopped_at_deadline("while True: pass", Duration::from_millis(500));
}

#[test]
fn deadline_stops_a_sleeping_guest() {
    assert_stopped_at_deadline("import time; time.sleep(1e9)", Duration::from_millis(1000));
}

#[test]
fn agent_exit_is_reported_as_a_guest_reset() {
    // The agent is PID 1: its exit panics the guest kernel, which resets.
    let err = fork()
        .exec(&Request::new(b"import os; os._exit(0)", b""), Duration::from_secs(120))
        .expect_err("the guest cannot answer after its agent exited");
    assert!(
        matches!(err, zeroboot_vmm::MachineError::Guest(GuestFault::Reset)),
        "{err}"
    );
    assert!(err.to_string().contains("reset"), "{err}");
}

#[test]
fn cli_timeout_exits_124() {
    template_dir();
    let out = Command::new(zeroboot_bin())
        .args(["run", "--timeout", "0.5", "-c", "while True: pass"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
}

/// A request to run `code` as root, which any caller may ask for (and code
/// running as `user` may become: its saved uid is 0).
fn as_root(code: &str) -> Request {
    Request {
        context: zeroboot_protocol::Context {
            user: Some(zeroboot_protocol::exec::ROOT.into()),
            ..Default::default()
        },
        ..Request::new(code.as_bytes(), b"")
    }
}

/// Guest code that maps the doorbell or the mailbox itself (as root in its
/// own VM) can only break its own sandbox.
fn hostile(code: &str) -> zeroboot_vmm::MachineError {
    let mut m = fork();
    let result = m.exec(&as_root(code), Duration::from_secs(30));
    result.expect_err("hostile guest code must fail its own sandbox")
}

#[test]
fn unknown_doorbell_code_fails_only_that_sandbox() {
    let err = hostile(
        "import mmap, os\n\
         fd = os.open('/dev/mem', os.O_RDWR | os.O_SYNC)\n\
         bell = mmap.mmap(fd, 4096, offset=0xd0000000)\n\
         bell[0] = 0x77\n",
    );
    assert!(
        matches!(
            err,
            zeroboot_vmm::MachineError::Guest(GuestFault::Protocol(ProtocolError::UnknownDoorbell(0x77)))
        ),
        "{err}"
    );
    // The template and other sandboxes carry on.
    let mut m = fork();
    assert_eq!(run(&mut m, "print('fine')").stdout, b"fine\n");
}

/// A vector load from memory nothing backs is an instruction KVM cannot
/// emulate: with no lazy slot left to register, it ends that sandbox with
/// a clear error, and nothing else.
#[test]
fn an_instruction_kvm_cannot_emulate_fails_only_that_sandbox() {
    let err = hostile(
        "import mmap, os, numpy\n\
         fd = os.open('/dev/mem', os.O_RDWR | os.O_SYNC)\n\
         junk = mmap.mmap(fd, 1 << 20, offset=0xe0000000)\n\
         print(numpy.frombuffer(junk, dtype=numpy.float32, count=1024).sum())\n",
    );
    assert!(matches!(err, zeroboot_vmm::MachineError::Emulation { .. }), "{err}");
    let mut m = fork();
    assert_eq!(run(&mut m, "print('fine')").stdout, b"fine\n");
}

#[test]
fn forged_response_lengths_are_rejected() {
    let err = hostile(
        "import mmap, os, struct\n\
         args = dict(w.partition('=')[::2] for w in open('/proc/cmdline').read().split())\n\
         fd = os.open('/dev/mem', os.O_RDWR | os.O_SYNC)\n\
         box = mmap.mmap(fd, 2 << 20, offset=int(args['zeroboot.mailbox'], 0))\n\
         bell = mmap.mmap(fd, 4096, offset=int(args['zeroboot.doorbell'], 0))\n\
         seq = struct.unpack_from('<I', box, 8)[0]\n\
         struct.pack_into('<IiIII', box, 20, seq, 0, 0xffffffff, 0xffffffff, 0)\n\
         bell[0] = 2\n",
    );
    assert!(
        matches!(
            err,
            zeroboot_vmm::MachineError::Guest(GuestFault::Protocol(ProtocolError::ResponseTooLarge { .. }))
        ),
        "{err}"
    );
}

#[test]
fn writes_to_unbacked_guest_physical_memory_are_survived() {
    let mut m = fork();
    // Stores and loads at addresses with no memory behind them exit to the VMM,
    // which ignores stores and answers loads with all-ones, like an empty bus.
    // Garbage written over the network device's registers (0xd0001000) is
    // the device's to refuse.
    let code = "import os, mmap\n\
                mem = os.open('/dev/mem', os.O_RDWR | os.O_SYNC)\n\
                seen = []\n\
                for addr in (0xe0000000, 0xfe000000, 0xd0001000):\n\
                \x20   junk = mmap.mmap(mem, 4096, offset=addr)\n\
                \x20   junk[0:8] = b'garbage!'\n\
                \x20   junk[0x70:0x78] = b'garbage!'\n\
                \x20   seen.append(junk[0])\n\
                print('survived', seen[:2])\n";
    let r = m.exec(&as_root(code), TIMEOUT).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "survived [255, 255]\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn cli_run_feeds_stdin_and_reads_code_from_a_file() {
    template_dir();
    let dir = std::env::temp_dir().join(format!("zeroboot-stdin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("in.txt"), "3\n4\n").unwrap();
    std::fs::write(
        dir.join("prog.py"),
        "import sys\nprint(sum(int(l) for l in sys.stdin))\n",
    )
    .unwrap();
    let out = Command::new(zeroboot_bin())
        .arg("run")
        .arg("--stdin")
        .arg(dir.join("in.txt"))
        .arg(dir.join("prog.py"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "7\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Runs `code`, which must print one float (a guest time), and returns it
/// with the host's wall clock just before and just after.
fn guest_time(m: &mut Machine, code: &str) -> (f64, f64, f64) {
    let before = unix_now();
    let r = run(m, code);
    let after = unix_now();
    let out = String::from_utf8_lossy(&r.stdout);
    let t = out.trim().parse::<f64>().unwrap_or_else(|_| {
        panic!(
            "{code:?} printed {out:?}, stderr {}",
            String::from_utf8_lossy(&r.stderr)
        )
    });
    (before, t, after)
}

#[test]
fn guest_wall_clock_agrees_with_the_host() {
    const SLACK: f64 = 0.050;
    let mut m = fork();
    // Straight from the vDSO data the host rewrote, before any kernel entry.
    let (before, t, after) = guest_time(&mut m, "import time; print(repr(time.time()))");
    assert!(
        t >= before - SLACK && t <= after + SLACK,
        "vDSO time {t} outside host [{before}, {after}] ± 50 ms"
    );
    // Through a system call, after the kernel has taken the host's clock.
    let (before, t, after) = guest_time(
        &mut m,
        "import ctypes, time\nclass T(ctypes.Structure): _fields_ = [('s', ctypes.c_long), ('ns', ctypes.c_long)]\n\
         t = T(); ctypes.CDLL(None).syscall(228, 0, ctypes.byref(t)); print(repr(t.s + t.ns / 1e9))",
    );
    assert!(
        t >= before - SLACK && t <= after + SLACK,
        "kernel time {t} outside host [{before}, {after}] ± 50 ms"
    );
    // Sleeping takes the kernel's timers; the clocks still agree afterwards.
    let (before, t, after) = guest_time(
        &mut m,
        "import time\nm = time.monotonic(); time.sleep(0.3); d = time.monotonic() - m\n\
         assert 0.3 <= d < 5, d\nprint(repr(time.time()))",
    );
    assert!(after - before >= 0.3, "the sleep took host time too");
    assert!(
        t >= before - SLACK && t <= after + SLACK,
        "time after sleep {t} outside host [{before}, {after}] ± 50 ms"
    );
}

#[test]
fn guest_monotonic_clock_continues_from_the_template() {
    // Forks resume as if suspended at the snapshot: host time between two
    // forks does not show in their monotonic clocks.
    const CODE: &str = "import time; print(repr(time.monotonic()))";
    let (_, first, _) = guest_time(&mut fork(), CODE);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, second, _) = guest_time(&mut fork(), CODE);
    assert!(first > 1.0, "monotonic {first} s: the template's boot took longer");
    assert!(
        (second - first).abs() < 0.5,
        "monotonic {first} then {second} s in forks made 1.5 s apart"
    );
}

#[test]
fn a_live_sandbox_forks_children_that_start_from_its_state() {
    let mut parent = fork();
    run(
        &mut parent,
        "import numpy\nx = 41\na = numpy.arange(1000)\nopen('/tmp/note', 'w').write('hi')",
    );
    let started = std::time::Instant::now();
    let live = parent.snapshot_live().unwrap();
    let captured = started.elapsed();
    let mut children: Vec<Machine> = (0..3)
        .map(|_| template().fork_live(&live, Box::new(std::io::sink())).unwrap())
        .collect();
    eprintln!(
        "captured {} KiB of changed memory in {captured:?}; 3 children in {:?}",
        live.changed_bytes() / 1024,
        started.elapsed()
    );
    // The parent moves on; its children keep the state they were forked with.
    run(&mut parent, "x = 0");
    let mut seen = std::collections::HashSet::new();
    for child in &mut children {
        let r = run(
            child,
            "import os\nprint(x + 1, int(a.sum()), open('/tmp/note').read(), os.urandom(8).hex())",
        );
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        assert!(
            out.starts_with("42 499500 hi "),
            "{out} {}",
            String::from_utf8_lossy(&r.stderr)
        );
        seen.insert(out);
    }
    assert_eq!(seen.len(), 3, "children share randomness: {seen:?}");
    // Children are separate from each other too.
    run(&mut children[0], "x = -1");
    assert_eq!(run(&mut children[1], "print(x)").stdout, b"41\n");
    assert_eq!(run(&mut parent, "print(x)").stdout, b"0\n");
}

/// A line printed just before the code blocks is not held back for the
/// rate limit until the next write: it reaches the host at once.
#[test]
fn a_first_streamed_line_is_not_held_while_the_code_blocks() {
    let mut m = fork();
    let started = std::time::Instant::now();
    let mut first: Option<Duration> = None;
    let request = Request {
        stream: true,
        ..Request::new("print('a', flush=True)\nimport time\ntime.sleep(1.5)\nprint('b')", "")
    };
    let r = m
        .exec_streaming(&request, TIMEOUT, &mut |chunk| {
            if first.is_none() && chunk.stdout.starts_with(b"a") {
                first = Some(started.elapsed());
            }
        })
        .unwrap();
    let total = started.elapsed();
    assert_eq!(r.stdout, b"a\nb\n");
    let first = first.expect("a chunk with the first line");
    assert!(
        first + Duration::from_millis(1000) < total,
        "the first line came at {first:?}, the run took {total:?}"
    );
}

#[test]
fn streamed_output_arrives_while_the_code_runs() {
    let mut m = fork();
    let started = std::time::Instant::now();
    let mut arrivals: Vec<(Duration, String)> = Vec::new();
    let request = Request {
        stream: true,
        ..Request::new(
            b"import time, sys\nfor i in range(3):\n    print('line', i)\n    time.sleep(0.3)\nprint('err', file=sys.stderr)",
            b"",
        )
    };
    let r = m
        .exec_streaming(&request, TIMEOUT, &mut |chunk| {
            arrivals.push((
                started.elapsed(),
                String::from_utf8_lossy(&chunk.stdout).into_owned() + &String::from_utf8_lossy(&chunk.stderr),
            ));
        })
        .unwrap();
    let total = started.elapsed();
    assert_eq!(r.stdout, b"line 0\nline 1\nline 2\n");
    assert_eq!(r.stderr, b"err\n");
    let first = arrivals
        .iter()
        .find(|(_, text)| text.contains("line 0"))
        .expect("line 0 arrived");
    assert!(
        first.0 + Duration::from_millis(500) < total,
        "line 0 came at {:?}, the run took {total:?}: {arrivals:?}",
        first.0
    );
    assert!(arrivals.len() >= 3, "{arrivals:?}");
}
