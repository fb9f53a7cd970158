//! The dashboard in a real browser: headless Chromium, driven through
//! chromedriver (WebDriver), against a real sluice with a token. The page
//! asks for the token and says when it is wrong; shows two green
//! backends; a drain of the backend that holds a long connection turns it
//! yellow with 1 live connection and its connection list shows the client;
//! the client leaves and the card turns red without the page reloading; a
//! start turns it green. A list longer than a page shows its first page
//! and says how many there are. A screenshot of each step goes to
//! target/dashboard/. Needs Debian's chromium and chromium-driver, which
//! scripts/test.sh installs.

mod support;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether Chromium and its driver are here; outside CI, one line says why
/// the test does not run without them.
fn browser_available() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "chromium or chromedriver is missing in CI: scripts/test.sh installs them"
    );
    eprintln!(
        "dashboard test: skipped, no {CHROMIUM} or {CHROMEDRIVER} (apt-get install chromium chromium-driver, or run scripts/test.sh)"
    );
    false
}

/// chromedriver on a free loopback port, and a browser session through it.
async fn browser(profile: &Path) -> (Proc, Client) {
    {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut driver = Proc::spawn_command(
            Command::new(CHROMEDRIVER).args([&format!("--port={port}"), "--allowed-ips=127.0.0.1"]),
        );
        driver.wait_line("ChromeDriver was started successfully");
        let caps: serde_json::Map<String, serde_json::Value> = serde_json::json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        })
        .as_object()
        .unwrap()
        .clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => return (driver, c),
                Err(e) if Instant::now() > deadline => panic!("no browser session: {e}"),
                // chromedriver answers a moment after it says it started.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Waits until `cond` holds on the page; returns how long it took.
async fn wait_page<F, Fut>(what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

/// An attribute of the first element matching `css`, if there is one.
async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    let e = c.find(Locator::Css(css)).await.ok()?;
    e.attr(name).await.ok().flatten()
}

