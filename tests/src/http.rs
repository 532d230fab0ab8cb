//! A minimal HTTP/1.1 client for the agents' health checks and metrics: one request per
//! connection, as HAProxy's `option httpchk` sends it, so the tests see exactly what a load
//! balancer sees.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status code, headers (lower-case names) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("the body is not JSON: {}", self.body.trim()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `<method> <path> HTTP/1.1` to `127.0.0.1:<port>` with `Connection: close` and reads
/// the whole response.
pub async fn http_get(port: u16, method: &str, path: &str) -> Result<HttpResponse> {
    http_request(port, method, path, &[], "").await
}

/// [`http_get`] with extra `headers` (`("Authorization", "Bearer ...")`) and a `body` (sent
/// with its length; JSON's content type when not empty), as curl sends Patroni's examples.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpResponse> {
    let shown = format!("{method} http://127.0.0.1:{port}{path}");
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot connect for {shown}"))?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: pgherd-tests\r\nConnection: close\r\n"
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse(&raw)
    };
    tokio::time::timeout(TIMEOUT, ask)
        .await
        .with_context(|| format!("{shown} took longer than {TIMEOUT:?}"))?
        .with_context(|| format!("{shown} failed"))
}

fn parse(raw: &[u8]) -> Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = match status_line.split_whitespace().nth(1).map(str::parse) {
        Some(Ok(s)) => s,
        _ => bail!("bad status line {status_line:?}"),
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .context("a chunk without a size line")?;
        let size = usize::from_str_radix(size.trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).context("a chunk shorter than its size")?;
        out.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or("");
    }
}
