//! The epoll engine: tokio's current-thread runtime, one task per
//! connection, `copy_bidirectional` for the bytes. The same proxy as the
//! io_uring engine, on the readiness model sluice uses today.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::copy_bidirectional_with_sizes;
use tokio::net::{TcpListener, TcpStream};

use crate::Group;

pub fn run(groups: Vec<Group>, buf_size: usize) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        for g in groups {
            let sock = crate::listener(g.listen)?;
            sock.set_nonblocking(true)?;
            let l = TcpListener::from_std(sock.into())?;
            tokio::spawn(accept_loop(l, g.backends, buf_size));
        }
        std::future::pending::<()>().await;
        Ok(())
    })
}

async fn accept_loop(l: TcpListener, backends: Vec<SocketAddr>, buf_size: usize) {
    let mut next = 0;
    loop {
        match l.accept().await {
            Ok((client, _)) => {
                let backend = backends[next % backends.len()];
                next += 1;
                tokio::spawn(relay(client, backend, buf_size));
            }
            Err(e) => {
                // Out of descriptors or memory: wait rather than spin, as
                // the io_uring engine does.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Connects, then moves bytes both ways until both directions have ended
/// (copy_bidirectional passes each EOF on as a shutdown of the other
/// side's write half); any error drops, and so closes, both sockets.
async fn relay(mut client: TcpStream, backend: SocketAddr, buf_size: usize) {
    let _ = client.set_nodelay(true);
    let Ok(mut server) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = copy_bidirectional_with_sizes(&mut client, &mut server, buf_size, buf_size).await;
}
