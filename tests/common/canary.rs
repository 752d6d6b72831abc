//! A canary: a plain TCP listener on loopback that records every connection and every byte
//! it receives, and answers nothing. A gateway that is never an open proxy never reaches it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

pub struct Canary {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Canary {
    /// Listens on `127.0.0.1:0`, or on `[::1]:0` with `ipv6`.
    pub async fn start(ipv6: bool) -> Self {
        let bind = if ipv6 { "[::1]:0" } else { "127.0.0.1:0" };
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("canary cannot listen on {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let index = {
                    let mut seen = record.lock().unwrap();
                    seen.push(Vec::new());
                    seen.len() - 1
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        record.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    /// Every connection so far, with the bytes it carried.
    pub fn connections(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }

    pub fn assert_untouched(&self) {
        let seen = self.connections();
        assert!(
            seen.is_empty(),
            "the canary at {} received {} connection(s): {:?}",
            self.addr,
            seen.len(),
            seen.iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect::<Vec<_>>()
        );
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.task.abort();
    }
}
