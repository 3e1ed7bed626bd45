//! `zeroboot serve`: the HTTP API on a tokio runtime; forks run on blocking
//! threads (see zeroboot-server).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use zeroboot_sandbox::{IsolatedTemplate, WorkerCommand};
use zeroboot_server::auth::Auth;
use zeroboot_server::network::NetworkSettings;
use zeroboot_server::{AppState, Limits, Served};
use zeroboot_template::Cache;
use zeroboot_vmm::{Hypervisor, Snapshot};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Templates to serve (python, node, bash, or any built from a spec);
    /// the first for each language serves that language.
    #[arg(long = "template", default_value = zeroboot_template::DEFAULT_NAME)]
    templates: Vec<String>,
    /// File of API keys, one per line. Without keys only loopback clients are served.
    #[arg(long, env = "ZEROBOOT_API_KEYS_FILE", value_name = "FILE")]
    api_keys: Option<PathBuf>,
    /// Sandbox processes each template keeps with their VM prepared.
    #[arg(long, default_value_t = 2)]
    pool: usize,
    /// Sandboxes running at once (default: 4 per core); more requests wait, then get 503.
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// Long-lived sandboxes one API key may hold.
    #[arg(long, default_value_t = 64)]
    max_sandboxes_per_key: usize,
    /// Guest RAM, in MiB, one API key's long-lived sandboxes may hold.
    #[arg(long, default_value_t = 16 << 10)]
    max_sandbox_memory_mib: u64,
    /// How long a request waits for a free sandbox slot before it gets 503.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    queue_wait_ms: u64,
    /// Requests per second per API key (or for all loopback clients without keys).
    #[arg(long, default_value_t = NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN))]
    rate: NonZeroU32,
    /// Requests a key may send at once above its rate.
    #[arg(long, default_value_t = NonZeroU32::new(2000).unwrap_or(NonZeroU32::MIN))]
    burst: NonZeroU32,
    /// Where paused sandboxes are written (default: `paused/` in the cache
    /// directory); they outlive the server and resume in a later one.
    #[arg(long, value_name = "DIR")]
    pause_dir: Option<PathBuf>,
    /// Refuse to pause sandboxes: the server then writes no file at all.
    #[arg(long, conflicts_with = "pause_dir")]
    no_pause: bool,
    /// This server's id in a cluster (1-16 of a-z, 0-9): sandbox ids carry
    /// it, so a load balancer can send every call for a sandbox to its node
    /// (docs/kubernetes.md, "Several nodes").
    #[arg(long, env = "ZEROBOOT_NODE_ID", value_name = "ID")]
    node_id: Option<String>,
    /// How forks back their guest memory.
    #[arg(long, value_enum, default_value = "auto")]
    fork_memory: crate::fork_memory::ForkMemoryArg,
    /// Give no sandbox a network, whatever it asks (a request with a
    /// `network` policy then gets 403).
    #[arg(long)]
    no_network: bool,
    /// Where sandboxes' DNS queries go, when their policy lets a name
    /// through (default: the first nameserver of /etc/resolv.conf).
    #[arg(long, value_name = "IP:PORT")]
    dns_upstream: Option<SocketAddr>,
    /// TCP connections one sandbox may hold open at once.
    #[arg(long, default_value_t = 256)]
    net_max_connections: usize,
    /// Bytes per second one sandbox may move each way (0: no limit).
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    net_bandwidth: u64,
    /// A deny entry (CIDR, address or domain) added to every sandbox's
    /// network policy; repeat it for more. For a cluster's pod and service
    /// ranges, say (docs/network.md).
    #[arg(long = "net-deny", value_name = "ENTRY")]
    net_deny: Vec<String>,
}

