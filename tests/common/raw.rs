//! Raw HTTP/1.1 over a tokio `TcpStream`, for requests an HTTP client refuses to send
//! (non-ASCII or duplicated headers, hand-made chunked bodies, a head without its body).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every raw exchange is bounded by this.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `head` (which should say `Connection: close`) followed by `body_parts`, written
/// by a separate task so a server that answers before reading the whole body is still
/// heard; then reads until the server closes and parses the one response.
pub async fn exchange(addr: SocketAddr, head: Vec<u8>, body_parts: Vec<Vec<u8>>) -> RawResponse {
    let stream = tokio::time::timeout(EXCHANGE_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect within the timeout")
        .expect("gateway accepts the connection");
    let (mut reader, mut writer) = stream.into_split();
    let write = tokio::spawn(async move {
        // Write errors are expected when the server answers early and closes.
        if writer.write_all(&head).await.is_err() {
            return;
        }
        for part in body_parts {
            if writer.write_all(&part).await.is_err() {
                return;
            }
        }
        // Keep the write half open: half-closing could end the request early.
        std::future::pending::<()>().await;
        drop(writer);
    });
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    if parse(&received).is_some_and(|(_, complete)| complete) {
                        break;
                    }
                }
                // A reset after the answer arrived (server closed with unread input).
                Err(_) => break,
            }
        }
    })
    .await;
    write.abort();
    assert!(
        read.is_ok(),
        "no complete response within {EXCHANGE_TIMEOUT:?}; got {:?}",
        String::from_utf8_lossy(&received)
    );
    parse(&received)
        .map(|(response, _)| response)
        .unwrap_or_else(|| {
            panic!(
                "unparseable response: {:?}",
                String::from_utf8_lossy(&received)
            )
        })
}

/// A `POST /v1/text-to-image` head with the given extra header lines (each without CRLF),
/// as raw bytes so values can hold any byte.
pub fn post_head(extra_lines: &[&[u8]], content_length: Option<usize>) -> Vec<u8> {
    let mut head = b"POST /v1/text-to-image HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\n\
Content-Type: application/json\r\n"
        .to_vec();
    for line in extra_lines {
        head.extend_from_slice(line);
        head.extend_from_slice(b"\r\n");
    }
    if let Some(length) = content_length {
        head.extend_from_slice(format!("Content-Length: {length}\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Parses one response; the flag says whether its body is complete.
fn parse(bytes: &[u8]) -> Option<(RawResponse, bool)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &bytes[end + 4..];
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let (body, complete) = if let Some(length) = length {
        (
            rest[..rest.len().min(length)].to_vec(),
            rest.len() >= length,
        )
    } else if chunked {
        dechunk(rest)
    } else {
        (rest.to_vec(), false)
    };
    Some((
        RawResponse {
            status,
            headers,
            body,
        },
        complete,
    ))
}

fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (body, false);
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (body, true);
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..rest.len().min(size)]);
            return (body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Encodes `data` as HTTP/1.1 chunks of at most `chunk` bytes (without the last chunk).
pub fn chunks(data: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    data.chunks(chunk)
        .map(|c| {
            let mut framed = format!("{:x}\r\n", c.len()).into_bytes();
            framed.extend_from_slice(c);
            framed.extend_from_slice(b"\r\n");
            framed
        })
        .collect()
}
