//! `sluice ctl rollout`: the rolling update's policy, one backend at a
//! time, on top of the single commands in the parent module.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::interrupt::Step;
use super::output::{list, out, run_relayed, say};
use super::{Client, CtlError, DrainOpts, Outcome, Progress, drain, wait_until_healthy};
use crate::api::BackendView;
use crate::backend::State;
use crate::config::format_duration;

/// New connections on the other backends, while a started one takes none,
/// that show it is not back in rotation.
const SETTLE_EVIDENCE: u64 = 20;

/// Options of `rollout`.
#[derive(Debug, Clone)]
pub struct RolloutOpts {
    pub exec: String,
    pub smoke: Option<String>,
    /// Backends in order; every backend when empty.
    pub backends: Vec<String>,
    pub min_active: usize,
    pub drain: DrainOpts,
    pub healthy_timeout: Duration,
    /// How long to wait for a started backend to take a new connection.
    pub settle: Duration,
}

/// Updates backends one at a time: drain, run the command, check health
/// and smoke, start, see it take traffic, next. Stops at the first failure
/// with the failing backend left out of rotation.
/// `progress` follows it, for the report if a signal stops it.
pub async fn rollout(
    c: &Client,
    opts: &RolloutOpts,
    progress: &Progress,
) -> Result<Outcome, CtlError> {
    let all = c.backends().await?;
    let order: Vec<String> = if opts.backends.is_empty() {
        all.iter().map(|b| b.name.clone()).collect()
    } else {
        for n in &opts.backends {
            if !all.iter().any(|b| &b.name == n) {
                return Err(CtlError::Rollout(format!("no backend is named `{n}`")));
            }
        }
        opts.backends.clone()
    };
    progress.rollout(&order);
    say(&format!(
        "rollout of {} backend(s): {}",
        order.len(),
        order.join(", ")
    ));
    let started = Instant::now();
    let mut done: Vec<String> = Vec::new();
    for name in &order {
        // A backend an admin took out stays as it is: a rollout must not
        // bring it back.
        if let Some(b) = all.iter().find(|b| &b.name == name)
            && b.state != State::Active
        {
            say(&format!(
                "{name}: {}, so skipped and left as it is",
                b.state.as_str()
            ));
            progress.skipped(name);
            continue;
        }
        match rollout_one(c, name, opts, progress).await {
            Ok(()) => {
                progress.done(name);
                done.push(name.clone());
            }
            Err((outcome, why)) => {
                say(&format!("{name}: FAILED: {why}"));
                let left: Vec<&String> = order
                    .iter()
                    .filter(|n| !done.contains(n) && *n != name)
                    .collect();
                // What is true now: a refusal before the drain never took
                // it out, a failure after it did.
                let now = match c.backend(name).await.map(|b| b.state) {
                    Ok(State::Active) => {
                        "it is still in rotation (it was never taken out)".to_string()
                    }
                    Ok(s) => format!(
                        "it stays out of rotation ({}); `sluice ctl start {name}` puts it back",
                        s.as_str()
                    ),
                    Err(e) => format!("its state is unknown ({e})"),
                };
                out(&format!(
                    "\nrollout stopped after {:.1}s\n  updated:     {}\n  failed:      {name} ({why}); {now}\n  not touched: {}\n",
                    started.elapsed().as_secs_f64(),
                    list(done.iter()),
                    list(left.into_iter())
                ));
                return match outcome {
                    Outcome::TimedOut => Ok(Outcome::TimedOut),
                    Outcome::Done => Err(CtlError::Rollout(format!("rollout failed at {name}"))),
                };
            }
        }
    }
    out(&format!(
        "\nrollout done in {:.1}s: {} updated, every one back in rotation\n",
        started.elapsed().as_secs_f64(),
        done.join(", ")
    ));
    Ok(Outcome::Done)
}

type StepError = (Outcome, String);

fn failed(e: CtlError) -> StepError {
    (Outcome::Done, e.to_string())
}

