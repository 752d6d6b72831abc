//! Raw HTTP/1 over TCP, for requests no well-behaved client library would send: absolute
//! targets, CONNECT, duplicated or malformed headers, broken framing, slow heads.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every raw exchange is bounded by this.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-cased names, values as sent.
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

/// What came back for one request on one connection.
#[derive(Debug)]
pub enum RawOutcome {
    /// A complete response.
    Response(RawResponse),
    /// The server closed the connection without a (complete) response.
    Closed { partial: Vec<u8> },
}

impl RawOutcome {
    pub fn status(&self) -> Option<u16> {
        match self {
            RawOutcome::Response(r) => Some(r.status),
            RawOutcome::Closed { .. } => None,
        }
    }

    pub fn response(&self) -> &RawResponse {
        match self {
            RawOutcome::Response(r) => r,
            RawOutcome::Closed { partial } => panic!(
                "expected a response, the connection closed after {:?}",
                String::from_utf8_lossy(partial)
            ),
        }
    }
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(RAW_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Sends `request` on a new connection and reads one response (or the close).
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> RawOutcome {
    let mut stream = connect(addr).await;
    // The server may answer and close before taking everything: that is an outcome too.
    let _ = stream.write_all(request).await;
    read_response(&mut stream).await
}

/// Like [`exchange`], then closes the sending side: the server sees the end of the stream.
pub async fn exchange_then_close(addr: SocketAddr, request: &[u8]) -> RawOutcome {
    let mut stream = connect(addr).await;
    let _ = stream.write_all(request).await;
    let _ = stream.shutdown().await;
    read_response(&mut stream).await
}

/// Sends `head`, then `body_parts` from a separate task while reading: a server that
/// answers before it has read the whole body (413, 401) is heard even when it then resets
/// the connection. The sending side stays open until the response has been read.
pub async fn exchange_while_sending(
    addr: SocketAddr,
    head: Vec<u8>,
    body_parts: Vec<Vec<u8>>,
) -> RawOutcome {
    let (mut reader, mut writer) = connect(addr).await.into_split();
    let sender = tokio::spawn(async move {
        // Write errors are expected when the server answers early and closes.
        if writer.write_all(&head).await.is_err() {
            return;
        }
        for part in body_parts {
            if writer.write_all(&part).await.is_err() {
                return;
            }
        }
        // Half-closing could end the request early: hold the writer until aborted.
        std::future::pending::<()>().await;
        drop(writer);
    });
    let outcome = read_response(&mut reader).await;
    sender.abort();
    outcome
}

/// A `POST /v1/text-to-image` head with `Connection: close` and the given extra header
/// lines (each without CRLF), as raw bytes so values can hold any byte.
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

/// Encodes `data` as HTTP/1.1 chunks of at most `chunk` bytes, then the last chunk.
pub fn chunked(data: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = data
        .chunks(chunk)
        .map(|c| {
            let mut framed = format!("{:x}\r\n", c.len()).into_bytes();
            framed.extend_from_slice(c);
            framed.extend_from_slice(b"\r\n");
            framed
        })
        .collect();
    parts.push(b"0\r\n\r\n".to_vec());
    parts
}

/// Reads one response from a connection: head, then a Content-Length or chunked body, or
/// everything up to the close.
pub async fn read_response<R: AsyncRead + Unpin>(stream: &mut R) -> RawOutcome {
    let deadline = Instant::now() + RAW_TIMEOUT;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end + 4;
        }
        if !read_more(stream, &mut buf, deadline).await {
            return RawOutcome::Closed { partial: buf };
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = get("content-length") {
        let len: usize = len.parse().expect("numeric content-length");
        while rest.len() < len {
            if !read_more(stream, &mut rest, deadline).await {
                return RawOutcome::Closed { partial: buf };
            }
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let Some(line_end) = find(&rest, b"\r\n") else {
                if !read_more(stream, &mut rest, deadline).await {
                    return RawOutcome::Closed { partial: buf };
                }
                continue;
            };
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            while rest.len() < line_end + 2 + size + 2 {
                if !read_more(stream, &mut rest, deadline).await {
                    return RawOutcome::Closed { partial: buf };
                }
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
        body
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        while read_more(stream, &mut rest, deadline).await {}
        rest
    };
    RawOutcome::Response(RawResponse {
        status,
        headers,
        body,
    })
}

async fn read_more<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> bool {
    let mut chunk = [0u8; 8192];
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, stream.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => false,
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        Err(_) => panic!(
            "no response within {RAW_TIMEOUT:?}; got so far: {:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

/// Waits until the server closes the connection (EOF or reset), discarding what it sends;
/// fails when that takes longer than `within`. Returns how long it took.
pub async fn await_close(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut sink = [0u8; 8192];
    let closed = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server kept the connection open for more than {within:?}"
    );
    started.elapsed()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
