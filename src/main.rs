//! The `sluice` command: parses the command line, sets up logging, loads
//! the configuration and hands over to the library.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::Config;

#[derive(Parser)]
#[command(
    name = "sluice",
    version = VERSION,
    about = "A TCP load balancer whose backends drain, stop and start over HTTP",
    after_help = "Try it: `sluice demo`, then in another terminal `sluice ctl status`.\n\
                  For real: `sluice check --config FILE`, then `sluice run --config FILE`.\n\
                  `sluice help COMMAND` (or `sluice COMMAND --help`) tells more of each command."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The version and the commit it was built from (`build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SLUICE_GIT_COMMIT"),
    ")"
);

#[derive(Subcommand)]
enum Command {
    /// Run the balancer (what a service manager starts).
    Run {
        /// The configuration file; `sluice ctl reload` and SIGHUP read it again.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Write the process id here once serving, remove it at exit; an
        /// upgrade's new process rewrites it.
        #[arg(long, value_name = "PATH")]
        pidfile: Option<PathBuf>,
        /// Take over from the running sluice that started this one, through
        /// this descriptor (set by `sluice ctl upgrade`, not by hand).
        #[arg(long, hide = true, value_name = "FD")]
        takeover_fd: Option<i32>,
    },
    /// Validate a configuration file and print a summary (exit 1 on error).
    Check {
        /// The configuration file to check.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Check the file alone, not this machine (state file directory,
        /// free ports): for validating on another machine than the one that
        /// runs it.
        #[arg(long)]
        file_only: bool,
    },
    /// A small web server that answers with its name (for trying sluice).
    Web {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// The name it answers with: `hello from NAME`.
        #[arg(long, default_value = "web")]
        name: String,
    },
    /// Drive a running sluice through its admin API.
    Ctl(CtlArgs),
    /// Start two built-in web servers and sluice in front of them.
    Demo {
        /// Where clients connect.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The admin API.
        #[arg(long, default_value = "127.0.0.1:9000")]
        admin: SocketAddr,
        /// The two built-in web servers.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "127.0.0.1:8081,127.0.0.1:8082"
        )]
        web: Vec<SocketAddr>,
    },
    /// Print the shell completion script for SHELL.
    ///
    /// Such as `sluice completions bash > /etc/bash_completion.d/sluice`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page sluice(1), or write every command's page.
    ///
    /// With --dir DIR, writes sluice.1, sluice-run.1, sluice-ctl-drain.1,
    /// ... into DIR.
    Man {
        /// Directory to write every page into, such as
        /// /usr/local/share/man/man1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The admin API: HOST:PORT (http:// may be written), or unix:PATH for
    /// its unix socket.
    #[arg(
        long,
        env = "SLUICE_ADMIN",
        hide_env_values = true,
        default_value = sluice::ctl::DEFAULT_ADMIN,
        global = true
    )]
    admin: String,
    /// Bearer token of the admin API. Other users can see it in `ps`: use
    /// --token-file or SLUICE_TOKEN instead.
    #[arg(long, global = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// File that holds the bearer token; one trailing newline is ignored.
    /// Without --token or --token-file, SLUICE_TOKEN in the environment is
    /// the token.
    #[arg(long, value_name = "PATH", global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

/// How a drain goes, for `ctl drain` and each drain of `ctl rollout`.
#[derive(clap::Args)]
struct DrainArgs {
    /// Give up waiting after this long (exit 2); default: wait until drained.
    #[arg(long, value_parser = duration)]
    wait: Option<Duration>,
    /// Close the connections still open after this long.
    #[arg(long, value_parser = duration)]
    force_after: Option<Duration>,
    /// While draining, close connections idle for this long.
    #[arg(long, value_parser = duration)]
    close_idle: Option<Duration>,
}

impl From<DrainArgs> for sluice::ctl::DrainOpts {
    fn from(a: DrainArgs) -> Self {
        sluice::ctl::DrainOpts {
            wait: a.wait,
            force_after: a.force_after,
            close_idle: a.close_idle,
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    sluice::config::parse_duration(s)
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Every backend: state, health (and why it is down), live and total
    /// connections, its services.
    Status {
        /// The API's JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Whether this sluice takes clients (`GET /healthz`), for health
    /// checks that have no curl
    ///
    /// Exit 0 for ok or degraded, 1 for leaving, shutting down or no answer.
    Health {
        /// The API's JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// What became of the clients (`GET /stats`): accepted, established,
    /// each kind of refusal, the live total.
    Stats {
        /// The API's JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Take a backend out of rotation and show its connections falling to 0.
    Drain {
        /// The backend, by its name in the configuration.
        name: String,
        #[command(flatten)]
        drain: DrainArgs,
    },
    /// Take a backend out of rotation and close its connections now.
    Stop {
        /// The backend, by its name in the configuration.
        name: String,
    },
    /// Replace the running sluice with a new process of its binary (or
    /// --binary), dropping no one: the new one takes the listening
    /// sockets, the old one lets its connections finish and exits.
    Upgrade {
        /// The new binary (absolute path); default: the one sluice runs.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// How long to wait for the old process to exit (exit 2 after); 0s
        /// reports the hand-over and does not wait.
        #[arg(long, value_parser = duration, default_value = "5m")]
        wait: Duration,
    },
    /// Give up the floating address on purpose (keepalived moves it to the
    /// peer) and wait until this instance's connections have ended.
    Leave {
        /// Give up waiting after this long (exit 2); default: wait until
        /// no connection is left.
        #[arg(long, value_parser = duration)]
        wait: Option<Duration>,
        /// Close the connections still open after this long.
        #[arg(long, value_parser = duration)]
        force_after: Option<Duration>,
    },
    /// Take this instance back into its pair after `leave`.
    Join,
    /// Have the running sluice read its configuration file again: prints
    /// what it applied, or why it refused (exit 1, nothing changed).
    Reload {
        /// The API's JSON reply, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Put a backend back in rotation.
    Start {
        /// The backend, by its name in the configuration.
        name: String,
        /// Wait until a health check passes (exit 2 if none does in time).
        #[arg(long, value_parser = duration)]
        wait_healthy: Option<Duration>,
    },
    /// A backend's live connections (the netstat step).
    Conns {
        /// The backend, by its name in the configuration.
        name: String,
        /// The API's JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Show only the first N connections (in id order); without it,
        /// every page is read and all are shown.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Print what happens as it happens (state, health, drain progress,
    /// reloads, refused clients), one line each; Ctrl-C ends it (exit 0).
    Events {
        /// The API's JSON objects, one per line, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Update every backend in turn: drain, run a command, check, start.
    ///
    /// A failure stops the round and leaves the failing backend out of
    /// rotation, the others in.
    Rollout {
        /// Command run for each backend, with SLUICE_BACKEND and SLUICE_ADDRESS set.
        #[arg(long)]
        exec: String,
        /// Command that must succeed before the backend goes back in rotation.
        #[arg(long)]
        smoke: Option<String>,
        /// Backends in order (default: all, in config order).
        #[arg(long, value_delimiter = ',')]
        backends: Vec<String>,
        /// Never leave a service with fewer than this many other active,
        /// healthy backends.
        #[arg(long, default_value_t = 1)]
        min_active: usize,
        #[command(flatten)]
        drain: DrainArgs,
        /// Longest wait for a passing health check after the command.
        #[arg(long, value_parser = duration, default_value = "60s")]
        healthy_timeout: Duration,
        /// Longest wait for a started backend to take a new connection.
        #[arg(long, value_parser = duration, default_value = "10s")]
        settle: Duration,
    },
}

fn main() -> ExitCode {
    // Usage errors exit 1, not clap's 2: `ctl` keeps 2 for "timed out".
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!, which panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        // Both from the same clap definition that parses the command line,
        // so they cannot drift from it.
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "sluice", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match dir {
                Some(dir) => {
                    clap_mangen::generate_to(cmd, &dir).with_context(|| {
                        format!("cannot write the man pages into {}", dir.display())
                    })?;
                    println!("man pages written to {}", dir.display());
                }
                None => {
                    let mut page = Vec::new();
                    clap_mangen::Man::new(cmd).render(&mut page)?;
                    std::io::stdout().write_all(&page)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config, file_only } => {
            let c = Config::load(&config)?;
            print!("{}", summary(&c));
            let found = if file_only {
                Default::default()
            } else {
                sluice::server::preflight(&c)
            };
            for note in &found.notes {
                println!("note           {note}");
            }
            for problem in &found.problems {
                eprintln!("error: {}: {problem}", config.display());
            }
            if !found.problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
            println!("{}: OK", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            pidfile,
            takeover_fd,
        } => {
            let c = match (Config::load(&config), takeover_fd) {
                (Ok(c), _) => c,
                (Err(e), Some(fd)) => {
                    // The old process goes on; tell it why this one cannot.
                    if let Ok(t) = sluice::upgrade::TakeOver::receive(fd) {
                        t.fail(&e.to_string());
                    }
                    return Err(e.into());
                }
                (Err(e), None) => return Err(e.into()),
            };
            runtime(&c)?.block_on(async {
                let (stop, now) = sluice::shutdown::stop_signals().map_err(sluice::Error::Io)?;
                let server = match takeover_fd {
                    Some(fd) => sluice::Sluice::take_over(c, fd).await?,
                    None => sluice::Sluice::bind(c).await?,
                };
                let server = server.reload_from(config).hurry_on(now);
                match pidfile {
                    Some(p) => server.pidfile(p).run(stop).await,
                    None => server.run(stop).await,
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Web { listen, name } => {
            small_runtime()?.block_on(async {
                sluice::shutdown::ignore_hangup("sluice web")
                    .context("cannot install signal handlers")?;
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                println!("web server {name} listening on {}", l.local_addr()?);
                sluice::demo::web_server(l, name).await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl(args) => {
            use sluice::ctl::{Ended, Outcome};
            let ended = small_runtime()?.block_on(ctl(args))?;
            Ok(match ended {
                Ended::Finished(Outcome::Done) => ExitCode::SUCCESS,
                Ended::Finished(Outcome::TimedOut) => ExitCode::from(2),
                Ended::Interrupted(sig) => ExitCode::from(sig.exit_code()),
            })
        }
        Command::Demo { listen, admin, web } => {
            anyhow::ensure!(
                web.len() == 2,
                "--web takes two addresses, such as 127.0.0.1:8081,127.0.0.1:8082"
            );
            small_runtime()?.block_on(demo(listen, admin, [web[0], web[1]]))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs a ctl command; SIGINT or SIGTERM stops it with a report of what
/// it leaves (see `ctl::until_interrupted`).
async fn ctl(args: CtlArgs) -> anyhow::Result<sluice::ctl::Ended> {
    use sluice::ctl;
    // Before anything is sent to the balancer.
    let mut signals = ctl::Signals::install().context("cannot install signal handlers")?;
    let token = ctl::read_token(args.token, args.token_file.as_deref())?;
    let c = ctl::Client::new(&args.admin, token)?;
    if let CtlCommand::Events { json } = args.command {
        // It only prints: a signal is how it ends, not an interruption.
        return tokio::select! {
            r = ctl::events(&c, json) => Ok(ctl::Ended::Finished(r?)),
            _ = signals.recv() => Ok(ctl::Ended::Finished(ctl::Outcome::Done)),
        };
    }
    let progress = ctl::Progress::default();
    let command = run_ctl(&c, args.command, &progress);
    Ok(ctl::until_interrupted(&c, &progress, &mut signals, command).await?)
}

async fn run_ctl(
    c: &sluice::ctl::Client,
    command: CtlCommand,
    progress: &sluice::ctl::Progress,
) -> Result<sluice::ctl::Outcome, sluice::ctl::CtlError> {
    use sluice::ctl;
    let outcome = match command {
        CtlCommand::Status { json } => ctl::status(c, json).await?,
        CtlCommand::Health { json } => ctl::health(c, json).await?,
        CtlCommand::Stats { json } => ctl::stats(c, json).await?,
        CtlCommand::Drain { name, drain } => ctl::drain(c, &name, drain.into(), progress).await?,
        CtlCommand::Stop { name } => ctl::stop(c, &name).await?,
        CtlCommand::Upgrade { binary, wait } => {
            let binary = match binary {
                Some(b) => Some(
                    std::path::absolute(&b)
                        .map_err(|e| ctl::CtlError::Rollout(format!("{}: {e}", b.display())))?,
                ),
                None => None,
            };
            ctl::upgrade(c, binary.as_deref(), wait).await?
        }
        CtlCommand::Leave { wait, force_after } => {
            ctl::leave(c, wait, force_after, progress).await?
        }
        CtlCommand::Join => ctl::join(c).await?,
        CtlCommand::Reload { json } => ctl::reload(c, json).await?,
        CtlCommand::Start { name, wait_healthy } => ctl::start(c, &name, wait_healthy).await?,
        CtlCommand::Conns { name, json, limit } => {
            let limit = limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
            ctl::conns(c, &name, json, limit).await?
        }
        CtlCommand::Events { json } => ctl::events(c, json).await?,
        CtlCommand::Rollout {
            exec,
            smoke,
            backends,
            min_active,
            drain,
            healthy_timeout,
            settle,
        } => {
            let opts = ctl::RolloutOpts {
                exec,
                smoke,
                backends,
                min_active,
                drain: drain.into(),
                healthy_timeout,
                settle,
            };
            ctl::rollout(c, &opts, progress).await?
        }
    };
    Ok(outcome)
}

/// The runtime `sluice run` serves on: single-threaded for the per-core
/// layout (sluice adds the other workers' threads itself), or tokio's
/// work-stealing one.
fn runtime(c: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = match c.runtime {
        sluice::config::RuntimeLayout::PerCore => tokio::runtime::Builder::new_current_thread(),
        sluice::config::RuntimeLayout::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(c.workers);
            b
        }
    };
    b.enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// For the commands that are not the balancer.
fn small_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn demo(listen: SocketAddr, admin: SocketAddr, web: [SocketAddr; 2]) -> anyhow::Result<()> {
    let (stop, now) = sluice::shutdown::stop_signals().context("cannot install signal handlers")?;
    sluice::shutdown::ignore_hangup("sluice demo").context("cannot install signal handlers")?;
    let mut bound = [web[0]; 2];
    for (i, addr) in web.iter().enumerate() {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen on {addr} for built-in web server web{}",
                i + 1
            )
        })?;
        bound[i] = l.local_addr()?;
        tokio::spawn(sluice::demo::web_server(l, format!("web{}", i + 1)));
    }
    let config = Config::parse("demo", &sluice::demo::config(listen, admin, bound))?;
    let server = sluice::Sluice::bind(config).await?;
    let listen = server
        .service_addr("web")
        .context("demo service is bound")?;
    println!(
        "{}",
        sluice::demo::instructions(listen, server.admin_addr())
    );
    server.hurry_on(now).run(stop).await?;
    Ok(())
}

/// A one-screen view of a valid configuration.
fn summary(c: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let token = if c.admin.token.is_some() {
        " (token required)"
    } else {
        ""
    };
    let _ = writeln!(s, "admin API      {}{token}", c.admin.listen);
    for svc in &c.services {
        // Round-robin is the default; any other mode is worth a look.
        let mode = match svc.balance {
            sluice::config::Balance::RoundRobin => String::new(),
            sluice::config::Balance::SourceHash(a) => {
                format!("; balance source-hash, affinity {}", a.as_str())
            }
            other => format!("; balance {}", other.as_str()),
        };
        let accept = if svc.accept_proxy {
            format!(
                "; accepts a PROXY header within {}",
                sluice::config::format_duration(svc.proxy_header_timeout)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "service {:<8} {} -> {} (backend port {}{mode}{accept})",
            svc.name,
            svc.listen,
            svc.backends.join(", "),
            svc.backend_port
        );
    }
    for b in &c.backends {
        let check = match &b.health {
            None => "no health check".to_string(),
            Some(sluice::config::HealthCheck::Tcp { .. }) => "tcp check".to_string(),
            Some(sluice::config::HealthCheck::Http { path, status, .. }) => {
                format!("http check GET {path} -> {status}")
            }
        };
        let mut extra = String::new();
        if b.backup {
            extra.push_str(", backup");
        }
        if let Some(max) = b.max_connections {
            let _ = write!(extra, ", max {max} connections");
        }
        if let Some(d) = b.slow_start {
            let _ = write!(extra, ", slow start {}", sluice::config::format_duration(d));
        }
        if let Some(v) = b.send_proxy {
            let _ = write!(extra, ", sends a PROXY {} header", v.as_str());
        }
        let _ = writeln!(
            s,
            "backend {:<8} {:<22} weight {:<3} {check}{extra}",
            b.name,
            b.address.to_string(),
            b.weight
        );
    }
    if let Ok(n) = sluice::limits::raise_nofile() {
        let budget = sluice::limits::Budget::of(n.now, c.admin.max_connections);
        let _ = writeln!(s, "files          {budget}");
        if c.max_connections as u64 > budget.clients {
            let _ = writeln!(
                s,
                "warning        max_connections {} is more than the open-file limit allows; raise it (LimitNOFILE=, ulimit -n)",
                c.max_connections
            );
        }
    }
    let fmt = sluice::config::format_duration;
    let _ = writeln!(
        s,
        "limits         max {} connections, connect timeout {}, idle timeout {}, shutdown grace {}",
        c.max_connections,
        fmt(c.connect_timeout),
        c.idle_timeout.map_or("none".into(), fmt),
        fmt(c.shutdown_grace)
    );
    for (name, value) in changed_settings(c) {
        let _ = writeln!(s, "{name:<14} {value}");
    }
    s
}

/// Every setting of `c` beyond those above that differs from its default,
/// as (name, what it is set to): what a reader of the file should not
/// miss, such as a state file or slower health checks.
fn changed_settings(c: &Config) -> Vec<(&'static str, String)> {
    // The defaults are what a file that sets nothing gets.
    let d = Config::parse(
        "defaults",
        "[[service]]\nname = \"d\"\nlisten = \"127.0.0.1:1\"\n\
         [[backend]]\nname = \"d\"\naddress = \"127.0.0.1:2\"\n",
    )
    .expect("the defaults parse");
    let fmt = sluice::config::format_duration;
    let mut out = Vec::new();
    if let Some(p) = &c.state_file {
        out.push((
            "state file",
            format!("{} (admin states survive restarts)", p.display()),
        ));
    }
    let h = &c.health;
    // slow_start shows on each backend's line.
    let d_health = sluice::config::HealthConfig {
        slow_start: h.slow_start,
        ..d.health.clone()
    };
    if *h != d_health {
        out.push((
            "health",
            format!(
                "every {}, timeout {}, up after {} pass(es), down after {} failure(s) (default: every {}, timeout {}, {} and {})",
                fmt(h.interval),
                fmt(h.timeout),
                h.rise,
                h.fall,
                fmt(d.health.interval),
                fmt(d.health.timeout),
                d.health.rise,
                d.health.fall
            ),
        ));
    }
    if c.zero_copy != d.zero_copy {
        out.push(("zero copy", "off: every byte is copied".into()));
    }
    if c.workers != d.workers || c.runtime != d.runtime {
        let layout = match c.runtime {
            sluice::config::RuntimeLayout::PerCore => "per-core",
            sluice::config::RuntimeLayout::MultiThread => "multi-thread",
        };
        out.push((
            "workers",
            format!("{} ({layout}; default {})", c.workers, d.workers),
        ));
    }
    let (a, da) = (&c.admin, &d.admin);
    let mut admin = Vec::new();
    if a.read_token.is_some() {
        admin.push("a read-only token".to_string());
    }
    if a.request_timeout != da.request_timeout {
        admin.push(format!("request timeout {}", fmt(a.request_timeout)));
    }
    if a.max_connections != da.max_connections {
        admin.push(format!("max {} connections", a.max_connections));
    }
    if !a.allowed_hosts.is_empty() {
        admin.push(format!("allowed hosts {}", a.allowed_hosts.join(", ")));
    }
    if let Some(sock) = &a.socket {
        admin.push(format!(
            "unix socket {} (mode {:o}{})",
            sock.path.display(),
            sock.mode,
            sock.group
                .as_ref()
                .map_or(String::new(), |g| format!(", group {g}"))
        ));
    }
    if a.open_metrics {
        admin.push("/metrics without the token".into());
    }
    if a.open_healthz {
        admin.push("/healthz without the token".into());
    }
    if !admin.is_empty() {
        out.push(("admin", admin.join(", ")));
    }
    if let Some(cl) = &c.cluster {
        out.push((
            "cluster",
            format!(
                "{}, this instance {}, etcd {}, lease {}",
                cl.name,
                cl.instance,
                cl.etcd.join(", "),
                fmt(cl.lease)
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command, option and argument has a one-line description, so
    /// `--help`, the man pages and the completions say what each is for.
    #[test]
    fn every_command_and_argument_says_what_it_is_for() {
        let cli = super::Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        let mut stack = vec![(String::from("sluice"), cli)];
        while let Some((path, cmd)) = stack.pop() {
            if cmd.get_about().is_none() && path != "sluice help" {
                missing.push(path.clone());
            }
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && a.get_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                stack.push((format!("{path} {}", sub.get_name()), sub.clone()));
            }
        }
        assert!(missing.is_empty(), "without a description: {missing:?}");
    }

    #[test]
    fn the_version_names_the_commit() {
        let v = super::Cli::command().render_version();
        assert!(
            v.starts_with(&format!("sluice {} (commit ", env!("CARGO_PKG_VERSION"))),
            "{v}"
        );
    }
}