pub fn run(args: &ServeArgs, open: impl Fn(&Cache, &Hypervisor, &str) -> Result<Snapshot>) -> Result<()> {
    let cache = Cache::from_env()?;
    let worker = WorkerCommand::current_exe(&["worker"])?;
    let fork_memory = args.fork_memory.resolve();
    let mut served = Vec::new();
    for name in &args.templates {
        let hv = Hypervisor::open()?;
        let snapshot = open(&cache, &hv, name)?;
        let info = zeroboot_template::read_info(&snapshot.dir)?;
        let runtime = info.runtime().descriptor();
        served.push(Served {
            name: name.clone(),
            runtime,
            network: info.spec.and_then(|spec| spec.network).map(Into::into),
            template: IsolatedTemplate::with_probes(
                worker.clone(),
                snapshot,
                args.pool,
                fork_memory,
                probe_codes(runtime),
            ),
        });
    }
    let keys = match &args.api_keys {
        Some(path) => Some(Auth::read_keys(path)?),
        None => None,
    };
    let mut limits = Limits::default();
    if let Some(n) = args.max_concurrent {
        limits.max_concurrent = n.max(1);
    }
    limits.queue_wait = Duration::from_millis(args.queue_wait_ms);
    limits.max_sandboxes_per_caller = args.max_sandboxes_per_key;
    limits.max_sandbox_mib_per_caller = args.max_sandbox_memory_mib;
    let auth = Auth::new(keys, args.rate, args.burst);
    let has_keys = auth.has_keys();
    if let Some(node) = &args.node_id {
        anyhow::ensure!(
            zeroboot_server::sessions::valid_node_id(node),
            "--node-id {node:?}: 1 to 16 of a-z and 0-9"
        );
    }
    let pause_dir = match (&args.pause_dir, args.no_pause) {
        (_, true) => None,
        (Some(dir), false) => Some(dir.clone()),
        (None, false) => Some(cache.root().join("paused")),
    };
    let files = match &pause_dir {
        Some(_) => zeroboot_seccomp::ServerFiles::WritesPausedSandboxes,
        None => zeroboot_seccomp::ServerFiles::ReadOnly,
    };
    let network = network_settings(args)?;
    if !network.enabled {
        for template in &mut served {
            if template.network.take().is_some() {
                tracing::warn!(
                    template = template.name,
                    "the template's spec gives its sandboxes a network, which this server does not give"
                );
            }
        }
    }
    let state = Arc::new(
        AppState::new(served, limits, auth)
            .with_pause_dir(pause_dir.clone())
            .with_node_id(args.node_id.clone())
            .with_network(network),
    );
    // Templates and keys are read: from here on the server only serves and
    // starts workers, and writes paused sandboxes (see
    // zeroboot_seccomp::server_filters).
    for filter in zeroboot_seccomp::server_filters(files)? {
        zeroboot_seccomp::install(&filter)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(512)
        .thread_keep_alive(Duration::from_secs(60))
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("zeroboot: listening on http://{addr}");
        if has_keys {
            println!("zeroboot: API keys required (Authorization: Bearer)");
        } else {
            println!("zeroboot: no API keys configured: serving loopback clients only");
        }
        println!("zeroboot: fork memory: {}", fork_memory.name());
        match &pause_dir {
            Some(dir) => println!("zeroboot: paused sandboxes in {}", dir.display()),
            None => println!("zeroboot: pausing sandboxes is off"),
        }
        zeroboot_server::serve(listener, state, shutdown_signal())
            .await
            .context("serving")
    })
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
    println!("zeroboot: shutting down");
}

/// How sandboxes get a network, from the flags. The host's addresses are
/// read now, before the server's seccomp filter refuses netlink; without
/// them no sandbox could be kept from the host, so networking is off.
fn network_settings(args: &ServeArgs) -> Result<NetworkSettings> {
    zeroboot_net::NetworkPolicy {
        allow: Vec::new(),
        deny: args.net_deny.clone(),
    }
    .validate()
    .map_err(|e| anyhow::anyhow!("--net-deny: {e}"))?;
    let (enabled, host_addresses) = match zeroboot_server::network::host_addresses() {
        Ok(addresses) => (!args.no_network, addresses),
        Err(e) if !args.no_network => {
            tracing::warn!(error = %e, "cannot read this host's addresses: sandboxes get no network");
            (false, Vec::new())
        }
        Err(_) => (false, Vec::new()),
    };
    Ok(NetworkSettings {
        enabled,
        dns_upstream: args.dns_upstream.or_else(zeroboot_server::network::system_resolver),
        max_connections: args.net_max_connections.max(1),
        bandwidth_bytes_per_sec: args.net_bandwidth,
        host_addresses,
        always_deny: args.net_deny.clone(),
    })
}

/// The probes pooled shared-pages workers run and rewind before a request
/// comes (`IsolatedTemplate::with_probes`): the runtime's print probe,
/// which goes through the whole request path. Its numpy probe too would
/// take a python numpy exec from about 23 to 11 ms, but the preparation
/// from about 10 to 24–44 ms (in-process, `fault_probe` with `PROBES`),
/// and on 2 cores the pool then fell behind the bench's forks.
pub fn probe_codes(runtime: &zeroboot_template::RuntimeDescriptor) -> Vec<Vec<u8>> {
    vec![runtime.print_probe.as_bytes().to_vec()]
}
