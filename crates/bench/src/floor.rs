//! `beckon bench floor`: what the kernel alone charges a broker for one wake-up on this
//! machine.
//!
//! One thread of this process holds N idle TCP connections (no TLS, no MQTT), writes one
//! message of a wake-up's size to each, then reads one reply of a PUBACK's size from each;
//! the peers live in worker processes (`bench floor-peer`) and answer every read with one
//! reply. The figures are that thread's own CPU time (`/proc/thread-self/schedstat`) per
//! message and the time until the last reply: the least any broker pays here for a fan-out,
//! before its own TLS, MQTT and routing. On loopback the sender's `write` also runs the
//! peer's TCP receive path and wakes the peer (the kernel does it inside the system call),
//! so the floor is far higher than on a network card; the broker figures of `fleet` and
//! `compare` include it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::fleet::source_addresses;
use crate::procstat::ProcReader;

/// `beckon bench floor`.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// Idle connections, one message each.
    #[arg(long, default_value_t = 19_000)]
    pub agents: usize,
    /// Bytes written to each connection (76: a wake-up's TLS record in `compare`).
    #[arg(long, default_value_t = 76, value_parser = clap::value_parser!(u16).range(1..))]
    pub message_bytes: u16,
    /// Bytes each peer answers with (26: a PUBACK's TLS record).
    #[arg(long, default_value_t = 26, value_parser = clap::value_parser!(u16).range(1..))]
    pub reply_bytes: u16,
    /// Connections per peer process (the per-process file limit).
    #[arg(long, default_value_t = 5000)]
    pub agents_per_worker: usize,
    /// Connections per source address in 127.0.0.0/8.
    #[arg(long, default_value_t = 5000)]
    pub agents_per_source_address: usize,
    /// Wait after connecting, seconds: longer than TCP's retransmission timeout, so that
    /// every connection is as idle as an agent's when its wake-up comes.
    #[arg(long, default_value_t = 1.0)]
    pub settle_secs: f64,
    /// Sending threads, each with an equal share of the connections (2: one per core here).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `beckon bench floor-peer` (started by `floor`).
#[derive(Debug, Clone, clap::Args)]
pub struct FloorPeerArgs {
    /// Port of the floor's listener on 127.0.0.1.
    #[arg(long)]
    pub port: u16,
    /// Connections to open.
    #[arg(long)]
    pub count: usize,
    /// Source address to bind them to.
    #[arg(long)]
    pub source: Ipv4Addr,
    /// Bytes to answer each read with.
    #[arg(long)]
    pub reply_bytes: u16,
}

/// What `floor` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloorReport {
    /// Connections.
    pub connections: usize,
    /// Bytes written to each.
    pub message_bytes: u16,
    /// Bytes read back from each.
    pub reply_bytes: u16,
    /// Peer processes.
    pub workers: usize,
    /// Sending threads.
    pub threads: usize,
    /// The sending thread's CPU per message written, microseconds.
    pub send_cpu_us: f64,
    /// Of it, the share in the kernel: a split of clock ticks (10 ms), so absent when the
    /// writes took fewer than 10 ticks.
    pub send_system_share: Option<f64>,
    /// The sending thread's CPU per reply read, microseconds.
    pub receive_cpu_us: f64,
    /// Both: the kernel's floor per delivered wake-up for a broker on this machine.
    pub per_wakeup_us: f64,
    /// The peer processes' CPU per message (read it, write the reply), microseconds: what
    /// the agents' side costs at the least.
    pub peer_cpu_us: f64,
    /// From the first write to the last, seconds.
    pub all_written_s: f64,
    /// From the first write to the last reply read, seconds.
    pub last_reply_s: f64,
}

impl FloorReport {
    /// A human table.
    pub fn table(&self) -> String {
        let rows = [
            ("connections", format!("{}", self.connections), ""),
            ("peer processes", format!("{}", self.workers), ""),
            ("sending threads", format!("{}", self.threads), ""),
            (
                "message / reply",
                format!("{} / {}", self.message_bytes, self.reply_bytes),
                "bytes",
            ),
            (
                "CPU per message written",
                format!("{:.2}", self.send_cpu_us),
                "us",
            ),
            (
                "  of it in the kernel",
                self.send_system_share
                    .map_or_else(|| "-".to_owned(), |share| format!("{:.0}", share * 100.0)),
                "%",
            ),
            (
                "CPU per reply read",
                format!("{:.2}", self.receive_cpu_us),
                "us",
            ),
            (
                "floor per wake-up",
                format!("{:.2}", self.per_wakeup_us),
                "us",
            ),
            (
                "peers' CPU per message",
                format!("{:.2}", self.peer_cpu_us),
                "us",
            ),
            ("all written", format!("{:.3}", self.all_written_s), "s"),
            ("last reply read", format!("{:.3}", self.last_reply_s), "s"),
        ];
        let mut out =
            String::from("kernel floor: idle TCP connections on loopback, no TLS, no MQTT\n");
        for (name, value, unit) in rows {
            out.push_str(&format!("  {name:<30} {value:>12} {unit}\n"));
        }
        out
    }
}

