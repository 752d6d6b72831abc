//! A webhook receiver for alert tests: a hyper server on 127.0.0.1:0 that records every
//! POSTed body and answers as told (200, an error status, or never).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Status(u16),
    /// Read the alert, never answer.
    Hang,
}

struct Shared {
    answer: Answer,
    bodies: Mutex<Vec<String>>,
    count: watch::Sender<usize>,
}

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("webhook binds");
        let addr = listener.local_addr().unwrap();
        let (count, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            answer,
            bodies: Mutex::new(Vec::new()),
            count,
        });
        let accept = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accept.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| receive(shared.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT/hook/SECRET-PATH` (the path stands for a Slack-style secret).
    pub fn url(&self) -> String {
        format!("http://{}/hook/T0001/B0002/webhook-path-secret", self.addr)
    }

    /// Every body received so far, parsed.
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        self.shared
            .bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                serde_json::from_str(b).unwrap_or_else(|e| panic!("alert not JSON ({e}): {b}"))
            })
            .collect()
    }

    pub fn raw_bodies(&self) -> String {
        self.shared.bodies.lock().unwrap().join("\n")
    }

    pub fn count(&self) -> usize {
        *self.shared.count.borrow()
    }

    /// Waits until `n` alerts have arrived.
    pub async fn wait_for(&self, n: usize, within: Duration) {
        let mut rx = self.shared.count.subscribe();
        let reached = tokio::time::timeout(within, rx.wait_for(|c| *c >= n)).await;
        assert!(
            reached.is_ok(),
            "webhook received {} alerts, wanted {n} within {within:?}: {:?}",
            self.count(),
            self.alerts()
        );
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    shared
        .bodies
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&body).into_owned());
    shared.count.send_modify(|c| *c += 1);
    match shared.answer {
        Answer::Hang => std::future::pending().await,
        Answer::Status(status) => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok(response)
        }
    }
}
