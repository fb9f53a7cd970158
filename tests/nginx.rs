//! sluice in front of two real nginx web servers: round-robin, and a drain
//! that lets a browser-style keep-alive connection finish on its server.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Real nginx serving `hello from web1` and `hello from web2`.
struct Nginx {
    child: Child,
    dir: PathBuf,
    ports: [u16; 2],
}

impl Nginx {
    /// `None` when nginx is not installed and this is not CI, where
    /// `.ci/run` installs it and its absence is a failure.
    fn start() -> Option<Nginx> {
        let bin = nginx_bin()?;
        let dir = std::env::temp_dir().join(format!("sluice-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Ports the kernel just handed out, released for nginx to bind.
        let ports = [free_port(), free_port()];
        let conf = format!(
            "daemon off;\nmaster_process off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               keepalive_timeout 60s;\n\
               server {{ listen 127.0.0.1:{p1}; location / {{ return 200 \"hello from web1\\n\"; }} }}\n\
               server {{ listen 127.0.0.1:{p2}; location / {{ return 200 \"hello from web2\\n\"; }} }}\n}}\n",
            d = dir.display(),
            p1 = ports[0],
            p2 = ports[1]
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .args(["-p", dir.to_str().unwrap(), "-c", "nginx.conf"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Some(Nginx { child, dir, ports })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request on a keep-alive connection; returns the body.
async fn get(s: &mut BufReader<TcpStream>) -> String {
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut len = 0;
    loop {
        let mut line = String::new();
        within("response head", s.read_line(&mut line))
            .await
            .unwrap();
        assert!(!line.is_empty(), "connection closed mid-response");
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    within("response body", s.read_exact(&mut body))
        .await
        .unwrap();
    String::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_in_front_of_real_nginx() {
    let Some(nginx) = Nginx::start() else { return };
    let web1 = format!("127.0.0.1:{}", nginx.ports[0]).parse().unwrap();
    let web2 = format!("127.0.0.1:{}", nginx.ports[1]).parse().unwrap();
    wait_for("nginx listening", || async {
        TcpStream::connect(web1).await.is_ok() && TcpStream::connect(web2).await.is_ok()
    })
    .await;
    let lb = Sluice::start("", &[("web1", web1), ("web2", web2)]).await;

    let mut bodies = Vec::new();
    for _ in 0..4 {
        let mut s = BufReader::new(TcpStream::connect(lb.addr).await.unwrap());
        bodies.push(get(&mut s).await);
    }
    assert_eq!(
        bodies,
        [
            "hello from web1\n",
            "hello from web2\n",
            "hello from web1\n",
            "hello from web2\n"
        ]
    );

    // A keep-alive client lands on web1, then web1 is drained.
    let mut browser = loop {
        let mut s = BufReader::new(TcpStream::connect(lb.addr).await.unwrap());
        if get(&mut s).await == "hello from web1\n" {
            break s;
        }
    };
    let (status, _) = lb.post("/backends/web1/drain").await;
    assert_eq!(status, 202);
    for _ in 0..3 {
        assert_eq!(
            get(&mut browser).await,
            "hello from web1\n",
            "the open session stays on web1"
        );
        let mut fresh = BufReader::new(TcpStream::connect(lb.addr).await.unwrap());
        assert_eq!(
            get(&mut fresh).await,
            "hello from web2\n",
            "new sessions go to web2"
        );
    }
    assert_eq!(lb.state("web1").await, "draining");
    drop(browser);
    wait_for("web1 drained", || async {
        lb.state("web1").await == "drained"
    })
    .await;
    lb.post("/backends/web1/start").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut s = BufReader::new(TcpStream::connect(lb.addr).await.unwrap());
        seen.push(get(&mut s).await);
    }
    seen.sort();
    assert_eq!(seen, ["hello from web1\n", "hello from web2\n"]);
    lb.shutdown().await;
}