/// The CPU time of the calling thread: exact run time, and the tick counts of user and
/// system time (for their split only).
#[derive(Debug, Clone, Copy)]
struct ThreadCpu {
    run: Duration,
    user_ticks: u64,
    system_ticks: u64,
}

impl ThreadCpu {
    fn now() -> anyhow::Result<Self> {
        let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat")
            .context("reading /proc/thread-self/schedstat")?;
        let run = schedstat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .context("unexpected /proc/thread-self/schedstat")?;
        let stat = std::fs::read_to_string("/proc/thread-self/stat")
            .context("reading /proc/thread-self/stat")?;
        let (user_ticks, system_ticks) = crate::procstat::parse_user_system_ticks(&stat)
            .context("unexpected /proc/thread-self/stat")?;
        Ok(Self {
            run: Duration::from_nanos(run),
            user_ticks,
            system_ticks,
        })
    }
}

/// Bound on the wait for one reply once every message was written.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The soft limit on open files of this process (`/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `floor`, starting peers as `program bench floor-peer ...`.
pub fn run_floor(args: &FloorArgs, program: &std::path::Path) -> anyhow::Result<FloorReport> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let per_worker = args.agents_per_worker.max(1);
    // This process holds one socket per connection, and each peer its share.
    if let Some(limit) = open_files_limit() {
        let most = usize::try_from(limit).unwrap_or(usize::MAX);
        if args.agents + 64 > most || per_worker + 64 > most {
            bail!(
                "the file limit is {limit} per process: this process holds one socket per \
                 connection and each peer --agents-per-worker; lower --agents (at most {}) \
                 and --agents-per-worker, or raise the limit (ulimit -n)",
                most.saturating_sub(64)
            );
        }
    }
    // Accepting needs a backlog deeper than std's 128: the peers connect all at once.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))?;
            socket.listen(4096)
        })
        .context("cannot listen on 127.0.0.1")?;
    let port = listener.local_addr()?.port();
    let sources = source_addresses(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        args.agents,
        args.agents_per_source_address,
    );
    let mut peers = Vec::new();
    let mut left = args.agents;
    while left > 0 {
        let count = left.min(per_worker);
        let source = sources[peers.len() % sources.len()];
        peers.push(Peer::spawn(program, port, count, source, args.reply_bytes)?);
        left -= count;
    }
    let connections: Vec<TcpStream> = runtime.block_on(async {
        let mut out = Vec::with_capacity(args.agents);
        while out.len() < args.agents {
            let (tcp, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "only {} of {} peers' connections arrived within 60 s",
                        out.len(),
                        args.agents
                    )
                })??;
            tcp.set_nodelay(true)?;
            let tcp = tcp.into_std()?;
            tcp.set_nonblocking(false)?;
            // A peer that stops answering ends the run with an error, not a hang.
            tcp.set_read_timeout(Some(REPLY_TIMEOUT))?;
            out.push(tcp);
        }
        anyhow::Ok(out)
    })?;
    drop(listener);
    drop(runtime);
    for peer in &mut peers {
        peer.wait_ready()?;
    }
    std::thread::sleep(Duration::from_secs_f64(args.settle_secs.max(0.0)));

    let reader = ProcReader::new();
    let peers_cpu = |peers: &[Peer]| -> Duration {
        peers
            .iter()
            .filter_map(|p| reader.sample(p.child.id()).ok())
            .map(|sample| sample.cpu)
            .sum()
    };
    let message = vec![b'w'; usize::from(args.message_bytes)];
    let share = args.agents.div_ceil(args.threads.clamp(1, args.agents));
    // One party per chunk (fewer than --threads when the connections do not divide evenly).
    let start = Barrier::new(args.agents.div_ceil(share) + 1);
    let (driven, peer_cpu) = std::thread::scope(|scope| {
        let handles: Vec<_> = connections
            .chunks(share)
            .map(|chunk| {
                let (message, start) = (&message, &start);
                scope.spawn(move || drive(chunk, message, args.reply_bytes, start))
            })
            .collect();
        let peers_before = peers_cpu(&peers);
        start.wait();
        let driven: anyhow::Result<Vec<Driven>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a sending thread panicked"))
            })
            .collect();
        (driven, peers_cpu(&peers).saturating_sub(peers_before))
    });
    let driven = driven?;
    drop(connections);
    for peer in &mut peers {
        peer.finish();
    }

    let n = args.agents as f64;
    let send_cpu: Duration = driven.iter().map(|d| d.send_cpu).sum();
    let receive_cpu: Duration = driven.iter().map(|d| d.receive_cpu).sum();
    let (user, system) = driven.iter().fold((0, 0), |(u, s), d| {
        (u + d.send_user_ticks, s + d.send_system_ticks)
    });
    Ok(FloorReport {
        connections: args.agents,
        message_bytes: args.message_bytes,
        reply_bytes: args.reply_bytes,
        workers: peers.len(),
        threads: driven.len(),
        send_cpu_us: send_cpu.as_secs_f64() * 1e6 / n,
        send_system_share: (user + system >= 10).then(|| system as f64 / (user + system) as f64),
        receive_cpu_us: receive_cpu.as_secs_f64() * 1e6 / n,
        per_wakeup_us: (send_cpu + receive_cpu).as_secs_f64() * 1e6 / n,
        peer_cpu_us: peer_cpu.as_secs_f64() * 1e6 / n,
        all_written_s: driven
            .iter()
            .map(|d| d.written_at.as_secs_f64())
            .fold(0.0, f64::max),
        last_reply_s: driven
            .iter()
            .map(|d| d.done_at.as_secs_f64())
            .fold(0.0, f64::max),
    })
}