async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The colour word of `backend`'s card.
async fn colour(c: &Client, backend: &str) -> Option<String> {
    attr(c, &format!("[data-backend=\"{backend}\"]"), "data-colour").await
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Saves a screenshot of the page as target/dashboard/{name}.png.
async fn shot(c: &Client, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_start_a_backend_from_the_dashboard() {
    if !browser_available() {
        return;
    }
    let (web1, web2) = (Echo::start("web1").await, Echo::start("web2").await);
    let lb = Sluice::from_toml(&config(
        "",
        "token = \"s3cret\"",
        &[("web1", web1.addr), ("web2", web2.addr)],
    ))
    .await;
    let profile = tempfile::tempdir().unwrap();
    let (_driver, c) = browser(profile.path()).await;
    c.goto(&format!("http://{}/", lb.admin)).await.unwrap();

    // The page asks for the token, and says so when it is wrong.
    wait_page("the token form", || async {
        c.find(Locator::Id("login-token")).await.is_ok_and(|_| true)
            && attr(&c, "#login", "style")
                .await
                .is_some_and(|s| s.contains("flex"))
    })
    .await;
    let field = c.find(Locator::Id("login-token")).await.unwrap();
    field.send_keys("wrong").await.unwrap();
    click(&c, "#login-form button").await;
    wait_page("the wrong token refused", || async {
        text(&c, "#login-error").await.contains("refused")
    })
    .await;
    shot(&c, "0-token").await;
    let field = c.find(Locator::Id("login-token")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys("s3cret").await.unwrap();
    click(&c, "#login-form button").await;

    // Two green backends.
    wait_page("two green backends", || async {
        colour(&c, "web1").await.as_deref() == Some("green")
            && colour(&c, "web2").await.as_deref() == Some("green")
    })
    .await;
    shot(&c, "1-green").await;
    // A mark that a reload of the page would lose.
    c.execute("window.sluiceTestMark = 1;", vec![])
        .await
        .unwrap();

    // A long connection, and a drain of the backend that holds it.
    let (mut session, held) = lb.connect().await;
    let other = if held == "web1" { "web2" } else { "web1" };
    let card = format!("[data-backend=\"{held}\"]");
    click(&c, &format!("{card} button[data-action=\"drain\"]")).await;
    wait_page("yellow with 1 live connection", || async {
        colour(&c, &held).await.as_deref() == Some("yellow")
            && text(&c, &format!("{card} [data-role=\"live\"]")).await == "1"
    })
    .await;
    assert!(
        text(&c, &format!("{card} [data-role=\"state\"]"))
            .await
            .contains("DRAINING")
            || text(&c, &format!("{card} [data-role=\"state\"]"))
                .await
                .contains("draining")
    );
    // The click's own answer shows on the card.
    wait_page("the drain's answer", || async {
        text(&c, &format!("{card} [data-role=\"result\"]"))
            .await
            .contains("draining")
    })
    .await;
    // Its connection list: the netstat view, with the held client.
    let client = session.local_addr().unwrap().to_string();
    click(&c, &format!("{card} h2 a")).await;
    wait_page("the held client listed", || async {
        text(&c, "#conns-rows").await.contains(&client)
    })
    .await;
    echo(&mut session, b"still served").await;
    shot(&c, "2-draining").await;

    // The client leaves: red, at once, with no reload of the page.
    drop(session);
    let took = wait_page("red", || async {
        colour(&c, &held).await.as_deref() == Some("red")
    })
    .await;
    support::netns::note(&format!(
        "the dashboard turned red {} ms after the last client left",
        took.as_millis()
    ));
    // Within about a second: from the event stream, not from a poll.
    assert!(took < Duration::from_secs(2), "{took:?}");
    let mark = c
        .execute("return window.sluiceTestMark;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, serde_json::json!(1), "the page was not reloaded");
    // It heard it from the event stream, and logged it.
    assert_eq!(text(&c, "#link").await, "live");
    wait_page("the drained event in the log", || async {
        text(&c, "#events")
            .await
            .contains(&format!("drained {held}"))
    })
    .await;
    shot(&c, "3-drained").await;

    // Stop asks first; dismissed, nothing changes.
    click(
        &c,
        &format!("[data-backend=\"{other}\"] button[data-action=\"stop\"]"),
    )
    .await;
    let asked = c.get_alert_text().await.unwrap();
    assert!(asked.contains("closed"), "{asked}");
    c.dismiss_alert().await.unwrap();
    // Nothing was sent: the card shows no answer, and it stays green.
    let other_card = format!("[data-backend=\"{other}\"]");
    assert_eq!(
        text(&c, &format!("{other_card} [data-role=\"result\"]")).await,
        ""
    );
    assert_eq!(colour(&c, other).await.as_deref(), Some("green"));

    // The token stayed in the tab: no cookie, no local storage, no URL.
    let kept = c
        .execute(
            "return [document.cookie, localStorage.length, location.href, sessionStorage.getItem('sluice-token')];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(kept[0], "", "{kept}");
    assert_eq!(kept[1], 0, "{kept}");
    assert!(!kept[2].as_str().unwrap().contains("s3cret"), "{kept}");
    assert_eq!(kept[3], "s3cret", "{kept}");

    // Start: green again.
    click(&c, &format!("{card} button[data-action=\"start\"]")).await;
    wait_page("green again", || async {
        colour(&c, &held).await.as_deref() == Some("green")
    })
    .await;
    shot(&c, "4-green-again").await;
    c.close().await.unwrap();
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_connection_list_shows_its_first_page_and_says_so() {
    if !browser_available() {
        return;
    }
    // One more than the page the dashboard asks for.
    const N: usize = 1001;
    let web1 = Echo::start("web1").await;
    let lb = Sluice::start("", &[("web1", web1.addr)]).await;
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        clients.push(lb.connect().await.0);
    }
    let profile = tempfile::tempdir().unwrap();
    let (_driver, c) = browser(profile.path()).await;
    c.goto(&format!("http://{}/", lb.admin)).await.unwrap();
    wait_page("the backend's card with its count", || async {
        text(&c, "[data-backend=\"web1\"] [data-role=\"live\"]").await == N.to_string()
    })
    .await;
    click(&c, "[data-backend=\"web1\"] h2 a").await;
    let rows = || async {
        c.execute(
            "return document.querySelectorAll('#conns-rows tr').length;",
            vec![],
        )
        .await
        .unwrap()
    };
    wait_page("the first page, and how many there are", || async {
        text(&c, "#conns-count").await == format!("(first 1000 of {N})")
    })
    .await;
    assert_eq!(rows().await, serde_json::json!(1000));
    shot(&c, "5-first-page").await;
    // One leaves: the page holds them all, and says nothing more.
    drop(clients.pop());
    wait_page("no count once one page holds them all", || async {
        text(&c, "#conns-count").await.is_empty()
    })
    .await;
    assert_eq!(rows().await, serde_json::json!(1000));
    c.close().await.unwrap();
    drop(clients);
    lb.shutdown().await;
}
