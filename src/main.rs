//! The `sluice` command: parses the command line, sets up logging, loads
//! the configuration and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::Config;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A TCP load balancer whose backends drain, stop and start over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer (what a service manager starts).
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file and print a summary (exit 1 on error).
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { config } => {
            let c = Config::load(&config)?;
            print!("{}", summary(&c));
            println!("{}: OK", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let c = Config::load(&config)?;
            runtime()?.block_on(async {
                let server = sluice::Sluice::bind(c).await?.reload_from(config);
                server.run(sluice::shutdown::signal_received()).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { listen, admin, web } => {
            anyhow::ensure!(
                web.len() == 2,
                "--web takes two addresses, such as 127.0.0.1:8081,127.0.0.1:8082"
            );
            runtime()?.block_on(demo(listen, admin, [web[0], web[1]]))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn demo(listen: SocketAddr, admin: SocketAddr, web: [SocketAddr; 2]) -> anyhow::Result<()> {
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
    server.run(sluice::shutdown::signal_received()).await?;
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
        let _ = writeln!(
            s,
            "service {:<8} {} -> {} (backend port {})",
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
        let _ = writeln!(
            s,
            "backend {:<8} {:<22} weight {:<3} {check}",
            b.name,
            b.address.to_string(),
            b.weight
        );
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
    s
}
