//! HTTP/2 with prior knowledge through the h2 crate, for what reqwest does not let a test
//! choose: the `:authority`, CONNECT, many streams on one connection, stream resets.

use std::net::SocketAddr;

use bytes::Bytes;

use super::raw;

pub type Sender = h2::client::SendRequest<Bytes>;

/// Opens an HTTP/2 connection; the connection task runs in the background.
pub async fn connect(addr: SocketAddr) -> Sender {
    let tcp = raw::connect(addr).await;
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.expect("h2 connection ready")
}

/// A request for `uri` as given (its authority becomes `:authority`) with a Bearer token.
pub fn get(method: http::Method, uri: &str, token: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
}

/// Sends a request without a body and reads the whole answer: status and body text.
pub async fn send(
    client: &mut Sender,
    request: http::Request<()>,
) -> Result<(u16, String), h2::Error> {
    let (response, _) = client.send_request(request, true)?;
    let response = tokio::time::timeout(raw::RAW_TIMEOUT, response)
        .await
        .expect("h2 answer in time")?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// One request on a new connection. Returns the status and the body.
pub async fn request(
    addr: SocketAddr,
    token: &str,
    method: http::Method,
    uri: &str,
) -> (u16, String) {
    let mut client = connect(addr).await;
    send(&mut client, get(method, uri, token))
        .await
        .expect("h2 request answered")
}