/// What one sending thread did.
struct Driven {
    send_cpu: Duration,
    receive_cpu: Duration,
    send_user_ticks: u64,
    send_system_ticks: u64,
    /// From the common start to this thread's last write, and to its last reply read.
    written_at: Duration,
    done_at: Duration,
}

/// Writes `message` to each connection, then reads one reply from each, timing its own CPU.
fn drive(
    connections: &[TcpStream],
    message: &[u8],
    reply_bytes: u16,
    start: &Barrier,
) -> anyhow::Result<Driven> {
    let mut reply = vec![0u8; usize::from(reply_bytes)];
    start.wait();
    let started = Instant::now();
    let before = ThreadCpu::now()?;
    for (i, mut tcp) in connections.iter().enumerate() {
        tcp.write_all(message)
            .with_context(|| format!("writing to connection {i}"))?;
    }
    let written = ThreadCpu::now()?;
    let written_at = started.elapsed();
    // Replies not there yet block the read; waiting costs no CPU, so it is not counted.
    for (i, mut tcp) in connections.iter().enumerate() {
        tcp.read_exact(&mut reply)
            .with_context(|| format!("reading the reply of connection {i}"))?;
    }
    let read = ThreadCpu::now()?;
    Ok(Driven {
        send_cpu: written.run.saturating_sub(before.run),
        receive_cpu: read.run.saturating_sub(written.run),
        send_user_ticks: written.user_ticks.saturating_sub(before.user_ticks),
        send_system_ticks: written.system_ticks.saturating_sub(before.system_ticks),
        written_at,
        done_at: started.elapsed(),
    })
}

/// One peer process.
struct Peer {
    child: Child,
    ready: BufReader<std::process::ChildStdout>,
}

impl Peer {
    fn spawn(
        program: &std::path::Path,
        port: u16,
        count: usize,
        source: Ipv4Addr,
        reply_bytes: u16,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(program)
            .args(["bench", "floor-peer", "--port"])
            .arg(port.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg("--source")
            .arg(source.to_string())
            .arg("--reply-bytes")
            .arg(reply_bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} bench floor-peer", program.display()))?;
        let stdout = child.stdout.take().context("peer stdout missing")?;
        Ok(Self {
            child,
            ready: BufReader::new(stdout),
        })
    }

    /// Waits for the peer's `ready` line (all its connections open).
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let mut line = String::new();
        self.ready
            .read_line(&mut line)
            .context("reading a peer's ready line")?;
        if line.trim() != "ready" {
            let status = self.child.wait().ok();
            bail!("a peer process did not get ready (exit: {status:?}); its error is above");
        }
        Ok(())
    }

    /// Ends the peer: closing its stdin tells it to exit.
    fn finish(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `bench floor-peer`: opens the connections, says `ready`, then answers every read with
/// one reply until its stdin closes.
pub fn run_floor_peer(args: &FloorPeerArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), args.port);
        let reply: std::sync::Arc<[u8]> = vec![b'a'; usize::from(args.reply_bytes)].into();
        for i in 0..args.count {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket
                .bind(SocketAddr::new(IpAddr::V4(args.source), 0))
                .with_context(|| format!("binding to {}", args.source))?;
            let mut tcp = socket
                .connect(target)
                .await
                .with_context(|| format!("connection {i} to {target}"))?;
            tcp.set_nodelay(true)?;
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
        println!("ready");
        std::io::stdout().flush()?;
        // Until the parent closes stdin (or dies).
        tokio::task::spawn_blocking(|| {
            let mut sink = [0u8; 64];
            while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        })
        .await?;
        anyhow::Ok(())
    })
}