async fn rollout_one(
    c: &Client,
    name: &str,
    opts: &RolloutOpts,
    progress: &Progress,
) -> Result<(), StepError> {
    // 1. Enough others in service, in every service this backend serves.
    let all = c.backends().await.map_err(failed)?;
    // A reload may have removed it since the rollout began.
    let Some(me) = all.iter().find(|b| b.name == name) else {
        return Err((
            Outcome::Done,
            format!("no backend is named `{name}` any more (removed by a reload?)"),
        ));
    };
    let serving =
        |b: &&BackendView| b.name != name && b.state == State::Active && b.healthy && b.weight > 0;
    let short = if me.services.is_empty() {
        // A backend in no service: count every other one.
        let n = all.iter().filter(serving).count();
        (n < opts.min_active).then(|| format!("{n} other active healthy backend(s)"))
    } else {
        me.services.iter().find_map(|svc| {
            let n = all
                .iter()
                .filter(serving)
                .filter(|b| b.services.contains(svc))
                .count();
            (n < opts.min_active)
                .then(|| format!("service `{svc}` would keep {n} active healthy backend(s)"))
        })
    };
    if let Some(why) = short {
        return Err((
            Outcome::Done,
            format!(
                "refusing to take it out: {why}, --min-active is {}",
                opts.min_active
            ),
        ));
    }
    let address = me.address.clone();

    // 2. Drain.
    say(&format!("{name}: 1/5 drain"));
    match drain(c, name, opts.drain, progress).await.map_err(failed)? {
        Outcome::Done => {}
        Outcome::TimedOut => {
            return Err((Outcome::TimedOut, "drain did not finish in time".into()));
        }
    }

    // 3. The command.
    say(&format!("{name}: 2/5 run: {}", opts.exec));
    progress.at(name, Step::Run(opts.exec.clone()));
    run_shell(&opts.exec, name, &address)
        .await
        .map_err(|e| (Outcome::Done, e))?;
    // By the server's clock: ctl may run on another host.
    let after_command = c.server_time_ms().await.map_err(failed)?;

    // 4. Health, then smoke.
    say(&format!("{name}: 3/5 wait for a passing health check"));
    progress.at(name, Step::Health);
    if !wait_until_healthy(c, name, after_command, opts.healthy_timeout)
        .await
        .map_err(failed)?
    {
        return Err((
            Outcome::TimedOut,
            format!(
                "no passing health check within {}",
                format_duration(opts.healthy_timeout)
            ),
        ));
    }
    if let Some(smoke) = &opts.smoke {
        say(&format!("{name}: 3/5 smoke test: {smoke}"));
        progress.at(name, Step::Smoke(smoke.clone()));
        run_shell(smoke, name, &address)
            .await
            .map_err(|e| (Outcome::Done, e))?;
    }

    // 5. Back in rotation, and taking traffic.
    say(&format!("{name}: 4/5 start"));
    progress.at(name, Step::Start);
    let before = c.backends().await.map_err(failed)?;
    c.act(name, "start", &[]).await.map_err(failed)?;
    say(&format!("{name}: 5/5 wait for new connections"));
    progress.at(name, Step::Settle);
    let total = |bs: &[BackendView], n: &str| {
        bs.iter()
            .find(|b| b.name == n)
            .map_or(0, |b| b.total_connections)
    };
    let others_total = |bs: &[BackendView]| -> u64 {
        bs.iter()
            .filter(|b| b.name != name)
            .map(|b| b.total_connections)
            .sum()
    };
    let t0 = Instant::now();
    loop {
        let now = c.backends().await.map_err(failed)?;
        if total(&now, name) > total(&before, name) {
            say(&format!("{name}: back in rotation and taking connections"));
            return Ok(());
        }
        if t0.elapsed() >= opts.settle {
            // Only a clear imbalance is a failure: with light traffic the
            // few new clients may all have gone elsewhere by turn.
            let others_new = others_total(&now) - others_total(&before);
            if others_new >= SETTLE_EVIDENCE {
                // Out of rotation again, as the report will say.
                let _ = c.act(name, "drain", &[]).await;
                return Err((
                    Outcome::Done,
                    format!(
                        "took no new connection within {} while the others took {others_new}",
                        format_duration(opts.settle)
                    ),
                ));
            }
            say(&format!(
                "{name}: back in rotation (no client arrived within {}: no traffic)",
                format_duration(opts.settle)
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `command` with `sh -c`, its output shown, with the backend in its
/// environment.
async fn run_shell(command: &str, name: &str, address: &str) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("SLUICE_BACKEND", name)
        .env("SLUICE_ADDRESS", address)
        .stdin(Stdio::null());
    let status = run_relayed(cmd)
        .await
        .map_err(|e| format!("cannot run `{command}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{command}` failed ({status})"))
    }
}
